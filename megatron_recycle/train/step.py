"""One GRPO (or SFT) training step on a megatron-core GPTModel, readable top to bottom.

Data flow of :func:`grpo_train_step` (ARCHITECTURE.md, "One GRPO step, as data"):

    TrajectoryBatch (train/batch.py; this DP rank's share, padded to [N, L])
      -> all-reduce the policy-token count over the DP group (the loss normalizer)
      -> Megatron's forward_backward_func over N / micro_batch_size micro-batches:
           GPTModel -> vocab-parallel logits [b, L, V/tp] (last PP stage only)
           -> megatron_recycle_kernels.token_logprobs(tp_group) -> log-probs [b, L-1]
           -> megatron_recycle_kernels.grpo_loss(normalizer=global count)
      -> optimizer.step() (Megatron's optimizer, train/optim.py: grad clipping, distributed optimizer)
      -> OptimizerParamScheduler.step() -> metrics dict

Alignment: ``loss_mask[:, t]`` refers to token ``t`` as the token being PREDICTED, so the
logits at position ``t - 1`` are scored against ``tokens[:, t]``; log-probs have shape
``[N, L - 1]`` and column ``j`` is the log-prob of ``tokens[:, j + 1]``.

Scaling (why the loss is multiplied by ``num_microbatches * dp_size``): grpo_loss already
divides by the global token count D, so summing its value over every micro-batch on every DP
rank gives the full-batch token mean. Megatron's schedule divides each micro-batch's loss by
the number of micro-batches, and DDP averages (not sums) gradients over the DP group; the
factor undoes both, so any micro-batch size and any DP size give the full-batch gradient.
Group packing (``pack_groups=True``, train/packing.py): each micro-batch of GRPO groups is
re-laid out so that a group's shared prompt is computed once; log-probs are gathered back to the
[N, L-1] layout, so the loss and its gradient are the padded batch's. Where the attention is not
the local one, padded rows are used. Padded rows are length-grouped
(:func:`_micro_batches`): longest first, each micro-batch cut after its own last loss position
(with PP > 1 the stages exchange the shapes; with VPP all are cut to the batch's last one).

Memory options (model.build.memory_options, ``model_options`` of setup_model_and_optimizer):
activation recomputation is Megatron's own (the group-attention plan stays on the attention
through the backward pass so that recomputed attention takes the same path). Under sequence
parallelism each rank holds [L/tp, b, h] between the tensor-parallel layers, so the forward pads
L (and packed rows) to a multiple of tp, and the output layer sees this rank's 1/tp of the
selected loss positions (:func:`_selected_sequence_parallel_forward`). Neither changes the loss or
its gradient beyond fp32 rounding (tests/train/test_step.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_recycle.train.batch import TrajectoryBatch
from megatron_recycle.train.packing import (
    GroupAttention,
    PackedRows,
    RopePositions,
    drop_group_plans,
    group_packed_layout,
    model_width,
    one_packed_shape,
    plans_always_apply,
    use_packing,
)

logger = logging.getLogger(__name__)

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------ logit selection
@dataclass
class LogitSelection:
    """The positions of the forward's [rows, S] token grid whose logits the loss reads.

    Only tokens that carry loss need logits: prompt, observation and padding positions skip the
    output layer (forward and backward) and never hold a [tokens x vocab] row. ``flat``: sorted
    row-major indices into the grid; ``targets``: the token each predicts; ``gather`` [n, L-1]:
    for each sequence position, its index into ``flat`` (loss-free positions point anywhere).
    """

    flat: torch.Tensor
    targets: torch.Tensor
    gather: torch.Tensor
    rows: int
    width: int

    @staticmethod
    def build(grid_index: torch.Tensor, grid_targets: torch.Tensor, target_mask: torch.Tensor,
              rows: int, width: int) -> LogitSelection:
        needed = grid_index[target_mask.bool()]
        flat = torch.unique(needed) if needed.numel() else grid_index.new_zeros(1)
        gather = torch.searchsorted(flat, grid_index).clamp(max=flat.numel() - 1)
        return LogitSelection(flat, grid_targets.reshape(-1)[flat], gather, rows, width)

    def hidden_index(self) -> torch.Tensor:
        """``flat`` in the [S * rows] order of Megatron's [s, b, h] hidden states."""
        return (self.flat % self.width) * self.rows + self.flat // self.width

    def to(self, device: torch.device) -> LogitSelection:
        return LogitSelection(self.flat.to(device), self.targets.to(device), self.gather.to(device),
                              self.rows, self.width)


