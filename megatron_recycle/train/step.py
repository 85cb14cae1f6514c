"""One GRPO (or SFT) training step on a megatron-core GPTModel, readable top to bottom.

Data flow of :func:`grpo_train_step` (ARCHITECTURE.md, "One GRPO step, as data"):

    TrajectoryBatch (this DP rank's share, padded to [N, L])
      -> all-reduce the policy-token count over the DP group (the loss normalizer)
      -> Megatron's forward_backward_func over N / micro_batch_size micro-batches:
           GPTModel -> vocab-parallel logits [b, L, V/tp] (last PP stage only)
           -> megatron_recycle_kernels.token_logprobs(tp_group) -> log-probs [b, L-1]
           -> megatron_recycle_kernels.grpo_loss(normalizer=global count)
      -> optimizer.step() (Megatron's optimizer: grad clipping, distributed optimizer)
      -> OptimizerParamScheduler.step() -> metrics dict

Alignment: ``loss_mask[:, t]`` refers to token ``t`` as the token being PREDICTED, so the
logits at position ``t - 1`` are scored against ``tokens[:, t]``; log-probs have shape
``[N, L - 1]`` and column ``j`` is the log-prob of ``tokens[:, j + 1]``.

Scaling (why the loss is multiplied by ``num_microbatches * dp_size``): grpo_loss already
divides by the global token count D, so summing its value over every micro-batch on every DP
rank gives the full-batch token mean. Megatron's schedule divides each micro-batch's loss by
the number of micro-batches, and DDP averages (not sums) gradients over the DP group; the
factor undoes both, so any micro-batch size and any DP size give the full-batch gradient.
Group packing (``pack_groups=True``): the K trajectories of a GRPO group begin with the same
prompt. Each micro-batch is re-laid out so that a group's shared prefix is
computed once: one row per group holds [prefix][suffix 1]...[suffix K] with a tree attention
mask (a suffix sees the prefix and itself, causally) and RoPE positions that restart after the
prefix for every suffix. Log-probs are gathered back to the [N, L-1] layout, so the loss and
its gradient are the padded batch's (equal to fp32 rounding; tests check it) at a fraction of
the tokens: the prefix is forwarded and back-propagated once instead of K times, and padding
disappears. The prefix stops before the first token that carries loss in any member, so a
token with loss is never shared. THD/cu_seqlens packing (flash attention) is not used. Under
pipeline parallelism every stage builds the same layout from the same micro-batch and the
stages exchange each packed micro-batch's [width, rows] shape first (``config.variable_seq_lengths``);
virtual pipeline stages exchange one shape for all micro-batches, so there the packed layouts are
padded to the largest one (or the rows stay padded when that would not save positions). Where
the attention is not the local one, padded rows are used. Padded rows are length-grouped
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
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

logger = logging.getLogger(__name__)

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------------------- batch
@dataclass
class TrajectoryBatch:
    """A right-padded batch of trajectories for one DP rank.

    tokens [N, L] int64; loss_mask [N, L] float (1 where tokens[:, t] is a policy token to
    predict; column 0 must be 0); advantages [N]; old/ref log-probs [N, L-1] or None.
    group_ids [N] (optional): rows with the same id are one GRPO group (what group packing
    shares a prefix over); lengths [N] (optional): real lengths before right padding.
    ``packed`` and ``select`` are filled per micro-batch by the step itself (group_packed_layout,
    LogitSelection).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    packed: PackedRows | None = None
    select: LogitSelection | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [N, L], got shape {tuple(self.tokens.shape)}")
        n, seq = self.tokens.shape
        if seq < 2:
            raise ValueError(f"sequences need at least 2 tokens to predict anything, got L={seq}")
        if self.tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64/int32 ids, got {self.tokens.dtype}")
        self.tokens = self.tokens.long()
        if tuple(self.loss_mask.shape) != (n, seq):
            raise ValueError(
                f"loss_mask shape {tuple(self.loss_mask.shape)} != tokens shape {(n, seq)}"
            )
        self.loss_mask = self.loss_mask.to(torch.float32)
        if bool((self.loss_mask[:, 0] != 0).any()):
            raise ValueError(
                "loss_mask[:, 0] must be 0: the first token has no logits that predict it "
                "(mark prompt tokens 0; the mask refers to the token being predicted)"
            )
        if self.advantages is not None:
            if tuple(self.advantages.shape) != (n,):
                raise ValueError(f"advantages must be [N]={n}, got {tuple(self.advantages.shape)}")
            self.advantages = self.advantages.to(torch.float32)
        for name in ("group_ids", "lengths"):
            v = getattr(self, name)
            if v is not None:
                if tuple(v.shape) != (n,):
                    raise ValueError(f"{name} must be [N]={n}, got {tuple(v.shape)}")
                setattr(self, name, v.long())
        if self.lengths is not None and bool(((self.lengths < 2) | (self.lengths > seq)).any()):
            raise ValueError(f"lengths must be in [2, L={seq}], got {self.lengths.tolist()}")
        for name in ("old_logprobs", "ref_logprobs"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape) != (n, seq - 1):
                raise ValueError(
                    f"{name} must be [N, L-1]={(n, seq - 1)} (column j scores tokens[:, j+1]), "
                    f"got {tuple(v.shape)}"
                )

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def target_mask(self) -> torch.Tensor:
        """Loss mask aligned with the log-probs: [N, L-1]."""
        return self.loss_mask[:, 1:]

    def rows(self, start: int, stop: int) -> TrajectoryBatch:
        """Rows ``start:stop`` of every field (a micro-batch or a DP shard; views, no copies)."""
        return self.take(slice(start, stop))

    def replace(self, **fields: Any) -> TrajectoryBatch:
        """A copy with some fields replaced (e.g. old_logprobs from compute_logprobs)."""
        return dataclasses.replace(self, **fields)

    def take(self, index: torch.Tensor | slice) -> TrajectoryBatch:
        """The rows ``index`` (a LongTensor, in that order, or a slice) of every field."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return TrajectoryBatch(
            tokens=self.tokens[index], loss_mask=self.loss_mask[index], advantages=pick(self.advantages),
            old_logprobs=pick(self.old_logprobs), ref_logprobs=pick(self.ref_logprobs),
            group_ids=pick(self.group_ids), lengths=pick(self.lengths),
        )

    def truncate(self, width: int) -> TrajectoryBatch:
        """The first ``width`` columns (log-probs: ``width - 1``); lengths are clipped to it."""
        if not 2 <= width <= self.seq_length:
            raise ValueError(f"width={width} must be in [2, L={self.seq_length}]")
        if width == self.seq_length:
            return self
        cut = lambda t: None if t is None else t[:, : width - 1]  # noqa: E731
        return TrajectoryBatch(
            tokens=self.tokens[:, :width], loss_mask=self.loss_mask[:, :width], advantages=self.advantages,
            old_logprobs=cut(self.old_logprobs), ref_logprobs=cut(self.ref_logprobs), group_ids=self.group_ids,
            lengths=None if self.lengths is None else self.lengths.clamp(max=width),
        )

    def loss_extent(self) -> torch.Tensor:
        """[N]: the tokens each row needs for its loss: up to its last target (loss_mask 1), at least 2.
        Causal attention makes the later columns irrelevant to every log-prob that carries loss."""
        seq = self.seq_length
        has = self.loss_mask > 0
        last = seq - 1 - has.flip(dims=[1]).int().argmax(dim=1)  # the last target's column
        last = torch.where(has.any(dim=1), last, torch.ones_like(last))
        return (last + 1).clamp(min=2)


def build_batch(
    token_ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    advantages: Sequence[float] | torch.Tensor | None = None,
    pad_token_id: int = 0,
    pad_length_to_multiple_of: int = 1,
    pad_rows_to_multiple_of: int = 1,
    group_ids: Sequence[int] | None = None,
) -> TrajectoryBatch:
    """Right-pad lists of token ids and loss masks into a TrajectoryBatch (real lengths kept).

    ``group_ids`` (one per sequence) mark GRPO groups for group packing; padding rows get ids
    of their own.

    Extra rows added to reach ``pad_rows_to_multiple_of`` (so that N divides into micro-batches)
    are all padding with mask 0 and advantage 0: they contribute nothing to loss or gradient.
    A mask may mark the first token of a sequence; that is an error (nothing predicts it).
    """
    if len(token_ids) == 0:
        raise ValueError("build_batch needs at least one sequence")
    if len(token_ids) != len(loss_masks):
        raise ValueError(f"{len(token_ids)} token sequences but {len(loss_masks)} loss masks")
    for i, (t, m) in enumerate(zip(token_ids, loss_masks)):
        if len(t) != len(m):
            raise ValueError(f"sequence {i}: {len(t)} tokens but {len(m)} mask entries")
    if pad_length_to_multiple_of < 1 or pad_rows_to_multiple_of < 1:
        raise ValueError(
            f"pad multiples must be >= 1, got length {pad_length_to_multiple_of}, rows {pad_rows_to_multiple_of}"
        )
    longest = max(2, max(len(t) for t in token_ids))
    seq = -(-longest // pad_length_to_multiple_of) * pad_length_to_multiple_of
    n = -(-len(token_ids) // pad_rows_to_multiple_of) * pad_rows_to_multiple_of
    tokens = torch.full((n, seq), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, seq), dtype=torch.float32)
    for i, (t, m) in enumerate(zip(token_ids, loss_masks)):
        tokens[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
        mask[i, : len(m)] = torch.as_tensor(list(m), dtype=torch.float32)
    adv = None
    if advantages is not None:
        a = torch.as_tensor(advantages, dtype=torch.float32).flatten()
        if a.numel() != len(token_ids):
            raise ValueError(f"{a.numel()} advantages for {len(token_ids)} sequences")
        adv = torch.zeros(n, dtype=torch.float32)
        adv[: a.numel()] = a
    lengths = torch.full((n,), 2, dtype=torch.long)
    lengths[: len(token_ids)] = torch.tensor([max(2, len(t)) for t in token_ids], dtype=torch.long)
    gids = None
    if group_ids is not None:
        if len(group_ids) != len(token_ids):
            raise ValueError(f"{len(group_ids)} group ids for {len(token_ids)} sequences")
        gids = torch.empty(n, dtype=torch.long)
        gids[: len(token_ids)] = torch.as_tensor(list(group_ids), dtype=torch.long)
        top = int(gids[: len(token_ids)].max()) + 1
        gids[len(token_ids):] = torch.arange(top, top + n - len(token_ids))
    return TrajectoryBatch(tokens=tokens, loss_mask=mask, advantages=adv, group_ids=gids, lengths=lengths)


def shard_for_data_parallel(batch: TrajectoryBatch, dp_rank: int, dp_size: int) -> TrajectoryBatch:
    """The contiguous share of a global batch that DP rank ``dp_rank`` trains on."""
    n = batch.num_sequences
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if n % dp_size != 0:
        raise ValueError(
            f"{n} sequences do not split evenly over {dp_size} DP ranks; "
            f"pad with build_batch(pad_rows_to_multiple_of={dp_size} * micro_batch_size)"
        )
    share = n // dp_size
    return batch.rows(dp_rank * share, (dp_rank + 1) * share)


# ------------------------------------------------------------------------------ group packing
@dataclass
class PackedRows:
    """A micro-batch re-laid out by group: [shared prefix][suffix 1]...[suffix K], groups side by side.

    tokens, targets (the token each position predicts; 0 where none), position_ids: [R, S];
    attention_mask [R, 1, S, S] bool, True = masked (Megatron's convention), or [R, 1, 1, 1]
    (model.attention.plan_only_mask) where the attention runs by the plan of ``spans``; gather_index
    [n, L-1]: for sequence i, the flat position in [R * S] whose log-prob scores tokens[i, j+1]
    (positions past a sequence's end point at an arbitrary valid position; they carry no loss).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor
    # padded-layout positions not computed any more (prefix reuse + padding); negative when a
    # micro-batch mixes one long group with short rows, which are then padded to its width
    saved_tokens: int
    # per group: (row, prefix offset, shared prefix length, [(offset, length) of each member's
    # suffix]); the local attention computes only these blocks (model/attention.py GroupAttentionPlan)
    spans: list[tuple[int, int, int, list[tuple[int, int]]]] | None = None

    def to(self, device: torch.device) -> PackedRows:
        return PackedRows(self.tokens.to(device), self.targets.to(device), self.position_ids.to(device),
                          self.attention_mask.to(device), self.gather_index.to(device), self.saved_tokens,
                          self.spans)


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
    # the forward's grid is [n, width]: width > seq when the model pads the sequence (_model_width)
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


def _model_width(seq: int, multiple: int) -> int:
    return -(-seq // multiple) * multiple


def shared_prefix_length(tokens: torch.Tensor, loss_mask: torch.Tensor, lengths: Sequence[int]) -> int:
    """How many leading tokens a group can share: the common prefix, cut one token before the first
    token that carries loss in any member (and before the shortest member's last token), minus one
    so that the last shared token is repeated in every suffix and predicts that member's own next
    token. 0 means no sharing."""
    if tokens.shape[0] < 2:
        return 0
    shortest = min(lengths)
    t = tokens[:, :shortest]
    same = (t == t[:1]).all(dim=0)
    common = int(same.long().cumprod(0).sum())
    has_loss = loss_mask[:, :shortest].bool().any(dim=0)
    first_loss = int(has_loss.nonzero()[0]) if bool(has_loss.any()) else shortest
    return max(min(common, first_loss) - 1, 0)


PACK_ROW_TOKENS = 2048  # groups share a packed row up to this width (a dense tree mask, where needed, is [rows, S, S])


def _rows_for_groups(sizes: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Assign groups (by packed size) to as few rows as keep every row within
    max(row_tokens, largest group): longest-first into the least-filled row, for the smallest row
    count that fits. Returns the group indices of each row, in placement order."""
    cap = max(max(sizes), row_tokens)
    order = sorted(range(len(sizes)), key=lambda g: -sizes[g])
    for rows in range(max(1, -(-sum(sizes) // cap)), len(sizes) + 1):
        fill, members = [0] * rows, [[] for _ in range(rows)]
        for g in order:
            r = min(range(rows), key=fill.__getitem__)
            fill[r] += sizes[g]
            members[r].append(g)
        if max(fill) <= cap:
            return [m for m in members if m]
    return [[g] for g in order]


def group_packed_layout(
    batch: TrajectoryBatch, row_tokens: int = PACK_ROW_TOKENS, width_multiple: int = 1,
    shape: tuple[int, int] | None = None, dense_mask: bool = True,
) -> PackedRows:
    """The group-packed layout of ``batch`` (needs group_ids; lengths default to L).

    Each group becomes [shared prefix][suffix 1]...[suffix K]; groups are laid side by side in as
    few rows as keep each row within max(row_tokens, largest group), so the rows carry almost no
    padding. Attention stays within a group (tree mask), RoPE positions restart per group. The row
    width is padded to a multiple of ``width_multiple`` (the TP size under sequence parallelism).
    ``shape`` (rows, width): pad the layout to it with padding rows and columns (every micro-batch
    of an interleaved pipeline has one shape); it must hold the layout. ``dense_mask`` False: the
    attention mask is model.attention.plan_only_mask, for attention that runs by the
    GroupAttentionPlan of ``spans`` (the dense [rows, 1, S, S] mask is O(S^2) to build and hold)."""
    if batch.group_ids is None:
        raise ValueError("group_packed_layout needs batch.group_ids (build_batch(group_ids=...))")
    n, seq = batch.tokens.shape
    lengths = batch.lengths.tolist() if batch.lengths is not None else [seq] * n
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        groups.setdefault(g, []).append(i)
    plan = []
    for members in groups.values():
        lens = [lengths[i] for i in members]
        s = shared_prefix_length(batch.tokens[members], batch.loss_mask[members], lens)
        plan.append((members, s, s + sum(ln - s for ln in lens)))
    layout = _rows_for_groups([p[2] for p in plan], row_tokens)
    rows = len(layout)
    width = max(sum(plan[g][2] for g in row) for row in layout)
    width = _model_width(width, width_multiple)
    if shape is not None:
        if shape[0] < rows or shape[1] < width:
            raise ValueError(f"shape={shape} cannot hold the packed layout of {rows} rows x {width} positions")
        rows, width = shape
    tokens = torch.zeros(rows, width, dtype=torch.long)
    targets = torch.zeros(rows, width, dtype=torch.long)
    positions = torch.zeros(rows, width, dtype=torch.long)
    group_of = torch.full((rows, width), -1, dtype=torch.long)  # -1 = padding
    segment = torch.full((rows, width), -1, dtype=torch.long)  # 0 = shared prefix, k = member k
    gather = torch.zeros(n, seq - 1, dtype=torch.long)
    spans: list[tuple[int, int, int, list[tuple[int, int]]]] = []
    for r, row_groups in enumerate(layout):
        off = 0
        for g in row_groups:
            members, s, size = plan[g]
            base = r * width
            start = off
            first = batch.tokens[members[0]]
            tokens[r, off : off + s] = first[:s]
            targets[r, off : off + s] = first[1 : s + 1]
            positions[r, off : off + s] = torch.arange(s)
            segment[r, off : off + s] = 0
            group_of[r, off : off + size] = g
            spans.append((r, start, s, []))
            off += s
            for k, i in enumerate(members, start=1):
                ln = lengths[i]
                span = ln - s
                tokens[r, off : off + span] = batch.tokens[i, s:ln]
                targets[r, off : off + span - 1] = batch.tokens[i, s + 1 : ln]
                positions[r, off : off + span] = torch.arange(s, ln)
                segment[r, off : off + span] = k
                spans[-1][3].append((off, span))
                gather[i, :s] = base + start + torch.arange(s)
                gather[i, s : ln - 1] = base + off + torch.arange(ln - 1 - s)
                gather[i, ln - 1 :] = base + off
                off += span
    saved = n * seq - rows * width
    if not dense_mask:
        from megatron_recycle.model.attention import plan_only_mask

        return PackedRows(tokens, targets, positions, plan_only_mask(rows), gather, saved, spans)
    # a position sees the earlier positions of its own group's prefix and of its own suffix;
    # padding forms one segment of its own per row (it sees only earlier padding)
    same_group = group_of[:, :, None] == group_of[:, None, :]
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & same_group & ((q == k) | (k == 0))
    return PackedRows(tokens, targets, positions, ~allowed[:, None], gather, saved, spans)


def packing_supported(model_chunks: Sequence[torch.nn.Module]) -> str | None:
    """None when group packing can run on these chunks, else the reason it cannot."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_recycle.model.build import unwrap_model

    if _ps().get_pipeline_model_parallel_world_size() > 1 and not model_chunks:
        return "pipeline parallelism without the model chunks (the stages' shape exchange is unknown)"
    for chunk in model_chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            if not isinstance(layer.self_attention.core_attention, DotProductAttention):
                return ("the attention is not megatron-core's local DotProductAttention (an arbitrary "
                        "mask is needed; transformer-engine's causal kernels ignore it)")
    return None


_PACKING_NOTED: set[str] = set()


def _use_packing(batch: TrajectoryBatch, pack: bool, model_chunks: Sequence[torch.nn.Module]) -> bool:
    if not pack or batch.group_ids is None:
        return False
    reason = packing_supported(model_chunks)
    if reason is not None:
        if reason not in _PACKING_NOTED:
            logger.warning("group packing is off (%s); training on padded rows", reason)
            _PACKING_NOTED.add(reason)
        return False
    return True


class _RopePositions:
    """Within the block, the model's RoPE uses per-token ``position_ids`` [b, S] (packed rows)
    instead of 0..S-1. megatron-core's GPTModel derives RoPE from the sequence length alone."""

    def __init__(self, model: torch.nn.Module, position_ids: torch.Tensor) -> None:
        from megatron_recycle.model.build import unwrap_model

        self.rope = getattr(unwrap_model(model), "rotary_pos_emb", None)
        self.position_ids = position_ids

    def __enter__(self) -> None:
        if self.rope is None:
            return
        table_fn = type(self.rope).forward.__get__(self.rope)
        pos = self.position_ids

        def forward(max_seq_len: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            table = table_fn(max(max_seq_len, int(pos.max()) + 1), *args, **kwargs)  # [S, 1, 1, D]
            return table[:, 0, 0, :][pos.t()].unsqueeze(2)  # [S, b, 1, D]

        self.rope.forward = forward

    def __exit__(self, *exc: Any) -> None:
        if self.rope is not None and "forward" in self.rope.__dict__:
            del self.rope.forward


class _GroupAttention:
    """Within the block, the SDPA core attention of every layer computes only the blocks of the
    group tree mask (model/attention.py GroupAttentionPlan) when called with ``packed``'s mask."""

    def __init__(self, model: torch.nn.Module, packed: PackedRows) -> None:
        from megatron_recycle.model.attention import SDPADotProductAttention
        from megatron_recycle.model.build import unwrap_model

        decoder = getattr(unwrap_model(model), "decoder", None)
        layers = getattr(decoder, "layers", []) if decoder is not None else []
        self.cores = [layer.self_attention.core_attention for layer in layers
                      if isinstance(getattr(layer.self_attention, "core_attention", None), SDPADotProductAttention)]
        self.packed = packed
        self.plan: Any = None

    def __enter__(self) -> None:
        from megatron_recycle.model.attention import GroupAttentionPlan

        p = self.packed
        if not self.cores or not p.spans:
            return
        self.plan = GroupAttentionPlan.build(p.spans, p.tokens.shape[0], p.tokens.shape[1], p.attention_mask)
        for core in self.cores:
            core.group_plans = (*core.__dict__.get("group_plans", ()), self.plan)

    def __exit__(self, *exc: Any) -> None:
        plan = self.plan
        if plan is None or (self.cores and _recomputes(self.cores[0])):
            return  # the backward pass recomputes the attention with this plan; drop_group_plans ends it
        for core in self.cores:
            left = tuple(q for q in core.__dict__.get("group_plans", ()) if q is not plan)
            if left:
                core.group_plans = left
            else:
                core.__dict__.pop("group_plans", None)


def _recomputes(core: torch.nn.Module) -> bool:
    return core.training and getattr(core.config, "recompute_granularity", None) is not None


def drop_group_plans(modules: Sequence[torch.nn.Module]) -> None:
    """Remove every group-attention plan left on the attention of ``modules`` (and their children)."""
    for module in modules:
        for sub in module.modules():
            sub.__dict__.pop("group_plans", None)


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
    padded to one shape (:func:`_one_packed_shape`). The loss and the gradient are the same (each is a sum over sequences,
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
    dev = _device()
    packing = _use_packing(batch, pack, model_chunks)
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
        cuts.append(mb)
    packs: list[PackedRows | None] = [None] * len(cuts)
    if packing:
        shape = _one_packed_shape(cuts, multiple, _model_width(batch.seq_length, multiple) * n) if one_shape else None
        if shape is not None or not one_shape:  # (under VPP, None: packing would save nothing)
            dense = not _plans_always_apply(model_chunks)
            packs = [group_packed_layout(mb, width_multiple=multiple, shape=shape, dense_mask=dense) for mb in cuts]
    out = []
    for mb, packed in zip(cuts, packs):
        width = _model_width(mb.seq_length, multiple)
        selection = _selection_for(mb, packed, width).to(dev) if select else None
        fields = {f.name: getattr(mb, f.name) for f in dataclasses.fields(mb) if f.name not in ("packed", "select")}
        fields = {k: (None if v is None else v.to(dev, non_blocking=True)) for k, v in fields.items()}
        out.append(TrajectoryBatch(**fields, packed=None if packed is None else packed.to(dev), select=selection))
    return (out, order) if return_order else out


def _plans_always_apply(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether every layer's attention computes group-packed rows by their GroupAttentionPlan on
    every call (SDPADotProductAttention without dropout, bias or special softmax), so that the
    micro-batches need no dense tree mask."""
    from megatron_recycle.model.attention import SDPADotProductAttention
    from megatron_recycle.model.build import unwrap_model

    cores = [layer.self_attention.core_attention for chunk in model_chunks
             for layer in getattr(getattr(unwrap_model(chunk), "decoder", None), "layers", [])]
    return bool(cores) and all(isinstance(c, SDPADotProductAttention) and c.takes_group_plans() for c in cores)


def _one_packed_shape(cuts: list[TrajectoryBatch], multiple: int, padded_positions: int) -> tuple[int, int] | None:
    """Interleaved (virtual) pipeline stages exchange one tensor shape for every micro-batch: the
    largest (rows, width) of the micro-batches' packed layouts, to pad them all to, or None (train
    padded rows) when that would compute as many positions as the padded micro-batches do. The
    layouts are sized without their dense masks."""
    shapes = [group_packed_layout(mb, width_multiple=multiple, dense_mask=False).tokens.shape for mb in cuts]
    rows, width = max(r for r, _ in shapes), max(w for _, w in shapes)
    if len(cuts) * rows * width >= padded_positions:
        logger.debug("group packing skipped for this batch: %d micro-batches of %d x %d packed positions "
                     ">= %d padded ones", len(cuts), rows, width, padded_positions)
        return None
    return rows, width


def _schedule_shape(mbs: list[TrajectoryBatch], micro_batch_size: int, model: torch.nn.Module) -> tuple[int, int]:
    """(seq_length, micro_batch_size) for Megatron's schedule: the shape of the tensors the stages
    exchange when it is fixed (interleaved pipelines; otherwise each send carries its own)."""
    first = mbs[0]
    if first.packed is not None:
        return int(first.packed.tokens.shape[1]), int(first.packed.tokens.shape[0])
    return _model_width(first.seq_length, _seq_multiple(model)), micro_batch_size


def _shapes_may_vary(model: torch.nn.Module) -> bool:
    """Whether micro-batches may differ in shape: one pipeline stage, or stages that exchange each
    micro-batch's shape first (``config.variable_seq_lengths``, set by model.build)."""
    from megatron_recycle.model.build import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    return _ps().get_pipeline_model_parallel_world_size() == 1 or bool(getattr(config, "variable_seq_lengths", False))


def _data_iterators(mbs: list[TrajectoryBatch], num_chunks: int) -> Any:
    # Interleaved (virtual) pipelines take one iterator per model chunk, each over all micro-batches.
    if num_chunks == 1:
        return iter(mbs)
    return [iter(mbs) for _ in range(num_chunks)]


def target_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False,
    packed: PackedRows | None = None, select: LogitSelection | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [b, L-1] of tokens[:, 1:] from vocab-parallel logits [b, L, V/tp].

    Uses token_logprobs with the TP group, so the full vocabulary is never gathered. With
    ``packed``, the logits are the packed rows' [R, S, V/tp]; with ``select``, they are only the
    selected positions' [1, K, V/tp]. Either way the result is gathered back to the sequences'
    [n, L-1] layout (``tokens`` is always the unpacked [n, L]).
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
                         return_entropy=return_entropy)
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
            stack.enter_context(_RopePositions(model, p.position_ids))
            stack.enter_context(_GroupAttention(model, p))
            output = model(p.tokens, p.position_ids, p.attention_mask)
        else:
            tokens = mb.tokens
            b, seq = tokens.shape
            width = _model_width(seq, _seq_multiple(model))
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
    the same tensor. Masked positions hold valid log-probs too (the mask is not applied).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs, order = _micro_batches(batch, micro_batch_size, pack_groups, model_chunks, select=only_loss_positions,
                                return_order=True)
    seq_length, mb_rows = _schedule_shape(mbs, micro_batch_size, model_chunks[0])

    def loss_fn(mb: TrajectoryBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp = target_logprobs(output, mb.tokens, temperature, packed=mb.packed, select=mb.select).float()
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
    return result.cpu()


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
) -> dict[str, float]:
    """The shared machinery: zero grads, forward_backward over micro-batches, optimizer, LR schedule.

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
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=_device())
    if vec.numel():
        dist.all_reduce(vec, group=dp_group)
    totals = dict(zip(keys, vec.tolist()))
    totals.update(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=lr,
        update_successful=float(bool(update_successful)),
        num_microbatches=float(len(mbs)),
        packed_saved_tokens=float(sum(mb.packed.saved_tokens for mb in mbs if mb.packed is not None)),
        # padding the length-grouped micro-batches did not train (positions: rows x columns cut)
        length_cut_tokens=float(sum((batch.seq_length - mb.seq_length) * mb.num_sequences
                                    for mb in mbs if mb.packed is None)),
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
    num_mb = batch.num_sequences // micro_batch_size if micro_batch_size > 0 else 0
    scale = float(num_mb * dp_size)

    def loss_fn(mb: TrajectoryBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        entropy = None
        if cfg.compute_entropy:
            lp, entropy = target_logprobs(output, mb.tokens, cfg.temperature, return_entropy=True, packed=mb.packed,
                                          select=mb.select)
        else:
            lp = target_logprobs(output, mb.tokens, cfg.temperature, packed=mb.packed, select=mb.select)
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
    num_mb = batch.num_sequences // micro_batch_size if micro_batch_size > 0 else 0
    scale = float(num_mb * dp_size)

    def loss_fn(mb: TrajectoryBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lp = target_logprobs(output, mb.tokens, 1.0, packed=mb.packed, select=mb.select)
        loss = -(lp * mb.target_mask).sum() / global_tokens
        return loss * scale, {"loss": loss.detach(), "tokens": mb.target_mask.sum()}

    metrics = _run_train_step(model_chunks, optimizer, scheduler, batch, micro_batch_size, loss_fn, dp_group, on_phase)
    _sync()
    metrics["time/step_s"] = time.perf_counter() - t_start
    return metrics


# ------------------------------------------------------------------ model, DDP and optimizer
def wrap_model_and_build_optimizer(
    model_chunks: list[torch.nn.Module],
    lr: float,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    bf16: bool = False,
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr: float = 0.0,
    lr_decay_style: str = "cosine",
    optimizer: str = "adam",
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    sgd_momentum: float = 0.0,
    overlap_grad_reduce: bool = False,
    ddp_bucket_size: int | None = None,
) -> tuple[list[torch.nn.Module], Any, Any]:
    """Wrap built model chunks in Megatron DDP; build get_megatron_optimizer and OptimizerParamScheduler.

    Also sets the model config hooks Megatron's schedules use (no_sync, grad sync, finalize grads,
    loss scale) and the gloo p2p settings PLATFORM.md requires. Returns (ddp_chunks, optimizer, scheduler).

    ``overlap_grad_reduce``: Megatron DDP's overlapped gradient reduction. The gradient buffer is
    cut into buckets of about ``ddp_bucket_size`` parameters (None: Megatron's default,
    max(40M, 1M x DP size)); in the last micro-batch's backward pass each bucket's all-reduce (or,
    with the distributed optimizer, reduce-scatter) starts asynchronously as soon as its last
    gradient is in, and the step waits for them all before the optimizer. The first step after the
    model is built reduces at the end (it learns which gradients each bucket waits for). The sums
    are the same; only when they are computed changes.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.utils import get_model_config

    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
    if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps >= 1, got {warmup_steps}, {total_steps}")
    if lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root"):
        raise ValueError(f"lr_decay_style={lr_decay_style!r}; use constant, linear, cosine or inverse-square-root")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}; use 'adam' or 'sgd'")
    if ddp_bucket_size is not None and (isinstance(ddp_bucket_size, bool) or int(ddp_bucket_size) != ddp_bucket_size
                                        or ddp_bucket_size < 1):
        raise ValueError(f"ddp_bucket_size={ddp_bucket_size!r}; use a number of parameters >= 1, or None")

    config = get_model_config(model_chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(overlap_grad_reduce),
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=int(ddp_bucket_size) if ddp_bucket_size is not None else None,
    )
    ddp_chunks: list[torch.nn.Module] = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(model_chunks)
    ]
    for m in ddp_chunks:
        m.broadcast_params()  # every DP replica starts from DP rank 0's weights

    opt_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        sgd_momentum=sgd_momentum,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    opt = get_megatron_optimizer(opt_config, ddp_chunks)
    use_fused_cpu_adamw(opt)
    scheduler = OptimizerParamScheduler(
        opt,
        init_lr=0.0 if warmup_steps > 0 else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=lr_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )

    # Hooks the schedules call (the same ones Megatron's own training loop installs).
    config.no_sync_func = [m.no_sync for m in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    # With overlap, a pipeline schedule starts each chunk's remaining reductions itself once that
    # chunk's backward passes are done (stages other than the first reduce in the pipeline bubble).
    config.grad_sync_func = None
    if overlap_grad_reduce:
        config.grad_sync_func = ([m.start_grad_sync for m in ddp_chunks] if len(ddp_chunks) > 1
                                 else ddp_chunks[0].start_grad_sync)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = opt.scale_loss
    if dist.get_backend() == "gloo":
        # PLATFORM.md: batched p2p sync is wrong on gloo; interleaved PP also needs unbatched p2p.
        config.batch_p2p_sync = False
        if len(ddp_chunks) > 1:
            config.batch_p2p_comm = False
    return ddp_chunks, opt, scheduler


def describe_grad_reduction(ddp_chunks: list[torch.nn.Module]) -> str:
    """'' or, with overlapped gradient reduction, e.g. 'overlapped grad reduction (12 buckets)'."""
    first = ddp_chunks[0] if ddp_chunks else None
    ddp_config = getattr(first, "ddp_config", None)
    if ddp_config is None or not ddp_config.overlap_grad_reduce:
        return ""
    buckets = sum(len(g.buckets) for m in ddp_chunks for g in getattr(m, "bucket_groups", []))
    return f"overlapped grad reduction ({buckets} bucket{'s' if buckets != 1 else ''})"


def _sub_optimizers(opt: Any) -> list[Any]:
    """The Megatron optimizers of a ChainedOptimizer, or ``[opt]``."""
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def _torch_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron (chained) optimizer."""
    found: list[torch.optim.Optimizer] = []
    for o in _sub_optimizers(opt):
        inner = getattr(o, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            found.append(inner)
    return found


def use_fused_cpu_adamw(opt: Any) -> int:
    """Switch torch AdamW (Megatron's fallback without TE/apex) to its fused CPU kernel when every
    parameter is a float CPU tensor: one kernel per tensor instead of a dozen elementwise passes
    (4x faster for 135M parameters on 2 cores; same update to fp32 rounding). Returns the number
    of param groups switched."""
    switched = 0
    for inner in _torch_optimizers(opt):
        if not isinstance(inner, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            params = group["params"]
            if params and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


OPTIMIZER_STATE_FORMAT = "megatron-recycle-optimizer/1"


def _is_distributed_optimizer(o: Any) -> bool:
    from megatron.core.optimizer import DistributedOptimizer

    return isinstance(o, DistributedOptimizer)


def optimizer_state_dict(opt: Any) -> dict[str, Any]:
    """Everything a resumed run needs of a Megatron (chained) optimizer, per rank.

    Megatron's ``DistributedOptimizer.state_dict()`` holds only the parameter-independent part (its
    docstring: the Adam moments and fp32 main weights go through ``save_parameter_state``, a
    separate gather to DP rank 0), and it asserts when the optimizer has not stepped yet. Saved
    alone, a resumed run got moments allocated with ``torch.empty`` and, with bf16, fp32 main
    weights from the start of the run. Here each distributed optimizer saves this rank's shard
    as it is: the inner torch optimizer's own state dict (moments, step) and its parameters (the
    fp32 main-weight shards), which is exact because a resume keeps the layout
    (checkpoint.RESUME_KEYS). Other Megatron optimizers keep their own ``state_dict()`` (it
    includes the fp32 copies of bf16 weights). The tensors are the live ones, not copies:
    serialize the result before the next step.
    """
    parts: list[dict[str, Any]] = []
    for o in _sub_optimizers(opt):
        if _is_distributed_optimizer(o):
            inner = o.optimizer
            scaler = getattr(o, "grad_scaler", None)
            parts.append({
                "kind": "distributed",
                "inner": inner.state_dict(),
                "main_params": [p.detach() for g in inner.param_groups for p in g["params"]],
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
            })
        else:
            parts.append({"kind": "megatron", "state": o.state_dict()})
    return {"format": OPTIMIZER_STATE_FORMAT, "parts": parts}


def load_optimizer_state_dict(opt: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict`, on an optimizer of the same layout.

    A state saved by ``opt.state_dict()`` alone (checkpoints written before this format) still
    loads for the non-distributed optimizers; for a distributed one it is refused, since it never
    held the moments or the main weights. A state that does not fit raises CheckpointError.
    """
    from megatron_recycle.train.checkpoint import CheckpointError

    subs = _sub_optimizers(opt)
    if not isinstance(state, dict) or state.get("format") != OPTIMIZER_STATE_FORMAT:
        if any(_is_distributed_optimizer(o) for o in subs):
            raise CheckpointError(
                "this checkpoint's optimizer state was saved by Megatron's DistributedOptimizer.state_dict() "
                "alone (megatron-recycle before the optimizer format "
                f"{OPTIMIZER_STATE_FORMAT!r}): it lacks the Adam moments and fp32 main weights, so the run "
                "cannot be resumed exactly; start the run again (or a new one with --init-from a Hugging Face "
                "export of the weights)"
            )
        opt.load_state_dict(state)
        return
    parts = state["parts"]
    if len(parts) != len(subs):
        raise CheckpointError(f"optimizer state holds {len(parts)} optimizers, this run has {len(subs)}")
    for o, part in zip(subs, parts):
        distributed = _is_distributed_optimizer(o)
        if distributed != (part["kind"] == "distributed"):
            raise CheckpointError(f"optimizer state of kind {part['kind']!r} cannot load into {type(o).__name__}")
        if not distributed:
            o.load_state_dict(part["state"])
            continue
        inner = o.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        saved = part["main_params"]
        if len(saved) != len(params) or any(a.shape != b.shape for a, b in zip(params, saved)):
            raise CheckpointError("distributed optimizer state does not match this run's parameter shards")
        inner.load_state_dict(part["inner"])
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        scaler = getattr(o, "grad_scaler", None)
        if scaler is not None and part["grad_scaler"] is not None:
            scaler.load_state_dict(part["grad_scaler"])


_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd")


def schedule_differences(scheduler: Any, saved: dict[str, Any]) -> list[str]:
    """The settings of a saved learning-rate schedule that differ from ``scheduler``'s.

    Megatron's OptimizerParamScheduler.load_state_dict keeps the checkpoint's values
    (use_checkpoint_opt_param_scheduler, its default), so a run resumed with another optim.lr,
    optim.warmup_steps or train.steps continues the checkpoint's schedule; the caller says so.
    """
    mine = scheduler.state_dict()
    return [f"{k} {saved[k]} (this config: {mine[k]})" for k in _SCHEDULE_KEYS
            if k in saved and k in mine and saved[k] != mine[k]]


def setup_model_and_optimizer(
    hf_config: Any,
    lr: float,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    bf16: bool = False,
    warmup_steps: int = 0,
    total_steps: int = 1,
    load_weights: Callable[[list[torch.nn.Module]], None] | None = None,
    layer_spec: str = "auto",
    model_options: dict[str, Any] | None = None,
    **optimizer_kwargs: Any,
) -> tuple[list[torch.nn.Module], Any, Any]:
    """Build this rank's GPTModel chunks (model.build), wrap them in Megatron DDP, build optimizer + LR schedule.

    Call after init_distributed. ``load_weights(chunks)`` (e.g. HF -> Megatron conversion) runs
    on the bare chunks before DDP and the optimizer copy them. ``model_options``: TransformerConfig
    fields (model.build.memory_options: recomputation, sequence parallelism). ``optimizer_kwargs`` go
    to wrap_model_and_build_optimizer (min_lr, lr_decay_style, optimizer, adam betas, sgd_momentum).
    """
    from megatron_recycle.model.build import build_model_chunks

    chunks = build_model_chunks(hf_config, bf16=bf16, layer_spec=layer_spec, **(model_options or {}))
    if load_weights is not None:
        load_weights(chunks)
    return wrap_model_and_build_optimizer(
        chunks, lr=lr, weight_decay=weight_decay, clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer, bf16=bf16,
        warmup_steps=warmup_steps, total_steps=total_steps, **optimizer_kwargs,
    )
