"""Token log-probabilities (and entropy) over vocabulary-sharded logits, plus a chunked form from hidden states.

One pass over each logits row computes this rank's partial softmax statistics: the running max m,
the sum-exp s = sum exp(z - m), the shifted moment q = sum exp(z - m) * (z - m) (for the entropy)
and the target logit when the target lies in this rank's vocabulary shard. With tensor
parallelism these four numbers per token are exchanged in ONE all_gather and combined locally.
Backward re-reads the logits in their own dtype (no fp32 copy is kept) and writes the gradient
for the local shard only, with no collective:
    dlogp/dz_j = onehot_j - p_j,    dH/dz_j = -p_j * (log p_j + H),    z = logits / temperature.
Two interchangeable backends compute the statistics and the gradient: PyTorch (row-chunked so
the fp32 temporaries stay small) and Triton (the kernels below).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

from . import buffers
from .buffers import new_buffer, new_buffer_like

try:  # the PyTorch path must keep working where triton is absent
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False

_NEG_BIG = -1.0e30  # finite "minus infinity" for the running max, so that 0 * (m_old - m_new) stays 0
TORCH_CHUNK_ELEMENTS = 1 << 22  # elements per fp32 temporary in the PyTorch backend (16 MiB)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _logprob_stats_kernel(
        logits_ptr,
        stride_row,
        targets_ptr,
        stats_ptr,
        mask_ptr,
        logp_ptr,
        ent_ptr,
        lse_ptr,
        n_rows,
        n_vocab,
        vocab_start,
        vocab_total,
        inv_temp,
        WITH_ENT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        FINAL: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: online max / sum-exp / shifted moment, plus the target logit (NaN
        for a target outside the whole vocabulary [0, vocab_total), on every rank: its log-prob
        comes out NaN, never another token's).
        Without WITH_ENT the shifted moment (the entropy's) is neither computed nor reduced: two
        reductions per block instead of three (each crosses the warps), and the moment is stored
        as 0 as the PyTorch path leaves it (the merge then reports the entropy as NaN).
        HAS_MASK: a row whose mask is 0 reads nothing (its target is not looked at either) and
        stores (0, 1, 0, 0); the merge reports it as 0.
        FINAL (one rank holds the whole vocabulary): the row's statistics are merged here, by the
        combine kernel's formulas for one rank, and log p, entropy and log-sum-exp are stored
        instead of (m, s, t, q): one launch for the forward, no [4, T] buffer."""
        row = tl.program_id(0).to(tl.int64)
        keep = True
        if HAS_MASK:
            keep = tl.load(mask_ptr + row) != 0
        if keep:
            base = logits_ptr + row * stride_row
            cols = tl.arange(0, BLOCK_V)
            m = tl.full((), -1.0e30, tl.float32)
            s = tl.zeros((), tl.float32)
            q = tl.zeros((), tl.float32)
            for start in range(0, n_vocab, BLOCK_V):
                idx = start + cols
                valid = idx < n_vocab
                z = tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
                m_new = tl.maximum(m, tl.max(z, axis=0))
                alpha = tl.exp(m - m_new)
                d = tl.where(valid, z - m_new, 0.0)
                e = tl.where(valid, tl.exp(d), 0.0)
                if WITH_ENT:
                    ed = e * tl.where(e > 0.0, d, 0.0)  # -inf logits: 0, not 0 * -inf
                    q = alpha * (q + s * (m - m_new)) + tl.sum(ed, axis=0)
                s = alpha * s + tl.sum(e, axis=0)
                m = m_new
            tgt_id = tl.load(targets_ptr + row).to(tl.int64)
            tgt = tgt_id - vocab_start
            here = (tgt >= 0) & (tgt < n_vocab)
            t = tl.load(base + tl.where(here, tgt, 0), mask=here, other=0.0).to(tl.float32) * inv_temp
            t = tl.where((tgt_id < 0) | (tgt_id >= vocab_total), float("nan"), t)
            if FINAL:  # _logprob_combine_kernel with world = 1, term for term (the same bits)
                big_m = tl.maximum(m, -1.0e30)
                total = tl.exp(m - big_m) * s
                lse = big_m + tl.log(total)
                tl.store(lse_ptr + row, lse)
                tl.store(logp_ptr + row, (t - lse).to(logp_ptr.dtype.element_ty))
                if WITH_ENT:
                    w = tl.exp(m - big_m) * s / total
                    q_over_s = tl.where(s > 0.0, q / tl.where(s > 0.0, s, 1.0), 0.0)
                    ent = tl.log(total) + w * (big_m - m - q_over_s)
                else:
                    ent = tl.full((), float("nan"), tl.float32)
                tl.store(ent_ptr + row, ent.to(ent_ptr.dtype.element_ty))
            else:
                tl.store(stats_ptr + row, m)
                tl.store(stats_ptr + n_rows + row, s)
                tl.store(stats_ptr + 2 * n_rows + row, t)
                tl.store(stats_ptr + 3 * n_rows + row, q)
        else:
            if FINAL:  # what the merge reports for a masked row
                tl.store(lse_ptr + row, 0.0)
                tl.store(logp_ptr + row, tl.zeros((), logp_ptr.dtype.element_ty))
                if WITH_ENT:
                    tl.store(ent_ptr + row, tl.zeros((), ent_ptr.dtype.element_ty))
                else:
                    tl.store(ent_ptr + row, tl.full((), float("nan"), ent_ptr.dtype.element_ty))
            else:
                tl.store(stats_ptr + row, 0.0)
                tl.store(stats_ptr + n_rows + row, 1.0)
                tl.store(stats_ptr + 2 * n_rows + row, 0.0)
                tl.store(stats_ptr + 3 * n_rows + row, 0.0)

    @triton.jit
    def _logprob_grad_kernel(
        logits_ptr,
        stride_row,
        targets_ptr,
        lse_ptr,
        ent_ptr,
        g_lp_ptr,
        g_ent_ptr,
        grad_ptr,
        mask_ptr,
        stride_grad_row,
        n_vocab,
        vocab_start,
        vocab_total,
        inv_temp,
        HAS_G_LP: tl.constexpr,
        HAS_G_ENT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program per row: grad_logits = inv_temp * (g_lp*(onehot - p) - g_ent*p*(log p + H));
        a row whose target lies outside the whole vocabulary gets NaN (its log-prob is NaN too).
        HAS_MASK: a row whose mask is 0 gets zeros, its logits unread."""
        row = tl.program_id(0).to(tl.int64)
        gbase = grad_ptr + row * stride_grad_row
        cols = tl.arange(0, BLOCK_V)
        keep = True
        if HAS_MASK:
            keep = tl.load(mask_ptr + row) != 0
        if keep:
            base = logits_ptr + row * stride_row
            lse = tl.load(lse_ptr + row)
            tgt_id = tl.load(targets_ptr + row).to(tl.int64)
            tgt = tgt_id - vocab_start
            lse = tl.where((tgt_id < 0) | (tgt_id >= vocab_total), float("nan"), lse)  # poisons the whole row
            if HAS_G_LP:
                g_lp = tl.load(g_lp_ptr + row).to(tl.float32)
            else:
                g_lp = 0.0
            if HAS_G_ENT:
                g_ent = tl.load(g_ent_ptr + row).to(tl.float32)
                ent = tl.load(ent_ptr + row)
            else:
                g_ent = 0.0
                ent = 0.0
            for start in range(0, n_vocab, BLOCK_V):
                idx = start + cols
                valid = idx < n_vocab
                z = tl.load(base + idx, mask=valid, other=0.0).to(tl.float32) * inv_temp
                logp = z - lse
                p = tl.exp(logp)
                g = -g_lp * p
                g = tl.where(idx == tgt, g + g_lp, g)
                if HAS_G_ENT:
                    g = g - g_ent * p * tl.where(p > 0.0, logp + ent, 0.0)
                tl.store(gbase + idx, (g * inv_temp).to(grad_ptr.dtype.element_ty), mask=valid)
        else:
            zero = tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty)
            for start in range(0, n_vocab, BLOCK_V):
                idx = start + cols
                tl.store(gbase + idx, zero, mask=idx < n_vocab)

    @triton.jit
    def _logprob_combine_kernel(
        stats_ptr,
        logp_ptr,
        ent_ptr,
        lse_ptr,
        mask_ptr,
        n_rows,
        world,
        WITH_ENT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Merge the ranks' (m, s, t, q) [world, 4, T] into log p, entropy and log-sum-exp [T]
        (combine_stats' formulas); entropy NaN when not asked for (never a silent wrong value).
        HAS_MASK: a row whose mask is 0 gets log p 0 and entropy 0 (NaN when not asked for)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n_rows
        if HAS_MASK:
            keep = tl.load(mask_ptr + rows, mask=ok, other=0) != 0
        big_m = tl.full([BLOCK], -1.0e30, tl.float32)
        for r in range(0, world):
            big_m = tl.maximum(big_m, tl.load(stats_ptr + (4 * r) * n_rows + rows, mask=ok, other=0.0))
        total = tl.zeros([BLOCK], tl.float32)
        t_sum = tl.zeros([BLOCK], tl.float32)
        for r in range(0, world):
            base = stats_ptr + (4 * r) * n_rows + rows
            m = tl.load(base, mask=ok, other=0.0)
            total += tl.exp(m - big_m) * tl.load(base + n_rows, mask=ok, other=1.0)
            t_sum += tl.load(base + 2 * n_rows, mask=ok, other=0.0)
        lse = big_m + tl.log(total)
        logp = t_sum - lse
        if HAS_MASK:
            logp = tl.where(keep, logp, 0.0)
        tl.store(lse_ptr + rows, lse, mask=ok)
        tl.store(logp_ptr + rows, logp.to(logp_ptr.dtype.element_ty), mask=ok)
        if WITH_ENT:
            # H = log(total) + sum_r w_r (M - m_r - q_r / s_r), w_r = exp(m_r - M) s_r / total
            acc = tl.zeros([BLOCK], tl.float32)
            for r in range(0, world):
                base = stats_ptr + (4 * r) * n_rows + rows
                m = tl.load(base, mask=ok, other=0.0)
                s = tl.load(base + n_rows, mask=ok, other=1.0)
                q = tl.load(base + 3 * n_rows, mask=ok, other=0.0)
                w = tl.exp(m - big_m) * s / total
                q_over_s = tl.where(s > 0.0, q / tl.where(s > 0.0, s, 1.0), 0.0)
                acc += w * (big_m - m - q_over_s)
            ent = tl.log(total) + acc
            if HAS_MASK:
                ent = tl.where(keep, ent, 0.0)
        else:
            ent = tl.full([BLOCK], float("nan"), tl.float32)
        tl.store(ent_ptr + rows, ent.to(ent_ptr.dtype.element_ty), mask=ok)


# Largest vocabulary block per program step (module-level so tests can shrink it to exercise the loop).
MAX_BLOCK_V = 4096


def _block_v(n_vocab: int, device: torch.device) -> int:
    """Block width over the vocabulary: big blocks in the interpreter (per-program cost dominates)."""
    cap = MAX_BLOCK_V if buffers.compiled(device) or MAX_BLOCK_V < 4096 else 16384
    return max(16, min(cap, triton.next_power_of_2(max(n_vocab, 1))))


# The forward statistics kernel's launch on a GPU. Measured on an H200 (2026-11-30, bf16 logits,
# V = 151,936, tools/sweep_kernels.py): BLOCK_V 2048 with 4 warps read 16,384 rows in 1.92 ms
# (62% of copy bandwidth) against 2.00 ms for 4096 / 8 and 2.20 ms for 8192 / 16; a per-lane
# online softmax (no reduction inside the loop) was slower in every configuration tried (2.09 ms
# at best) and is gone. None: the Triton default (num_stages).
STATS_BLOCK_V = 2048
STATS_WARPS = 4
STATS_STAGES: int | None = None


def _stats_triton(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float, with_entropy: bool,
    vocab_total: int, row_mask: torch.Tensor | None = None,
    final: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """This rank's [4, T] statistics (m, s, t, q). ``vocab_total``: the whole vocabulary's size
    (``vocab_range``'s second value); a target outside it gets t = NaN. ``row_mask`` [T]: rows
    where it is 0 are not read. ``final`` (logp, entropy, lse), three [T] tensors, when this rank
    holds the whole vocabulary: the kernel merges each row itself and writes them (what
    ``_merge`` would give, bit for bit) instead of the statistics, and None is returned."""
    rows, vocab = logits.shape
    stats = None if final is not None else new_buffer((4, rows), torch.float32, logits.device)
    if rows == 0:
        return stats
    if buffers.compiled(logits.device):
        block_v = max(16, min(STATS_BLOCK_V, MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 1))))
        launch = dict(num_warps=STATS_WARPS) | ({} if STATS_STAGES is None else dict(num_stages=STATS_STAGES))
    else:  # the interpreter: one "warp", large blocks (see _block_v)
        block_v, launch = _block_v(vocab, logits.device), dict(num_warps=1)
    logp, ent, lse = final if final is not None else (stats, stats, stats)
    _logprob_stats_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        lse if stats is None else stats,
        targets if row_mask is None else row_mask,
        logp,
        ent,
        lse,
        rows,
        vocab,
        vocab_start,
        vocab_total,
        inv_temp,
        WITH_ENT=bool(with_entropy),
        HAS_MASK=row_mask is not None,
        FINAL=final is not None,
        BLOCK_V=block_v,
        **launch,
    )
    return stats


def _out_dtype(in_dtype: torch.dtype) -> torch.dtype:
    """log p's and the entropy's dtype: float32, float64 for float64 inputs."""
    return in_dtype if in_dtype == torch.float64 else torch.float32


def _merged_outputs(rows: int, in_dtype: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (logp, entropy, lse) [rows] for a merge from ``in_dtype`` logits: the merge kernel's
    outputs, or ``_stats_triton(final=...)``'s."""
    out_dt = _out_dtype(in_dtype)
    return new_buffer((rows,), out_dt, dev), new_buffer((rows,), out_dt, dev), new_buffer((rows,), torch.float32, dev)


def _grad_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_temp: float,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    vocab_total: int,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    rows, vocab = logits.shape
    grad = new_buffer_like(logits) if out is None else out
    if rows == 0:
        return grad
    _logprob_grad_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        lse,
        ent,
        g_lp if g_lp is not None else lse,
        g_ent if g_ent is not None else lse,
        grad,
        targets if row_mask is None else row_mask,
        grad.stride(0),
        vocab,
        vocab_start,
        vocab_total,
        inv_temp,
        HAS_G_LP=g_lp is not None,
        HAS_G_ENT=g_ent is not None,
        HAS_MASK=row_mask is not None,
        **_grad_launch(vocab, logits.device),
    )
    return grad


# The gradient kernel's launch on a GPU (a read and a write of the logits). Measured on an H200
# (2026-11-30, bf16, V = 151,936, 16,384 rows): 2.6 ms at 4096 / 8 warps, about 3.8 TB/s, against
# liger-kernel's backward's 2.5 ms on the same logits; tools/sweep_kernels.py tries other settings.
GRAD_BLOCK_V = 4096
GRAD_WARPS = 8
GRAD_STAGES: int | None = None


def _grad_launch(vocab: int, device: torch.device) -> dict:
    """BLOCK_V and launch options of the gradient kernel (the interpreter's: see _block_v)."""
    if not buffers.compiled(device):
        return dict(BLOCK_V=_block_v(vocab, device), num_warps=1)
    block_v = max(16, min(GRAD_BLOCK_V, MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 1))))
    return dict(BLOCK_V=block_v, num_warps=GRAD_WARPS) | ({} if GRAD_STAGES is None else dict(num_stages=GRAD_STAGES))


