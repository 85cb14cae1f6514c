"""Group packing: the K trajectories of a GRPO group begin with the same prompt, so a group's
micro-batch rows are re-laid out with that shared prefix computed once.

One packed row holds [prefix][suffix 1]...[suffix K] per group (groups side by side), with a tree
attention mask (a suffix sees the prefix and itself, causally) and RoPE positions that restart
after the prefix for every suffix. The step gathers log-probs back to the [N, L-1] layout, so the
loss and its gradient are the padded batch's (equal to fp32 rounding; tests check it) at a
fraction of the tokens: the prefix is forwarded and back-propagated once instead of K times, and
padding disappears. The prefix stops before the first token that carries loss in any member, so a
token with loss is never shared. The local attention computes packed rows by a
GroupAttentionPlan (model/attention.py) instead of the dense mask; where every call of it does,
the layout carries a plan-only stand-in for the O(S^2) mask. Under pipeline parallelism every
stage builds the same layout from the same micro-batch and the stages exchange each packed
micro-batch's shape first (``config.variable_seq_lengths``); virtual pipeline stages exchange one
shape for all micro-batches, so there the layouts are padded to the largest one
(:func:`one_packed_shape`). Where the attention is not the local one, the step trains padded rows.
Tests: tests/model/test_group_packing.py, tests/train/test_step.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_recycle.train.batch import TrajectoryBatch

logger = logging.getLogger(__name__)


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
    # the largest RoPE position (position_ids.max(), known on the host: RopePositions needs no sync)
    max_position: int | None = None
    # the GroupAttentionPlan of ``spans`` for this ``attention_mask`` (:meth:`with_plan`), built
    # where the micro-batch is moved to its device rather than inside each forward
    plan: Any = None

    def to(self, device: torch.device) -> PackedRows:
        """On ``device``, without a plan (a plan holds device index tensors and its mask)."""
        return PackedRows(self.tokens.to(device), self.targets.to(device), self.position_ids.to(device),
                          self.attention_mask.to(device), self.gather_index.to(device), self.saved_tokens,
                          self.spans, self.max_position)

    def with_plan(self) -> PackedRows:
        """This layout with its GroupAttentionPlan built (on the layout's device; none without spans)."""
        if self.spans and self.plan is None:
            from megatron_recycle.model.attention import GroupAttentionPlan

            rows, width = self.tokens.shape
            self.plan = GroupAttentionPlan.build(self.spans, rows, width, self.attention_mask)
        return self


def model_width(seq: int, multiple: int) -> int:
    """``seq`` rounded up to a multiple of ``multiple`` (the TP size under sequence parallelism)."""
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
    """Assign groups (by packed size) to few rows that keep every row within
    max(row_tokens, largest group): for the smallest row count where it works, longest-first into
    the least-filled row (balanced rows), else longest-first into the first row with room (first-fit
    decreasing, which finds the tight packings the balanced rule misses, e.g. sizes 1024, 1024, 682,
    682, 682 in two rows of 2048). Bin packing is NP-hard: this is a heuristic, not always the fewest
    rows. Returns the group indices of each row, in placement order."""
    cap = max(max(sizes), row_tokens)
    order = sorted(range(len(sizes)), key=lambda g: -sizes[g])

    def least_filled(fill: list[int], size: int) -> int | None:
        r = min(range(len(fill)), key=fill.__getitem__)
        return r if fill[r] + size <= cap else None  # if the least-filled row has no room, none has

    def first_fit(fill: list[int], size: int) -> int | None:
        return next((r for r in range(len(fill)) if fill[r] + size <= cap), None)

    for rows in range(max(1, -(-sum(sizes) // cap)), len(sizes) + 1):
        for choose in (least_filled, first_fit):
            fill, members = [0] * rows, [[] for _ in range(rows)]
            for g in order:
                r = choose(fill, sizes[g])
                if r is None:
                    break
                fill[r] += sizes[g]
                members[r].append(g)
            else:
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
    width = model_width(width, width_multiple)
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
    max_position = 0  # padding sits at position 0
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
                max_position = max(max_position, ln - 1)
                gather[i, :s] = base + start + torch.arange(s)
                gather[i, s : ln - 1] = base + off + torch.arange(ln - 1 - s)
                gather[i, ln - 1 :] = base + off
                off += span
    saved = n * seq - rows * width
    if not dense_mask:
        from megatron_recycle.model.attention import plan_only_mask

        return PackedRows(tokens, targets, positions, plan_only_mask(rows), gather, saved, spans, max_position)
    # a position sees the earlier positions of its own group's prefix and of its own suffix;
    # padding forms one segment of its own per row (it sees only earlier padding)
    same_group = group_of[:, :, None] == group_of[:, None, :]
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & same_group & ((q == k) | (k == 0))
    return PackedRows(tokens, targets, positions, ~allowed[:, None], gather, saved, spans, max_position)


def packing_supported(model_chunks: Sequence[torch.nn.Module]) -> str | None:
    """None when group packing can run on these chunks, else the reason it cannot."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_recycle.model.build import unwrap_model

    if parallel_state.get_pipeline_model_parallel_world_size() > 1 and not model_chunks:
        return "pipeline parallelism without the model chunks (the stages' shape exchange is unknown)"
    for chunk in model_chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            if not isinstance(layer.self_attention.core_attention, DotProductAttention):
                return ("the attention is not megatron-core's local DotProductAttention (an arbitrary "
                        "mask is needed; transformer-engine's causal kernels ignore it)")
    return None


_PACKING_NOTED: set[str] = set()


def use_packing(batch: TrajectoryBatch, pack: bool, model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether ``batch`` is trained group-packed: asked for, grouped, and supported by the model
    (otherwise padded rows, with a warning once per reason)."""
    if not pack or batch.group_ids is None:
        return False
    reason = packing_supported(model_chunks)
    if reason is not None:
        if reason not in _PACKING_NOTED:
            logger.warning("group packing is off (%s); training on padded rows", reason)
            _PACKING_NOTED.add(reason)
        return False
    return True


class RopePositions:
    """Within the block, the model's RoPE uses per-token ``position_ids`` [b, S] (packed rows)
    instead of 0..S-1. megatron-core's GPTModel derives RoPE from the sequence length alone.
    ``max_position``: the largest of ``position_ids`` when the caller knows it (PackedRows does);
    otherwise it is read from the tensor, a host sync on a GPU."""

    def __init__(self, model: torch.nn.Module, position_ids: torch.Tensor, max_position: int | None = None) -> None:
        from megatron_recycle.model.build import unwrap_model

        self.rope = getattr(unwrap_model(model), "rotary_pos_emb", None)
        self.position_ids = position_ids
        self.max_position = max_position

    def __enter__(self) -> None:
        if self.rope is None:
            return
        table_fn = type(self.rope).forward.__get__(self.rope)
        pos = self.position_ids
        top = self.max_position

        def forward(max_seq_len: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            needed = (int(pos.max()) if top is None else top) + 1
            table = table_fn(max(max_seq_len, needed), *args, **kwargs)  # [S, 1, 1, D]
            return table[:, 0, 0, :][pos.t()].unsqueeze(2)  # [S, b, 1, D]

        self.rope.forward = forward

    def __exit__(self, *exc: Any) -> None:
        if self.rope is not None and "forward" in self.rope.__dict__:
            del self.rope.forward


class GroupAttention:
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
        if p.plan is not None and p.plan.mask is p.attention_mask:
            self.plan = p.plan  # built with the micro-batch (PackedRows.with_plan): no host-to-device copies here
        else:
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


def plans_always_apply(model_chunks: Sequence[torch.nn.Module]) -> bool:
    """Whether every layer's attention computes group-packed rows by their GroupAttentionPlan on
    every call (SDPADotProductAttention without dropout, bias or special softmax), so that the
    micro-batches need no dense tree mask."""
    from megatron_recycle.model.attention import SDPADotProductAttention
    from megatron_recycle.model.build import unwrap_model

    cores = [layer.self_attention.core_attention for chunk in model_chunks
             for layer in getattr(getattr(unwrap_model(chunk), "decoder", None), "layers", [])]
    return bool(cores) and all(isinstance(c, SDPADotProductAttention) and c.takes_group_plans() for c in cores)


def one_packed_shape(cuts: list[TrajectoryBatch], multiple: int, padded_positions: int) -> tuple[int, int] | None:
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
