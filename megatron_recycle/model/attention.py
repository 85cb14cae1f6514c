"""Core attention for the local (CPU-safe) layer spec: megatron-core's DotProductAttention with
its arithmetic done by torch's ``scaled_dot_product_attention``.

Megatron's local core attention materializes [b, heads, s, s] scores with baddbmm, a separate
masked softmax and a bmm, and keeps the probabilities for backward; torch's SDPA does the same
product in one fused kernel per call (flash attention on CPU and GPU) and takes the same boolean
mask (inverted: Megatron marks masked positions True, SDPA marks the allowed ones). The
difference is the masked value (-inf instead of -10000), which only matters for a fully masked
row, which no layout here produces (every position sees itself). Anything the fast path does
not cover (softmax offsets, attention bias, packed THD sequences, query-key layer scaling,
dropout) goes to Megatron's own forward unchanged. Tests: tests/model/test_parity.py (logits
equal transformers'), tests/train/test_step.py (gradients across TP/PP/DP layouts),
tests/model/test_group_packing.py (arbitrary tree masks).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_recycle.config import PACKED_ATTENTION_ROUTES

logger = logging.getLogger(__name__)


@dataclass
class AttentionBlock:
    """One batched attention call of a GroupAttentionPlan: ``q`` [blocks, Lq] query positions and
    ``k`` [blocks, Lk] key positions (flat [R * S] indices; padding repeats a block's last real
    position), causal with the last query aligned to the last key (``Lk - Lq`` leading keys every
    query sees: the shared prefix). ``pos``: the real queries' flat positions; ``sel``: where they
    sit in the flattened [blocks * Lq] block output."""

    q: torch.Tensor
    k: torch.Tensor
    pos: torch.Tensor
    sel: torch.Tensor


def _block(queries: list[tuple[int, int]], prefix: list[int], prefix_len: int, dev: torch.device) -> AttentionBlock:
    """``queries``: per block (first flat position, length) of its own tokens; ``prefix``: per
    block the first flat position of its ``prefix_len`` shared-prefix keys (unused when 0)."""
    first = torch.tensor([f for f, _ in queries], dtype=torch.long)
    lens = torch.tensor([n for _, n in queries], dtype=torch.long)
    width = int(lens.max())
    ar = torch.arange(width)
    q = first[:, None] + torch.minimum(ar[None, :], lens[:, None] - 1)
    k = q
    if prefix_len:
        k = torch.cat([torch.tensor(prefix, dtype=torch.long)[:, None] + torch.arange(prefix_len)[None, :], q], 1)
    row = torch.repeat_interleave(torch.arange(len(queries)), lens)
    local = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens)[row]
    return AttentionBlock(q.to(dev), k.to(dev), (first[row] + local).to(dev), (row * width + local).to(dev))


@dataclass
class VarlenPlan:
    """The plan as ONE variable-length attention call (route ``varlen``): every position of the
    flattened [rows * width] queries belongs to one segment, in order (a group's prefix, each of
    its members, a stretch of padding), and each segment attends causally, its last query aligned
    with its last key, to its keys: its own positions, after the group's prefix for a member.
    ``k_idx`` [T_k]: the keys' flat positions, segment after segment (a member's prefix keys are
    gathered once per member); ``cu_q`` / ``cu_k`` [segments + 1] (int32): where each segment's
    queries and keys start; ``max_q`` / ``max_k``: the longest; ``pad`` [rows * width] (bool):
    the padding positions, None when there are none (padding attends to itself and is then
    zeroed, as the block routes leave it)."""

    k_idx: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    pad: torch.Tensor | None

    @staticmethod
    def build(spans: list[tuple[int, int, int, list[tuple[int, int]]]], rows: int, width: int,
              dev: torch.device) -> VarlenPlan:
        """From GroupAttentionPlan.build's ``spans``; ValueError if two spans overlap."""
        by_row: dict[int, list[tuple[int, int, int, int]]] = {}  # row -> (offset, length, prefix start, prefix length)
        for row, start, sp, members in spans:
            segs = by_row.setdefault(row, [])
            if sp > 0:
                segs.append((start, sp, 0, 0))
            segs.extend((off, ln, start, sp) for off, ln in members if ln > 0)
        keys: list[torch.Tensor] = []
        q_lens: list[int] = []
        k_lens: list[int] = []
        padding: list[torch.Tensor] = []
        for row in range(rows):
            at = 0
            base = row * width
            for off, ln, pstart, sp in sorted(by_row.get(row, [])) + [(width, 0, 0, 0)]:
                if off < at:
                    raise ValueError(f"packed spans overlap in row {row} at position {off}")
                if off > at:  # padding: a segment of its own
                    padding.append(torch.arange(base + at, base + off))
                    keys.append(padding[-1])
                    q_lens.append(off - at)
                    k_lens.append(off - at)
                if ln:
                    own = torch.arange(base + off, base + off + ln)
                    keys.append(torch.cat([torch.arange(base + pstart, base + pstart + sp), own]) if sp else own)
                    q_lens.append(ln)
                    k_lens.append(sp + ln)
                at = off + ln
        cu = lambda lens: torch.tensor([0, *lens], dtype=torch.long).cumsum(0).to(torch.int32)  # noqa: E731
        pad = None
        if padding:
            pad = torch.zeros(rows * width, dtype=torch.bool).index_fill_(0, torch.cat(padding), True).to(dev)
        return VarlenPlan(torch.cat(keys).to(dev), cu(q_lens).to(dev), cu(k_lens).to(dev), max(q_lens),
                          max(k_lens), pad)