def _selection_for(mb: TrajectoryBatch, packed: PackedRows | None, width: int | None = None) -> LogitSelection:
    if packed is not None:
        rows, pwidth = packed.tokens.shape
        return LogitSelection.build(packed.gather_index, packed.targets, mb.target_mask, rows, pwidth)
    width = width or mb.seq_length
    n, seq = mb.tokens.shape
    # the forward's grid is [n, width]: width > seq when the model pads the sequence (model_width)
    grid = torch.arange(n)[:, None] * width + torch.arange(seq - 1)[None]
    targets = torch.cat([mb.tokens[:, 1:], mb.tokens[:, :1]], dim=1)
    targets = F.pad(targets, (0, width - seq))
    return LogitSelection.build(grid, targets, mb.target_mask, n, width)


class _SelectedLogits:
    """Within the block, the model's output layer sees only the selected positions' hidden states
    (as a [K, 1, h] sequence), so the logits come out as [1, K, V/tp]."""

    def __init__(self, model: torch.nn.Module, select: LogitSelection) -> None:
        from megatron_recycle.model.build import unwrap_model

        gpt = unwrap_model(model)
        self.layer = getattr(gpt, "output_layer", None) if getattr(gpt, "post_process", False) else None
        self.index = select.hidden_index()

    def __enter__(self) -> None:
        if self.layer is None:
            return
        original = type(self.layer).forward.__get__(self.layer)
        index = self.index
        if getattr(self.layer, "sequence_parallel", False):
            self.layer.forward = partial(_selected_sequence_parallel_forward, original, index)
            return

        def forward(input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            s, b, h = input_.shape
            return original(input_.reshape(s * b, h).index_select(0, index).unsqueeze(1), *args, **kwargs)

        self.layer.forward = forward

    def __exit__(self, *exc: Any) -> None:
        if self.layer is not None and "forward" in self.layer.__dict__:
            del self.layer.forward


def _selected_sequence_parallel_forward(original: Callable, index: torch.Tensor, input_: torch.Tensor,
                                        *args: Any, **kwargs: Any) -> Any:
    """The output layer on the selected positions under sequence parallelism.

    The layer's input is this rank's [S/tp, b, h] part of the sequence and the layer all-gathers
    its input over the TP group. So: gather the whole sequence (backward: keep this rank's part),
    select the K positions (the same on every rank), pad K to a multiple of tp and hand the layer
    this rank's 1/tp of them (backward: all-gather, which with the layer's reduce-scatter sums
    the vocabulary shards' contributions), then drop the padding from the [K, 1, V/tp] logits."""
    from megatron.core import tensor_parallel

    tp = _ps().get_tensor_model_parallel_world_size()
    full = tensor_parallel.gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
    s, b, h = full.shape
    chosen = full.reshape(s * b, h).index_select(0, index)
    k = chosen.shape[0]
    chosen = F.pad(chosen, (0, 0, 0, -(-k // tp) * tp - k)).unsqueeze(1)
    logits, bias = original(tensor_parallel.scatter_to_sequence_parallel_region(chosen), *args, **kwargs)
    return logits[:k], bias


def _seq_multiple(model: torch.nn.Module) -> int:
    """What the forward's sequence length must be a multiple of: the TP size under sequence
    parallelism (each rank holds 1/tp of the sequence between the tensor-parallel layers), else 1."""
    from megatron_recycle.model.build import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    if config is not None and getattr(config, "sequence_parallel", False):
        return _ps().get_tensor_model_parallel_world_size()
    return 1


# ------------------------------------------------------------------------------- loss config
@dataclass
class GRPOLossConfig:
    """Knobs of the GRPO objective (METHOD.md section 3); passed through to grpo_loss."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float | None = None
    kl_beta: float = 0.0
    agg: str = "token-mean"
    max_len: int | None = None
    temperature: float = 1.0
    compute_entropy: bool = False  # report the token-mean entropy (one more pass in the kernel)

    def __post_init__(self) -> None:
        if self.agg not in AGG_MODES:
            raise ValueError(f"agg={self.agg!r} is not one of {AGG_MODES}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


# --------------------------------------------------------------------- parallel-state helpers
def _ps() -> Any:
    from megatron.core import parallel_state

    return parallel_state


def _tp_group() -> dist.ProcessGroup | None:
    """The TP group when TP > 1 (token_logprobs then reduces over the vocab shards), else None."""
    ps = _ps()
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def _dp_group_and_size() -> tuple[dist.ProcessGroup, int]:
    ps = _ps()
    if ps.get_context_parallel_world_size() != 1:
        raise NotImplementedError("context parallelism is not supported by the training step; use cp=1")
    return ps.get_data_parallel_group(), ps.get_data_parallel_world_size()


def _is_last_stage() -> bool:
    return _ps().is_pipeline_last_stage(ignore_virtual=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# Length-grouped micro-batches of padded rows (see _micro_batches). A switch for benchmarks and
# tests that compare against the batch-wide width (tools/bench_step.py --no-length-grouping).
LENGTH_GROUPING = True


def check_token_ids(batch: TrajectoryBatch, vocab_size: int) -> None:
    """Raise unless every token id of ``batch`` lies in the model's vocabulary [0, vocab_size).

    Once per batch, on the host where the batch is (one read of its min and max), before any
    micro-batch reaches the model: an id outside the vocabulary would otherwise stop a GPU run
    with a device-side assert in the embedding (or, under tensor parallelism, be embedded as
    zeros by every rank). The step's log-prob calls then skip token_logprobs' own check of the
    same ids (``validate_targets=False``), a host sync per micro-batch."""
    t = batch.tokens
    if t.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    if lo < 0 or hi >= vocab_size:
        bad = ((t < 0) | (t >= vocab_size)).nonzero()
        row, pos = bad[0].tolist()
        raise ValueError(
            f"token id {int(t[row, pos])} at row {row}, position {pos} lies outside the model's vocabulary "
            f"[0, {vocab_size}) ({len(bad)} such ids in the batch); the rollouts' tokenizer and the trained "
            "model must share one vocabulary, and padding must use a real id (the loss mask excludes it)"
        )


def _loss_free_rows_alone(mb: TrajectoryBatch) -> TrajectoryBatch:
    """A member without loss tokens, cut to its loss extent, would cut its group's shared prefix to
    (almost) nothing and make every other member recompute the prompt; it is packed as a group of its
    own instead (its log-probs carry no loss either way)."""
    if mb.group_ids is None:
        return mb
    lossless = ~mb.loss_mask.bool().any(dim=1)
    if not bool(lossless.any()):
        return mb
    gids = mb.group_ids.clone()
    rows = lossless.nonzero().flatten()
    top = int(gids.max()) + 1
    gids[rows] = torch.arange(top, top + rows.numel(), dtype=gids.dtype)
    return mb.replace(group_ids=gids)


def _micro_batches(
    batch: TrajectoryBatch, micro_batch_size: int, pack: bool = False, model_chunks: Sequence[torch.nn.Module] = (),
    select: bool = False, return_order: bool = False,
) -> list[TrajectoryBatch] | tuple[list[TrajectoryBatch], torch.Tensor | None]:
    """Cut this rank's batch into micro-batches (group-packed where possible), moved to the device.

    Padded rows where only the loss positions count (``select``: the train steps, loss-position
    log-probs) are length-grouped: the rows go longest first (a stable sort by
    TrajectoryBatch.loss_extent) and each micro-batch is cut to its own longest extent, so a
    micro-batch of short trajectories is not padded to the batch's longest. On one pipeline stage,
    and with PP > 1 where the stages exchange each micro-batch's shape first
    (``config.variable_seq_lengths``, model.build); virtual stages exchange one shape for all, so
    there every micro-batch is cut to the batch's longest extent, and group-packed layouts are
    padded to one shape (:func:`one_packed_shape`). The loss and the gradient are the same (each is a sum over sequences,
    normalized by global counts; the cut columns come after every loss position of the
    micro-batch, which causal attention never lets back in). ``return_order``: also return the row
    order used (None: the batch's own).
    """
    n = batch.num_sequences
    if micro_batch_size < 1 or n % micro_batch_size != 0:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} must divide this rank's {n} sequences; "
            f"pad the batch with build_batch(pad_rows_to_multiple_of={micro_batch_size})"
        )
    if model_chunks:
        from megatron_recycle.model.build import unwrap_model

        check_token_ids(batch, unwrap_model(model_chunks[0]).vocab_size)
    dev = _device()
    packing = use_packing(batch, pack, model_chunks)
    multiple = _seq_multiple(model_chunks[0]) if model_chunks else 1
    one_shape = bool(model_chunks) and not _shapes_may_vary(model_chunks[0])
    grouped = LENGTH_GROUPING and select and not packing and not one_shape
    order = None
    if grouped:
        order = torch.sort(batch.loss_extent(), descending=True, stable=True).indices
        if bool((order == torch.arange(n)).all()):
            order = None  # already longest first: plain row slices (views)
    elif LENGTH_GROUPING and select and one_shape:
        batch = batch.truncate(int(batch.loss_extent().max()))  # one width for all: the batch's own extent
    cuts = []
    for start in range(0, n, micro_batch_size):
        stop = start + micro_batch_size
        mb = batch.take(order[start:stop] if order is not None else slice(start, stop))
        if grouped:
            mb = mb.truncate(int(mb.loss_extent().max()))
        if packing and select:
            # only loss positions count: each member ends after its last loss token (and its
            # right padding goes even when the batch carries no lengths)
            extent = mb.loss_extent()
            mb = mb.replace(lengths=extent if mb.lengths is None else torch.minimum(mb.lengths, extent))
            mb = _loss_free_rows_alone(mb)
        cuts.append(mb)
    packs: list[PackedRows | None] = [None] * len(cuts)
    if packing:
        shape = one_packed_shape(cuts, multiple, model_width(batch.seq_length, multiple) * n) if one_shape else None
        if shape is not None or not one_shape:  # (under VPP, None: packing would save nothing)
            dense = not plans_always_apply(model_chunks)
            packs = [group_packed_layout(mb, width_multiple=multiple, shape=shape, dense_mask=dense) for mb in cuts]
    out = []
    for mb, packed in zip(cuts, packs):
        width = model_width(mb.seq_length, multiple)
        selection = _selection_for(mb, packed, width).to(dev) if select else None
        # the packed layout's attention plan is built here, with the other host-to-device copies
        # (a pageable copy waits for the device), not inside each forward of the schedule; the cut
        # was checked on the host, so its device copy is not checked again (no host sync)
        out.append(mb.to(dev, non_blocking=True, packed=None if packed is None else packed.to(dev).with_plan(),
                         select=selection))
    return (out, order) if return_order else out


def _schedule_shape(mbs: list[TrajectoryBatch], micro_batch_size: int, model: torch.nn.Module) -> tuple[int, int]:
    """(seq_length, micro_batch_size) for Megatron's schedule: the shape of the tensors the stages
    exchange when it is fixed (interleaved pipelines; otherwise each send carries its own)."""
    first = mbs[0]
    if first.packed is not None:
        return int(first.packed.tokens.shape[1]), int(first.packed.tokens.shape[0])
    return model_width(first.seq_length, _seq_multiple(model)), micro_batch_size


def _shapes_may_vary(model: torch.nn.Module) -> bool:
    """Whether micro-batches may differ in shape: one pipeline stage, or stages that exchange each
    micro-batch's shape first (``config.variable_seq_lengths``, set by model.build)."""
    from megatron_recycle.model.build import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    return _ps().get_pipeline_model_parallel_world_size() == 1 or bool(getattr(config, "variable_seq_lengths", False))


def schedule_rows(model_chunks: Sequence[torch.nn.Module], micro_batch_size: int) -> int:
    """The row multiple a rank's batch needs for Megatron's schedule: the micro-batch size, times
    the pipeline size under virtual stages (their interleaved schedule runs micro-batches in groups
    of PP, so it takes only a multiple of PP of them)."""
    if len(model_chunks) > 1:
        return micro_batch_size * _ps().get_pipeline_model_parallel_world_size()
    return micro_batch_size


def _fit_schedule(batch: TrajectoryBatch, micro_batch_size: int, model_chunks: Sequence[torch.nn.Module]) -> TrajectoryBatch:
    """The batch padded with all-masked rows (:meth:`TrajectoryBatch.pad_rows`) to what the schedule
    takes: a GRPO step's row count varies with the signal-bearing groups it drew, so under virtual
    stages it is rarely a multiple of micro_batch_size * PP. Without virtual stages, unchanged."""
    if micro_batch_size < 1 or batch.num_sequences % micro_batch_size != 0 or len(model_chunks) < 2:
        return batch  # (_micro_batches names a batch micro_batch_size does not divide)
    return batch.pad_rows(schedule_rows(model_chunks, micro_batch_size))


def _data_iterators(mbs: list[TrajectoryBatch], num_chunks: int) -> Any:
    # Interleaved (virtual) pipelines take one iterator per model chunk, each over all micro-batches.
    if num_chunks == 1:
        return iter(mbs)
    return [iter(mbs) for _ in range(num_chunks)]


# The logits' gradient is written over the logits (token_logprobs' inplace_backward): nothing reads
# the logits after the loss, and a second [tokens, V/tp] buffer is the step's largest allocation
# at a large vocabulary. Module-level so that a benchmark can compare both.
INPLACE_LOGITS_GRAD = True


def target_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
    packed: PackedRows | None = None, select: LogitSelection | None = None, validate_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [b, L-1] of tokens[:, 1:] from vocab-parallel logits [b, L, V/tp].

    Uses token_logprobs with the TP group, so the full vocabulary is never gathered. With
    ``packed``, the logits are the packed rows' [R, S, V/tp]; with ``select``, they are only the
    selected positions' [1, K, V/tp]. Either way the result is gathered back to the sequences'
    [n, L-1] layout (``tokens`` is always the unpacked [n, L]). ``validate_targets``: as in
    token_logprobs (False: the caller checked the ids, :func:`check_token_ids`; no host sync).
    """
    from megatron_recycle_kernels import token_logprobs

    b, seq, vshard = logits.shape
    if select is not None:
        targets, gather = select.targets, select.gather
    elif packed is not None:
        targets, gather = packed.targets.reshape(-1), packed.gather_index
    else:
        if seq != tokens.shape[1]:  # the model padded the sequence (sequence parallelism): drop the padding
            logits, seq = logits[:, : tokens.shape[1]], tokens.shape[1]
        # Score every position (a free view of the logits; slicing off the last position would copy
        # them) against the next token; the last position gets a dummy target and is dropped.
        targets, gather = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).reshape(-1), None
    out = token_logprobs(logits.reshape(-1, vshard), targets, temperature=temperature, tp_group=_tp_group(),
                         return_entropy=return_entropy, inplace_backward=INPLACE_LOGITS_GRAD,
                         validate_targets=validate_targets)
    if gather is not None:
        if return_entropy:
            lp, ent = out
            return lp[gather], ent[gather]
        return out[gather]
    if return_entropy:
        lp, ent = out
        return lp.view(b, seq)[:, :-1], ent.view(b, seq)[:, :-1]
    return out.view(b, seq)[:, :-1]


def _forward_step(loss_fn: Callable, data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    """Megatron forward_step_func: run the model on the next micro-batch; loss_fn runs on the last stage."""
    mb = next(data_iterator)
    with contextlib.ExitStack() as stack:
        if mb.select is not None:
            stack.enter_context(_SelectedLogits(model, mb.select))
        if mb.packed is not None:
            p = mb.packed
            stack.enter_context(RopePositions(model, p.position_ids, p.max_position))
            stack.enter_context(GroupAttention(model, p))
            output = model(p.tokens, p.position_ids, p.attention_mask)
        else:
            tokens = mb.tokens
            b, seq = tokens.shape
            width = model_width(seq, _seq_multiple(model))
            if width != seq:  # sequence parallelism: pad to a multiple of tp at the end
                tokens = F.pad(tokens, (0, width - seq))
            position_ids = torch.arange(width, device=tokens.device).unsqueeze(0).expand(b, width)
            # attention_mask=None: the local attention builds the causal mask; right padding sits
            # after every real token, so it never influences a real position.
            output = model(tokens, position_ids, None)
    return output, partial(loss_fn, mb)


def _collect_last_stage(obj: Any) -> Any:
    """Send a Python object from the last PP stage to every stage of this pipeline."""
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return holder[0]


# ----------------------------------------------------------------------- log-prob-only forward
@torch.no_grad()
def compute_logprobs(
    model_chunks: list[torch.nn.Module],
    batch: TrajectoryBatch,
    micro_batch_size: int,
    temperature: float = 1.0,
    pack_groups: bool = True,
    only_loss_positions: bool = False,
) -> torch.Tensor:
    """Per-token log-probs [N, L-1] (float32, CPU) of the batch's targets, without gradients.

    ``only_loss_positions``: compute logits only where loss_mask is 1 (old/ref log-probs for the
    loss); the other positions then hold arbitrary values instead of valid log-probs.

    For old and reference log-probs. Only the last PP stage has logits; the result is broadcast
    over the pipeline group so that every rank of this DP replica (all TP and PP ranks) returns
    the same tensor. Without ``only_loss_positions`` masked positions of a row hold valid
    log-probs too (the mask is not applied); a row's padding columns (past its own length) hold
    valid ones only with ``pack_groups=False``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows_asked = batch.num_sequences
    batch = _fit_schedule(batch, micro_batch_size, model_chunks)
    mbs, order = _micro_batches(batch, micro_batch_size, pack_groups, model_chunks, select=only_loss_positions,
                                return_order=True)
    seq_length, mb_rows = _schedule_shape(mbs, micro_batch_size, model_chunks[0])

    def loss_fn(mb: TrajectoryBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp = target_logprobs(output, mb.tokens, temperature, packed=mb.packed, select=mb.select,
                             validate_targets=False).float()  # _micro_batches checked the ids
        return output.new_zeros(()), {"logprobs": F.pad(lp, (0, batch.seq_length - 1 - lp.shape[1]))}

    was_training = [m.training for m in model_chunks]
    for m in model_chunks:
        m.eval()
    try:
        out = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=_data_iterators(mbs, len(model_chunks)),
            model=model_chunks,
            num_microbatches=len(mbs),
            seq_length=seq_length,
            micro_batch_size=mb_rows,
            forward_only=True,
        )
    finally:
        for m, t in zip(model_chunks, was_training):
            m.train(t)
    result = torch.empty(batch.num_sequences, batch.seq_length - 1, dtype=torch.float32, device=_device())
    if _is_last_stage():
        rows = torch.cat([d["logprobs"] for d in out], dim=0)
        if order is None:
            result.copy_(rows)
        else:  # length-grouped micro-batches: back to the batch's row order
            result[order.to(result.device)] = rows
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return result[:rows_asked].cpu()


# --------------------------------------------------------------------------- the train steps
def _global_counts(local: list[float], group: dist.ProcessGroup) -> list[float]:
    """Sum counts over the DP group (one all_reduce, float64 so large counts stay exact)."""
    t = torch.tensor([float(x) for x in local], dtype=torch.float64, device=_device())
    dist.all_reduce(t, group=group)
    return t.tolist()


def _run_train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    batch: TrajectoryBatch,
    micro_batch_size: int,
    loss_fn: Callable,
    dp_group: dist.ProcessGroup,
    on_phase: Callable[[str], None] | None = None,
    pack_groups: bool = False,
    real_rows: int | None = None,
) -> dict[str, float]:
    """The shared machinery: zero grads, forward_backward over micro-batches, optimizer, LR schedule.

    ``real_rows``: the batch's rows before :func:`_fit_schedule` appended all-masked ones
    (``schedule_pad_rows`` counts those, summed over DP).

    ``loss_fn(mb, output)`` returns (scaled loss, dict of SUMS over the micro-batch); the sums are
    added over micro-batches and DP ranks and returned (plus grad norm, lr, timings).
    ``on_phase`` (benchmarks) is called with "forward_backward", "optimizer" and "end" as each begins.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    phase = on_phase or (lambda name: None)
    mbs = _micro_batches(batch, micro_batch_size, pack_groups, model_chunks, select=True)
    seq_length, mb_rows = _schedule_shape(mbs, micro_batch_size, model_chunks[0])
    for m in model_chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    lr = float(optimizer.param_groups[0]["lr"])

    _sync()
    phase("forward_backward")
    t0 = time.perf_counter()
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=_data_iterators(mbs, len(model_chunks)),
        model=model_chunks,
        num_microbatches=len(mbs),
        seq_length=seq_length,
        micro_batch_size=mb_rows,
        forward_only=False,
    )
    drop_group_plans(model_chunks)
    _sync()
    phase("optimizer")
    t1 = time.perf_counter()
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    _sync()
    t2 = time.perf_counter()
    phase("end")

    # Sums over micro-batches (last stage) -> every PP stage -> summed over DP ranks.
    sums: dict[str, float] = {}
    if _is_last_stage():
        for d in reduced:
            for k, v in d.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    sums = _collect_last_stage(sums)
    # this replica's layout counters, summed over DP with the rest (every stage has the same ones)
    sums.update(
        num_microbatches=float(len(mbs)),
        # all-masked rows virtual stages needed (_fit_schedule); the layout counters below count
        # their positions as any row's, as the padded form of the same schedule would run them too
        schedule_pad_rows=float(batch.num_sequences - (batch.num_sequences if real_rows is None else real_rows)),
        packed_saved_tokens=float(sum(mb.packed.saved_tokens for mb in mbs if mb.packed is not None)),
        # padding the length-grouped micro-batches did not train (positions: rows x columns cut)
        length_cut_tokens=float(sum((batch.seq_length - mb.seq_length) * mb.num_sequences
                                    for mb in mbs if mb.packed is None)),
    )
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(vec, group=dp_group)
    totals = dict(zip(keys, vec.tolist()))
    totals.update(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=lr,
        update_successful=float(bool(update_successful)),
        **{"time/forward_backward_s": t1 - t0, "time/optimizer_s": t2 - t1},
    )
    return totals


def grpo_train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    batch: TrajectoryBatch,
    micro_batch_size: int,
    loss_cfg: GRPOLossConfig | None = None,
    on_phase: Callable[[str], None] | None = None,
    pack_groups: bool = True,
) -> dict[str, float]:
    """One GRPO optimizer step on this DP rank's share of the batch; returns global metrics.

    ``pack_groups``: compute each group's shared prefix once (module docstring); used when the
    batch has group_ids and the attention is the local one (under virtual pipeline stages, when
    the layouts padded to one shape still save positions).

    ``batch.old_logprobs`` None means on-policy (old = current, detached: ratio 1). Metrics:
    loss (full-batch value), grad_norm, lr, token and sequence counts, token-weighted means of
    grpo_loss's stats (clip fractions, ratio, KLs), and times per phase. ``on_phase``: an
    optional callback at each phase boundary (see _run_train_step; used by tools/bench_step.py).
    """
    from megatron_recycle_kernels import grpo_loss

    cfg = loss_cfg or GRPOLossConfig()
    if batch.advantages is None:
        raise ValueError("grpo_train_step needs batch.advantages ([N]); build it with build_batch(advantages=...)")
    dp_group, dp_size = _dp_group_and_size()
    _sync()
    t_start = time.perf_counter()

    # The normalizer: the global token count (token-mean) or the global number of sequences
    # that hold a policy token (seq-mean-*), over the whole batch on all DP ranks.
    global_tokens, global_rows = _global_counts(
        [batch.target_mask.sum().item(), (batch.target_mask.sum(dim=1) > 0).sum().item()], dp_group
    )
    if global_tokens == 0:
        raise ValueError("the batch has no policy tokens (every loss_mask is 0) on any DP rank; nothing to train")
    normalizer = global_tokens if cfg.agg == "token-mean" else global_rows
    real_rows = batch.num_sequences
    batch = _fit_schedule(batch, micro_batch_size, model_chunks)
    num_mb = batch.num_sequences // micro_batch_size if micro_batch_size > 0 else 0
    scale = float(num_mb * dp_size)

    def loss_fn(mb: TrajectoryBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        entropy = None
        if cfg.compute_entropy:
            lp, entropy = target_logprobs(output, mb.tokens, cfg.temperature, return_entropy=True, packed=mb.packed,
                                          select=mb.select, validate_targets=False)  # _micro_batches checked the ids
        else:
            lp = target_logprobs(output, mb.tokens, cfg.temperature, packed=mb.packed, select=mb.select,
                                 validate_targets=False)
        old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
        loss, stats = grpo_loss(
            lp, old, mb.advantages, mb.target_mask, ref_logprobs=mb.ref_logprobs,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, clip_c=cfg.clip_c, kl_beta=cfg.kl_beta,
            agg=cfg.agg, normalizer=normalizer, max_len=cfg.max_len,
        )
        n_tok = mb.target_mask.sum()
        sums = {"loss": loss.detach(), "tokens": n_tok}
        # stats are token means over this micro-batch: weight by its token count, divide later.
        sums.update({f"sum/{k}": v.detach() * n_tok for k, v in stats.items()})
        if entropy is not None:
            sums["sum/entropy"] = (entropy.detach() * mb.target_mask).sum()
        return loss * scale, sums

    out = _run_train_step(model_chunks, optimizer, scheduler, batch, micro_batch_size, loss_fn, dp_group, on_phase,
                          real_rows=real_rows,
                          pack_groups=pack_groups)
    metrics = {"loss": out.pop("loss"), "tokens": out.pop("tokens"), "sequences": global_rows}
    for k in [k for k in out if k.startswith("sum/")]:
        metrics[k[4:]] = out.pop(k) / max(global_tokens, 1.0)
    metrics.update(out)
    _sync()
    metrics["time/step_s"] = time.perf_counter() - t_start
    return metrics


def sft_train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    batch: TrajectoryBatch,
    micro_batch_size: int,
    on_phase: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """One SFT step: masked next-token cross-entropy, normalized by the global masked-token count.

    Same machinery as grpo_train_step (forward_backward over micro-batches, optimizer, schedule);
    ``loss`` is the full-batch mean negative log-likelihood per policy token.
    """
    dp_group, dp_size = _dp_group_and_size()
    _sync()
    t_start = time.perf_counter()
    (global_tokens,) = _global_counts([batch.target_mask.sum().item()], dp_group)
    if global_tokens == 0:
        raise ValueError("the SFT batch has no loss tokens (every loss_mask is 0) on any DP rank")
    real_rows = batch.num_sequences
    batch = _fit_schedule(batch, micro_batch_size, model_chunks)
    num_mb = batch.num_sequences // micro_batch_size if micro_batch_size > 0 else 0
    scale = float(num_mb * dp_size)

    def loss_fn(mb: TrajectoryBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp = target_logprobs(output, mb.tokens, 1.0, packed=mb.packed, select=mb.select,
                             validate_targets=False)  # _micro_batches checked the ids
        loss = -(lp * mb.target_mask).sum() / global_tokens
        return loss * scale, {"loss": loss.detach(), "tokens": mb.target_mask.sum()}

    metrics = _run_train_step(model_chunks, optimizer, scheduler, batch, micro_batch_size, loss_fn, dp_group, on_phase,
                              real_rows=real_rows)
    _sync()
    metrics["time/step_s"] = time.perf_counter() - t_start
    return metrics