# --------------------------------------------------------------------------------------------------
# PyTorch backend (same quantities, row-chunked fp32 temporaries)
# --------------------------------------------------------------------------------------------------


def _row_chunk(vocab: int) -> int:
    """Rows per fp32 temporary in the PyTorch backend: about TORCH_CHUNK_ELEMENTS elements."""
    return max(1, TORCH_CHUNK_ELEMENTS // max(vocab, 1))


def _stats_torch(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float, with_entropy: bool,
    vocab_total: int, row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    rows, vocab = logits.shape
    dt = torch.promote_types(logits.dtype, torch.float32)
    stats = torch.zeros((4, rows), dtype=dt, device=logits.device)
    tgt = targets.long() - vocab_start
    here = (tgt >= 0) & (tgt < vocab)
    outside = (targets < 0) | (targets >= vocab_total)  # outside the whole vocabulary: t = NaN
    if row_mask is not None:  # masked rows are computed here (the merge zeroes them), their ids not judged
        outside &= row_mask.bool()
    step = _row_chunk(vocab)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        borrowed = inv_temp == 1.0 and logits.dtype == dt
        if borrowed:
            z = logits[a:b]  # read in place: no scaled copy needed
        else:
            z = logits[a:b].to(dt, copy=True).mul_(inv_temp)  # the only copies alive: z and e, [step, V] each
        t = z.gather(1, tgt[a:b].clamp(0, max(vocab - 1, 0))[:, None]).squeeze(1)
        stats[2, a:b] = torch.where(here[a:b], t, torch.zeros_like(t))
        m = z.amax(dim=1).clamp_min(_NEG_BIG)
        z = z.sub(m[:, None]) if borrowed else z.sub_(m[:, None])  # never write into the caller's logits
        e = z.exp()
        stats[0, a:b] = m
        stats[1, a:b] = e.sum(dim=1)
        if with_entropy:
            z.masked_fill_(e == 0, 0.0)  # -inf logits: 0 * -inf would be NaN
            stats[3, a:b] = e.mul_(z).sum(dim=1)
    stats[2].masked_fill_(outside, float("nan"))
    return stats


def _grad_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    inv_temp: float,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_lp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    vocab_total: int,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    rows, vocab = logits.shape
    dt = torch.promote_types(logits.dtype, torch.float32)
    grad = torch.empty_like(logits) if out is None else out
    tgt = targets.long() - vocab_start
    here = (tgt >= 0) & (tgt < vocab)
    # a target outside the whole vocabulary: a NaN log-sum-exp poisons its row's gradient ([T] work)
    outside = (targets < 0) | (targets >= vocab_total)
    if row_mask is not None:  # masked rows: zero upstream gradients give exact zeros ([T] work)
        keep = row_mask.bool()
        outside &= keep
        g_lp = None if g_lp is None else torch.where(keep, g_lp, torch.zeros_like(g_lp))
        g_ent = None if g_ent is None else torch.where(keep, g_ent, torch.zeros_like(g_ent))
    lse = lse.masked_fill(outside, float("nan"))
    step = _row_chunk(vocab)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        unscaled = inv_temp == 1.0 and logits.dtype == dt
        in_place = unscaled and g_ent is None and grad.dtype == dt  # build the gradient in its own rows
        if in_place:
            logp = torch.sub(logits[a:b], lse[a:b, None].to(dt), out=grad[a:b])
        elif unscaled:
            logp = logits[a:b].sub(lse[a:b, None].to(dt))  # one pass instead of copy, scale, shift
        else:
            logp = logits[a:b].to(dt, copy=True).mul_(inv_temp).sub_(lse[a:b, None].to(dt))
        g = logp.exp_() if g_ent is None else logp.exp()  # p; becomes the gradient in place
        if g_ent is not None:
            logp.add_(ent[a:b, None].to(dt)).masked_fill_(g == 0, 0.0).mul_(g)  # p * (log p + H)
        g.mul_(-(g_lp[a:b, None].to(dt) if g_lp is not None else 0.0))
        if g_ent is not None:
            g.sub_(logp.mul_(g_ent[a:b, None].to(dt)))
        if g_lp is not None:
            rows_here = here[a:b].nonzero().squeeze(1)
            g[rows_here, tgt[a:b][rows_here]] += g_lp[a:b][rows_here].to(dt)
        if row_mask is not None:  # exact zeros even where a masked row's logits are inf/NaN (p * 0 = NaN)
            g.masked_fill_(~keep[a:b, None], 0.0)
        if not in_place:
            grad[a:b] = g.mul_(inv_temp)
    return grad


# --------------------------------------------------------------------------------------------------
# Combining partial statistics across tensor-parallel ranks
# --------------------------------------------------------------------------------------------------


def _one_rank(tp_group: dist.ProcessGroup | None) -> bool:
    """Whether this rank holds the whole vocabulary (no group, or a group of one)."""
    return tp_group is None or dist.get_world_size(tp_group) == 1


def gather_stats(stats: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's [4, T] statistics as [world, 4, T]: one all_gather when tp_group has several ranks."""
    if _one_rank(tp_group):
        return stats.unsqueeze(0)
    world = dist.get_world_size(tp_group)
    gathered = torch.empty((world * stats.shape[0], stats.shape[1]), dtype=stats.dtype, device=stats.device)
    # all_gather_single is the newer name (torch >= 2.13); older torch only has all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, stats.contiguous(), group=tp_group)
    return gathered.view(world, *stats.shape)


def combine_stats(
    stats: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-rank (m, s, t, q) [4, T] into (logp, entropy, lse) [T]; one all_gather when tp_group is set."""
    m, s, t, q = gather_stats(stats, tp_group).unbind(1)  # each [world, T]
    big_m = m.amax(dim=0)
    scale = torch.exp(m - big_m) * s  # this rank's share of the global sum-exp (unnormalized)
    total = scale.sum(dim=0)
    lse = big_m + torch.log(total)
    w = scale / total  # probability mass held by each rank
    # H = lse - E[z] with E[z] = sum_r w_r (m_r + q_r / s_r); written to avoid cancellation.
    q_over_s = torch.where(s > 0, q / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    entropy = torch.log(total) + (w * (big_m - m - q_over_s)).sum(dim=0)
    logp = t.sum(dim=0) - lse
    return logp, entropy, lse


def _combine_triton(
    gathered: torch.Tensor, with_entropy: bool, in_dtype: torch.dtype, row_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """combine_stats in one launch, from gather_stats' [world, 4, T]: (logp, entropy, lse fp32) for
    ``in_dtype`` logits."""
    world, _, rows = gathered.shape
    dev = gathered.device
    logp, ent, lse = _merged_outputs(rows, in_dtype, dev)
    if rows:
        block = 1024 if buffers.compiled(dev) else max(16, min(4096, triton.next_power_of_2(rows)))
        _logprob_combine_kernel[(triton.cdiv(rows, block),)](
            gathered, logp, ent, lse, lse if row_mask is None else row_mask, rows, world,
            WITH_ENT=with_entropy, HAS_MASK=row_mask is not None, BLOCK=block,
            num_warps=4 if buffers.compiled(dev) else 1,
        )  # fmt: skip
    return logp, ent, lse


def _merge(
    stats: torch.Tensor, tp_group: dist.ProcessGroup | None, with_entropy: bool, in_dtype: torch.dtype,
    use_triton: bool, row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse) from this rank's statistics, outputs in float32 (float64 for float64
    inputs); entropy NaN when not computed (never a silent wrong value); rows where ``row_mask`` is
    0 give 0. Triton: one launch, not a chain of small PyTorch ops after the pass over the logits."""
    out_dt = _out_dtype(in_dtype)
    if use_triton:
        return _combine_triton(gather_stats(stats, tp_group), with_entropy, in_dtype, row_mask)
    logp, entropy, lse = combine_stats(stats, tp_group)
    if row_mask is not None:
        keep = row_mask.bool()
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    if not with_entropy:
        entropy = torch.full_like(entropy, float("nan"))
    return logp.to(out_dt), entropy.to(out_dt), lse


def vocab_range(n_local: int, tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(first vocab id of this rank's shard, total vocab size) for Megatron's equal contiguous shards."""
    if tp_group is None:
        return 0, n_local
    rank = dist.get_rank(tp_group)
    return rank * n_local, n_local * dist.get_world_size(tp_group)


def check_targets(targets: torch.Tensor, n_rows: int, vocab_total: int, check_range: bool = True,
                  row_mask: torch.Tensor | None = None) -> None:
    """Raise when the targets do not match the rows or (``check_range``: one host sync) fall
    outside the (global) vocabulary where ``row_mask`` (when given) is not 0."""
    if targets.dim() != 1 or targets.numel() != n_rows:
        raise ValueError(
            f"targets must be 1-D with one id per row ({n_rows}), got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, got {targets.dtype}")
    if row_mask is not None:
        if row_mask.shape != targets.shape:
            raise ValueError(f"row_mask must be [T] like the targets, got shape {tuple(row_mask.shape)}")
        if row_mask.dtype.is_floating_point:
            raise TypeError(f"row_mask must be bool or integer, got {row_mask.dtype}")
        if row_mask.device != targets.device:
            raise ValueError(f"row_mask is on {row_mask.device}, the targets on {targets.device}")
    if n_rows and check_range:
        judged = targets if row_mask is None else torch.where(row_mask.bool(), targets, torch.zeros_like(targets))
        lo, hi = torch.stack(torch.aminmax(judged)).tolist()  # one host sync for both bounds
        if lo < 0 or hi >= vocab_total:
            raise ValueError(
                f"target ids must lie in [0, {vocab_total}) (the full vocabulary), got range [{lo}, {hi}]; "
                "mask ignored positions out of the loss instead of using -100"
            )


# --------------------------------------------------------------------------------------------------
# autograd Functions
# --------------------------------------------------------------------------------------------------


class TokenLogprobsFunction(torch.autograd.Function):
    """log p(target) and entropy from (sharded) logits; saves the logits themselves plus [T] stats."""

    @staticmethod
    def forward(ctx, logits, targets, inv_temp, tp_group, use_triton, with_entropy=True, inplace=False,  # type: ignore[override]
                row_mask=None):
        vocab_start, vocab_total = vocab_range(logits.shape[1], tp_group)
        if use_triton and _one_rank(tp_group):  # one launch: the kernel merges its own rows
            logp, entropy, lse = _merged_outputs(logits.shape[0], logits.dtype, logits.device)
            _stats_triton(logits, targets, vocab_start, inv_temp, with_entropy, vocab_total, row_mask,
                          final=(logp, entropy, lse))
        else:
            stats_fn = _stats_triton if use_triton else _stats_torch
            stats = stats_fn(logits, targets, vocab_start, inv_temp, with_entropy, vocab_total, row_mask)
            logp, entropy, lse = _merge(stats, tp_group, with_entropy, logits.dtype, use_triton, row_mask)
        ctx.save_for_backward(logits, targets, lse, entropy, row_mask)
        ctx.inv_temp, ctx.vocab_start, ctx.use_triton, ctx.inplace = inv_temp, vocab_start, use_triton, inplace
        ctx.vocab_total = vocab_total
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):  # type: ignore[override]
        logits, targets, lse, entropy, row_mask = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None, None, None
        grad_fn = _grad_triton if ctx.use_triton else _grad_torch
        grad = grad_fn(
            logits,
            targets,
            ctx.vocab_start,
            ctx.inv_temp,
            lse,
            entropy,
            None if g_lp is None else g_lp.contiguous(),
            None if g_ent is None else g_ent.contiguous(),
            out=logits if ctx.inplace else None,  # each row is read before it is overwritten
            vocab_total=ctx.vocab_total,
            row_mask=row_mask,
        )
        if ctx.inplace:
            increment_version(logits)  # a kernel wrote it: later readers that autograd saved must fail
        return grad, None, None, None, None, None, None, None


class ChunkedTokenLogprobsFunction(torch.autograd.Function):
    """Token log-probs from hidden states and the output weight shard, `chunk` rows of logits at a time.

    Backward recomputes each chunk's logits, turns them into the logits gradient in place and
    multiplies out the hidden and weight gradients, so at most one [chunk, V_local] block exists.
    With tp_group the hidden gradient is all-reduced over the group (the job Megatron's
    ColumnParallelLinear input region does), so callers pass hidden straight in.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, tp_group, use_triton, chunk, with_entropy=True,  # type: ignore[override]
                row_mask=None):
        rows = hidden.shape[0]
        vocab_start, vocab_total = vocab_range(weight.shape[0], tp_group)
        stats_fn = _stats_triton if use_triton else _stats_torch
        final = _merged_outputs(rows, hidden.dtype, hidden.device) if use_triton and _one_rank(tp_group) else None
        stats = None
        for a in range(0, rows, chunk):
            b = min(rows, a + chunk)
            mask_ab = None if row_mask is None else row_mask[a:b]
            if final is not None:  # each chunk's rows merged by the kernel into their slice of the outputs
                _stats_triton(hidden[a:b] @ weight.t(), targets[a:b], vocab_start, inv_temp, with_entropy, vocab_total,
                              mask_ab, final=tuple(t[a:b] for t in final))
                continue
            part = stats_fn(hidden[a:b] @ weight.t(), targets[a:b], vocab_start, inv_temp, with_entropy, vocab_total,
                            mask_ab)
            if stats is None:
                stats = torch.empty((4, rows), dtype=part.dtype, device=hidden.device)
            stats[:, a:b] = part
        if final is not None:
            logp, entropy, lse = final
        else:
            if stats is None:
                stats = torch.zeros((4, 0), dtype=torch.float32, device=hidden.device)
            logp, entropy, lse = _merge(stats, tp_group, with_entropy, hidden.dtype, use_triton, row_mask)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, row_mask)
        ctx.inv_temp, ctx.vocab_start, ctx.vocab_total, ctx.use_triton = inv_temp, vocab_start, vocab_total, use_triton
        ctx.tp_group, ctx.chunk = tp_group, chunk
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):  # type: ignore[override]
        hidden, weight, targets, lse, entropy, row_mask = ctx.saved_tensors
        none = (None,) * 7
        if g_lp is None and g_ent is None:
            return None, None, *none
        grad_fn = _grad_triton if ctx.use_triton else _grad_torch
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulated in the weight's dtype (one rounding per chunk, as Megatron's bf16 grads would be):
        # an fp32 accumulator the size of the vocabulary shard would cost more than the logits saved.
        grad_w = torch.zeros_like(weight) if need_w else None
        for a in range(0, hidden.shape[0], ctx.chunk):
            b = min(hidden.shape[0], a + ctx.chunk)
            logits = hidden[a:b] @ weight.t()
            grad_fn(
                logits,
                targets[a:b],
                ctx.vocab_start,
                ctx.inv_temp,
                lse[a:b],
                entropy[a:b],
                None if g_lp is None else g_lp[a:b].contiguous(),
                None if g_ent is None else g_ent[a:b].contiguous(),
                out=logits,  # the gradient overwrites the recomputed logits: one block alive
                vocab_total=ctx.vocab_total,
                row_mask=None if row_mask is None else row_mask[a:b],
            )
            if need_h:
                grad_h[a:b] = logits @ weight
            if need_w:
                h = hidden[a:b]
                if row_mask is not None:  # a masked row's hidden state may be inf/NaN (0 * NaN = NaN)
                    h = torch.where(row_mask[a:b, None].bool(), h, torch.zeros((), dtype=h.dtype, device=h.device))
                grad_w.addmm_(logits.t(), h)
        if need_h and ctx.tp_group is not None and dist.get_world_size(ctx.tp_group) > 1:
            dist.all_reduce(grad_h, group=ctx.tp_group)
        return grad_h, grad_w, *none