@dataclass
class GroupAttentionPlan:
    """Index plan for attention over group-packed rows (train/packing.py's group_packed_layout: per
    group [prefix][member 1]...[member K], groups side by side in a row), computed once per
    micro-batch and used by every layer.

    The tree mask lets a prefix position see the earlier positions of its prefix, and a member
    position see its group's whole prefix and the earlier positions of its own member, nothing
    else. Dense attention over a row computes all S x S pairs; this plan computes only the
    allowed blocks: one causal SDPA over the prefixes (gathered, padded to the longest), and one
    per prefix length over the members of groups with that prefix length, each member's queries
    against [its prefix ++ itself] (members padded at the end to the longest). Every block is
    plain causal attention with the last query aligned to the last key, so the plan holds no mask
    (on CUDA a block runs as flash attention's bottom-right causal kernel; on a CPU as two flash
    calls merged by their log-sum-exps, :class:`_PrefixThenCausal`). For 4 members of 64
    tokens after a 40-token prompt that is ~3x fewer query-key pairs than one group per row, and
    far fewer when groups share a row.

    ``blocks``: the prefixes' block first (when any group has a prefix), then the members' blocks.
    ``mask``: the dense (or plan-only) mask this plan stands for (the attention uses the plan only
    when called with it).
    """

    mask: torch.Tensor
    rows: int
    width: int
    blocks: tuple[AttentionBlock, ...]
    # every block's real query positions, in block order (the blocks' ``pos`` joined): where the
    # outputs land, in one copy per layer
    pos: torch.Tensor | None = None
    # how group_attention runs it (:func:`packed_route` of the mask's device, read when the plan is built)
    route: str = "bool-mask"
    # the same attention as one variable-length call (route "varlen"), built with the plan
    varlen: VarlenPlan | None = None

    def matches(self, attention_mask: Any) -> bool:
        """Whether ``attention_mask`` is this plan's mask: the same tensor, or a view of the same
        memory (activation recomputation calls the attention again with a detached copy)."""
        if attention_mask is self.mask:
            return True
        return (isinstance(attention_mask, torch.Tensor) and attention_mask.data_ptr() == self.mask.data_ptr()
                and attention_mask.shape == self.mask.shape and attention_mask.stride() == self.mask.stride())

    @staticmethod
    def build(spans: list[tuple[int, int, int, list[tuple[int, int]]]], rows: int, width: int,
              mask: torch.Tensor) -> GroupAttentionPlan:
        """``spans``: per group, (row, prefix offset, prefix length, [(offset, length) per member])."""
        dev = mask.device
        blocks = []
        prefixes = [(row * width + start, sp) for row, start, sp, _ in spans if sp > 0]
        if prefixes:
            blocks.append(_block(prefixes, [], 0, dev))
        by_prefix: dict[int, tuple[list[tuple[int, int]], list[int]]] = {}
        for row, start, sp, members in spans:
            own, pre = by_prefix.setdefault(sp, ([], []))
            for off, ln in members:
                if ln > 0:
                    own.append((row * width + off, ln))
                    pre.append(row * width + start)
        for sp in sorted(by_prefix):
            own, pre = by_prefix[sp]
            if own:
                blocks.append(_block(own, pre, sp, dev))
        pos = torch.cat([blk.pos for blk in blocks]) if len(blocks) > 1 else (blocks[0].pos if blocks else None)
        route = packed_route(mask.device)
        varlen = VarlenPlan.build(spans, rows, width, dev) if route == "varlen" else None
        return GroupAttentionPlan(mask, rows, width, tuple(blocks), pos, route, varlen)


def native_gqa(t: torch.Tensor) -> bool:
    """Whether SDPA on ``t``'s device takes fewer key/value heads than query heads without copying
    them (``enable_gqa``): torch's CPU flash kernel does (forward and backward, checked against the
    expanded heads in tests/model/test_group_packing.py). On CUDA the keys and values are expanded
    first, as before: there torch's memory-efficient kernel (fp32) and the lower-right causal bias
    would fall back to the math kernel with ``enable_gqa``."""
    return t.device.type == "cpu"


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, groups, s, hn] keys or values repeated to [b, heads, s, hn] (query head h reads group
    h // (heads / groups), Megatron's layout); unchanged when they already have ``heads``."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _bottom_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                         route: str) -> torch.Tensor:
    """SDPA where query i of Lq sees keys 0 .. i + Lk - Lq. ``causal-bias``: torch's
    causal_lower_right bias (on CUDA the flash / memory-efficient kernels, no mask); ``bool-mask``:
    one [Lq, Lk] boolean mask, broadcast over the block (torch's bias would build the same mask on
    a CPU, warning on every call). Keys and values may have fewer heads (grouped-query attention):
    they are expanded for the bias route."""
    lq, lk = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if route == "causal-bias" and lq != lk:
        from torch.nn.attention.bias import causal_lower_right

        heads = q.shape[1]
        return F.scaled_dot_product_attention(q, expand_kv(k, heads), expand_kv(v, heads),
                                              attn_mask=causal_lower_right(lq, lk), scale=scale)
    if lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


def _cpu_flash_ops() -> tuple[Any, Any] | None:
    """torch's CPU flash-attention forward (returning the log-sum-exp) and backward (taking it),
    or None where this torch has no such ops."""
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return None if fwd is None or bwd is None else (fwd, bwd)


class _PrefixThenCausal(torch.autograd.Function):
    """Attention of Lq queries over [P prefix keys, which every query sees] ++ [Lq own keys,
    causal], computed as two flash calls that skip every masked pair: the queries against the
    prefix (no mask) and against their own keys (square causal), merged by their log-sum-exps.
    One masked call instead computes all Lq x (P + Lq) pairs (a CPU kernel skips no masked tile).

    Backward: flash attention's gradient of a key block depends on the queries' final output and
    final log-sum-exp only, so each call's backward kernel, given the merged output and log-sum-exp,
    returns exactly its keys' gradients and its share of the queries' (which add up). The same
    identity splits ring attention across devices. Inputs [b, n, L, hn]; keys and values may have
    fewer heads (grouped-query attention: the CPU kernels read them shared, forward and backward)."""

    @staticmethod
    def forward(ctx, q, kp, vp, km, vm, scale):  # noqa: D102
        fwd, _ = _cpu_flash_ops()
        out_p, lse_p = fwd(q, kp, vp, 0.0, False, scale=scale)
        out_m, lse_m = fwd(q, km, vm, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_p, lse_m)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = (out_p.to(acc) * (lse_p - lse).exp().unsqueeze(-1).to(acc)
               + out_m.to(acc) * (lse_m - lse).exp().unsqueeze(-1).to(acc)).to(q.dtype)
        ctx.save_for_backward(q, kp, vp, km, vm, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        _, bwd = _cpu_flash_ops()
        q, kp, vp, km, vm, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq_p, dkp, dvp = bwd(grad, q, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dq_m, dkm, dvm = bwd(grad, q, km, vm, out, lse, 0.0, True, scale=ctx.scale)
        return dq_p + dq_m, dkp, dvp, dkm, dvm, None


ROUTES = PACKED_ATTENTION_ROUTES  # the config checks $MEGATRON_RECYCLE_PACKED_ATTENTION against them up front
ROUTE_ENV = "MEGATRON_RECYCLE_PACKED_ATTENTION"


def _forced_route() -> str | None:
    """The route named by $MEGATRON_RECYCLE_PACKED_ATTENTION (unset, empty or ``auto``: None, the
    device's default); ValueError for an unknown name."""
    name = os.environ.get(ROUTE_ENV, "").strip()
    if name in ("", "auto"):
        return None
    if name not in ROUTES:
        raise ValueError(f"{ROUTE_ENV}={name!r} is not a group attention route: auto or one of {', '.join(ROUTES)}")
    return name


def packed_route(device: torch.device | str) -> str:
    """How a GroupAttentionPlan's attention runs on ``device``: the route named by
    $MEGATRON_RECYCLE_PACKED_ATTENTION when set, else ``causal-bias`` on CUDA, ``split``
    (:class:`_PrefixThenCausal`) on a CPU whose torch has the CPU flash ops, else ``bool-mask``.
    ``varlen`` (one variable-length flash call for every segment, torch's
    ``torch.nn.attention.varlen``; on a CPU a per-segment emulation of it, for tests) is chosen
    only by name; ``split`` runs torch's CPU flash kernels, so it is refused on another device (or
    a torch without them) with a ValueError, when the plan is built."""
    forced = _forced_route()
    device = torch.device(device)
    if forced == "split" and (device.type != "cpu" or _cpu_flash_ops() is None):
        where = f"on {device.type.upper()} tensors" if device.type != "cpu" else f"with torch {torch.__version__}"
        raise ValueError(f"{ROUTE_ENV}=split runs torch's CPU flash-attention kernels, which do not exist {where}; "
                         "unset it for the device's default route, or name causal-bias, bool-mask or varlen")
    if forced is not None:
        return forced
    if device.type == "cuda":
        return "causal-bias"
    return "split" if device.type == "cpu" and _cpu_flash_ops() is not None else "bool-mask"


def varlen_attn_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                         max_q: int, max_k: int, *, scale: float | None = None,
                         window_size: tuple[int, int] = (-1, 0)) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn's causal case (``window_size=(-1, 0)``: each segment's
    last query aligned with its last key), one SDPA per segment: the route ``varlen`` off CUDA,
    where torch has no variable-length kernel. Same arguments, [T_q, heads, hn] out."""
    if tuple(window_size) != (-1, 0):
        raise ValueError(f"only the causal window (-1, 0) is emulated, got {window_size}")
    bq, bk = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(bq) - 1):
        lq, lk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        if not (0 < lq <= lk and lq <= max_q and lk <= max_k):
            raise ValueError(f"segment {i}: {lq} queries, {lk} keys (longest {max_q}, {max_k})")
        qs, ks, vs = (t.permute(1, 0, 2)[None] for t in (q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]]))
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)[0].permute(1, 0, 2))
    return torch.cat(outs)


def _varlen_attention(plan: GroupAttentionPlan, qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Route ``varlen``: the keys and values gathered segment after segment (one index_select
    each), one variable-length causal call, padding zeroed. [b * s, heads, hn] in and out."""
    vp = plan.varlen
    if vp is None:
        raise RuntimeError(f"this GroupAttentionPlan was built without its variable-length form: set {ROUTE_ENV}=varlen "
                           "before the micro-batches are cut (GroupAttentionPlan.build reads it)")
    heads = qf.shape[1]
    kg, vg = (t.index_select(0, vp.k_idx) for t in (kf, vf))
    if kg.shape[1] != heads:  # grouped-query keys and values: expanded after the gather, as the call takes them
        kg, vg = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (kg, vg))
    fn = varlen_attn_emulated
    if qf.is_cuda and qf.dtype not in (torch.float16, torch.bfloat16) and not _varlen_attention.__dict__.get("warned"):
        _varlen_attention.warned = True
        logger.warning("%s=varlen with %s on CUDA: the variable-length flash kernel takes fp16/bf16 only, so each "
                       "segment runs as its own SDPA call (correct, slow); train in bf16 or use causal-bias",
                       ROUTE_ENV, qf.dtype)
    if qf.is_cuda and qf.dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.nn.attention.varlen import varlen_attn as fn
        except ImportError as e:  # torch < 2.10
            raise RuntimeError(f"{ROUTE_ENV}=varlen needs torch.nn.attention.varlen (torch >= 2.10); this torch "
                               f"{torch.__version__} has none: use causal-bias") from e
    out = fn(qf, kg, vg, vp.cu_q, vp.cu_k, vp.max_q, vp.max_k, scale=scale, **_causal_kwargs(fn))
    return out if vp.pad is None else out.masked_fill(vp.pad[:, None, None], 0.0)


@functools.cache
def _causal_kwargs(fn: Any) -> dict[str, Any]:
    """How ``fn`` (torch's varlen_attn, or its emulation) is asked for causal attention with each
    segment's last query aligned with its last key: ``window_size=(-1, 0)`` since torch 2.11,
    ``is_causal=True`` in torch 2.10, where the window did not exist yet. Read once per function
    (cached): the route calls it in every layer's forward."""
    import inspect

    params = inspect.signature(fn).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    if "is_causal" in params:
        return {"is_causal": True}
    raise RuntimeError(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', fn)} takes neither window_size nor "
                       f"is_causal (torch {torch.__version__}): {ROUTE_ENV}=varlen does not know how to make it causal")


def group_attention(plan: GroupAttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None, route: str | None = None) -> torch.Tensor:
    """Attention over group-packed rows by the plan. q [b, n, S, hn], k and v [b, n or fewer
    (grouped-query) heads, S, hn]; returns [b, n, S, hn]; padding positions get zeros (nothing
    reads them: no position attends to padding and no loss sits on it). ``route``: how the member
    blocks run (see :func:`packed_route`; None: the plan's, chosen when it was built; tests and
    benchmarks choose others)."""
    b, n, s, hn = q.shape
    flat = lambda t: t.permute(0, 2, 1, 3).reshape(b * s, t.shape[1], hn)  # noqa: E731
    # index_select (backward: index_add) rather than advanced indexing (backward: a sorting
    # index_put with accumulation, measured 2x slower here); [blocks, L] -> [blocks, heads, L, hn]
    take = lambda t, i: t.index_select(0, i.reshape(-1)).view(*i.shape, t.shape[1], hn).permute(0, 2, 1, 3)  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    route = route or plan.route
    if route not in ROUTES:
        raise ValueError(f"unknown group attention route {route!r} ({', '.join(ROUTES)})")
    if route == "varlen":
        return _varlen_attention(plan, qf, kf, vf, scale).view(b, s, n, hn).permute(0, 2, 1, 3)
    outs = []
    for blk in plan.blocks:
        prefix = blk.k.shape[1] - blk.q.shape[1]
        if route == "split" and prefix:
            # a member block's keys are [prefix ++ its own queries' positions]
            kp = blk.k[:, :prefix]
            ob = _PrefixThenCausal.apply(take(qf, blk.q), take(kf, kp), take(vf, kp), take(kf, blk.q),
                                         take(vf, blk.q), scale)
        else:
            ob = _bottom_right_causal(take(qf, blk.q), take(kf, blk.k), take(vf, blk.k), scale, route)
        outs.append(ob.permute(0, 2, 1, 3).reshape(-1, n, hn).index_select(0, blk.sel))
    # one copy of every block's rows into the zeroed output (per block, an out-of-place index_copy
    # copied the whole output each time, forward and backward)
    out = q.new_zeros(b * s, n, hn)
    if outs:
        out = out.index_copy_(0, plan.pos, outs[0] if len(outs) == 1 else torch.cat(outs))
    return out.view(b, s, n, hn).permute(0, 2, 1, 3)


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention whose forward runs torch's fused scaled_dot_product_attention.

    ``group_plans``: GroupAttentionPlans set by train/packing.py for one micro-batch's forward (and
    kept through its backward pass when the model recomputes activations); a call with one plan's
    mask computes only that plan's allowed blocks. Several are set at once under pipeline
    parallelism with recomputation: the 1F1B schedule runs later micro-batches' forwards before an
    earlier one's backward recomputes its attention, and each call finds its own plan by its mask.
    A mask no plan matches takes the dense masked path (the same result, more work)."""

    group_plans: tuple[GroupAttentionPlan, ...] = ()

    def plan_for(self, attention_mask: Any, rows: int, width: int) -> GroupAttentionPlan | None:
        """The plan made for ``attention_mask`` on [rows, width] inputs, or None."""
        for plan in self.group_plans:
            if plan.rows == rows and plan.width == width and plan.matches(attention_mask):
                return plan
        return None

    def _plain_softmax(self) -> bool:
        cfg = self.config
        return (getattr(cfg, "softmax_type", "vanilla") == "vanilla"
                and not getattr(cfg, "apply_query_key_layer_scaling", False))

    def _no_dropout(self) -> bool:
        return float(getattr(self.config, "attention_dropout", 0.0)) == 0.0

    def _fast_path(self, attention_bias: Any, packed_seq_params: Any) -> bool:
        return (attention_bias is None and packed_seq_params is None and self._plain_softmax()
                and (not self.training or self._no_dropout()))

    def takes_group_plans(self) -> bool:
        """Whether every call of this attention (training or not) runs the fast path, where a
        group-packed micro-batch's attention goes by its GroupAttentionPlan, so that the step may
        hand it a :func:`plan_only_mask` instead of the dense tree mask (Megatron passes no
        attention bias or packed_seq_params to it)."""
        return self._plain_softmax() and self._no_dropout()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        plan_only = is_plan_only_mask(attention_mask, query.shape[0])
        if not self._fast_path(attention_bias, packed_seq_params):
            if plan_only:
                raise RuntimeError("a group-packed micro-batch without its dense attention mask reached an "
                                   "attention path that needs one (attention bias, packed_seq_params, dropout or "
                                   "a non-vanilla softmax); build the layout with dense_mask=True")
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b, heads, hn = query.shape
        groups = key.shape[2]
        # [s, b, n, hn] -> [b, n, s, hn]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        gqa = heads != groups and native_gqa(q)  # CPU: the kernels read the shared heads, no copies
        if heads != groups and not gqa:
            k, v = expand_kv(k, heads), expand_kv(v, heads)
        plan = self.plan_for(attention_mask, b, sq) if self.group_plans else None
        if plan is not None:
            out = group_attention(plan, q, k, v, self.softmax_scale)
        elif plan_only:
            raise RuntimeError(f"a group-packed micro-batch of {b} rows x {sq} positions came without its "
                               "GroupAttentionPlan (and without a dense mask to fall back on)")
        elif attention_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        else:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa)
        # [b, n, s, hn] -> [s, b, n * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def plan_only_mask(rows: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The attention mask of a group-packed micro-batch whose attention runs by its
    GroupAttentionPlan: a [rows, 1, 1, 1] stand-in for the dense [rows, 1, S, S] tree mask (at a
    row of 20,000 positions that one is 400 MB and seconds of CPU time to build). It only ties the
    micro-batch to its plan (GroupAttentionPlan.matches); SDPADotProductAttention refuses it on
    any path that would read it as a mask, and it masks everything, so nothing else can take it
    for a real one."""
    return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)


def is_plan_only_mask(attention_mask: Any, seq_len: int) -> bool:
    """Whether ``attention_mask`` is a :func:`plan_only_mask` for a sequence of ``seq_len`` positions."""
    return (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
            and tuple(attention_mask.shape[-2:]) == (1, 1) and seq_len > 1)


def use_sdpa_core_attention(spec: Any) -> Any:
    """The local layer spec with SDPADotProductAttention as its core attention (in place)."""
    attn = spec.submodules.self_attention.submodules
    if attn.core_attention is DotProductAttention:
        attn.core_attention = SDPADotProductAttention
    return spec


__all__ = ["ROUTES", "ROUTE_ENV", "packed_route", "AttentionBlock", "GroupAttentionPlan", "VarlenPlan", "varlen_attn_emulated", "SDPADotProductAttention", "expand_kv", "group_attention", "is_plan_only_mask",
           "native_gqa", "plan_only_mask",
           "use_sdpa_core_attention"]
