"""Fused GRPO clipped-surrogate loss: one Triton pass forward, one backward.

Forward: a 2-D grid of (row, token block) programs computes every token's loss term (ratio,
clip, dual clip, k3 KL) and reduces it, with the token counts and the statistics, to per-block
partial sums; a tiny [8, N, blocks] sum finishes the aggregation, so no [N, T] intermediate is
written. Backward recomputes the per-token derivative from the same inputs and scales it by the
row coefficient of the aggregation mode (reference.row_coefficients) times the upstream
gradient, read from device memory (no host sync).
"""

from __future__ import annotations

import torch

from . import buffers
from .buffers import new_buffer, new_buffer_like
from .reference import check_loss_args, row_coefficients

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Rows of the partial-sum buffer written by the forward kernel.
_PG, _KL, _CNT, _CLO, _CHI, _DUAL, _RATIO, _AKL = range(8)
_N_PARTIALS = 8


if HAS_TRITON:

    @triton.jit
    def _token_terms(
        lp, old, ref, adv, m, eps_low, eps_high, clip_c, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr
    ):
        """Per-token (log ratio, ratio, s1, s2, undualed pg, pg, ref log-diff) with masked tokens inert."""
        lr = tl.where(m, lp - old, 0.0)
        ratio = tl.exp(lr)
        s1 = ratio * adv
        s2 = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
        pg1 = -tl.minimum(s1, s2)
        pg = pg1
        if HAS_DUAL:
            pg = tl.where(adv < 0.0, tl.minimum(pg1, -clip_c * adv), pg1)
        pg = tl.where(adv == 0.0, 0.0, pg)
        if HAS_REF:
            dref = tl.where(m, ref - lp, 0.0)
        else:
            dref = tl.zeros_like(lr)
        return lr, ratio, s1, s2, pg1, pg, dref

    @triton.jit
    def _grpo_loss_fwd_kernel(
        lp_ptr,
        old_ptr,
        ref_ptr,
        adv_ptr,
        mask_ptr,
        part_ptr,
        n_rows,
        n_cols,
        stride_lp,
        stride_old,
        stride_ref,
        stride_mask,
        eps_low,
        eps_high,
        clip_c,
        HAS_REF: tl.constexpr,
        HAS_DUAL: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        n_blk = tl.num_programs(1)
        cols = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        inb = cols < n_cols
        m = (tl.load(mask_ptr + row * stride_mask + cols, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_ptr + row * stride_lp + cols, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * stride_old + cols, mask=inb, other=0.0).to(tl.float32)
        if HAS_REF:
            ref = tl.load(ref_ptr + row * stride_ref + cols, mask=inb, other=0.0).to(tl.float32)
        else:
            ref = lp
        adv = tl.load(adv_ptr + row).to(tl.float32)
        lr, ratio, s1, s2, pg1, pg, dref = _token_terms(
            lp, old, ref, adv, m, eps_low, eps_high, clip_c, HAS_REF, HAS_DUAL
        )
        mf = m.to(tl.float32)
        zero = tl.zeros_like(lr)
        adv = adv + zero  # a vector, so that boolean masks combine elementwise (also in the interpreter)
        out = part_ptr + row * n_blk + blk
        stride_p = n_rows * n_blk
        tl.store(out + 0 * stride_p, tl.sum(tl.where(m, pg, zero), axis=0))
        if HAS_REF:
            kl = tl.exp(dref) - dref - 1.0
            tl.store(out + 1 * stride_p, tl.sum(tl.where(m, kl, zero), axis=0))
        else:
            tl.store(out + 1 * stride_p, 0.0)
        tl.store(out + 2 * stride_p, tl.sum(mf, axis=0))
        tl.store(
            out + 3 * stride_p, tl.sum(tl.where(m & (adv < 0.0) & (ratio < 1.0 - eps_low), 1.0, 0.0), axis=0)
        )
        tl.store(
            out + 4 * stride_p, tl.sum(tl.where(m & (adv > 0.0) & (ratio > 1.0 + eps_high), 1.0, 0.0), axis=0)
        )
        if HAS_DUAL:
            tl.store(
                out + 5 * stride_p,
                tl.sum(tl.where(m & (adv < 0.0) & (pg1 > -clip_c * adv), 1.0, 0.0), axis=0),
            )
        else:
            tl.store(out + 5 * stride_p, 0.0)
        tl.store(out + 6 * stride_p, tl.sum(tl.where(m, ratio, zero), axis=0))
        nlr = -lr
        tl.store(out + 7 * stride_p, tl.sum(tl.where(m, tl.exp(nlr) - nlr - 1.0, zero), axis=0))

    @triton.jit
    def _grpo_loss_bwd_kernel(
        lp_ptr,
        old_ptr,
        ref_ptr,
        adv_ptr,
        mask_ptr,
        scale_ptr,
        grad_ptr,
        n_cols,
        stride_lp,
        stride_old,
        stride_ref,
        stride_mask,
        stride_grad,
        eps_low,
        eps_high,
        clip_c,
        kl_beta,
        HAS_REF: tl.constexpr,
        USE_KL: tl.constexpr,
        HAS_DUAL: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        inb = cols < n_cols
        m = (tl.load(mask_ptr + row * stride_mask + cols, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_ptr + row * stride_lp + cols, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * stride_old + cols, mask=inb, other=0.0).to(tl.float32)
        if HAS_REF:
            ref = tl.load(ref_ptr + row * stride_ref + cols, mask=inb, other=0.0).to(tl.float32)
        else:
            ref = lp
        adv = tl.load(adv_ptr + row).to(tl.float32)
        scale = tl.load(scale_ptr + row)
        lr, ratio, s1, s2, pg1, pg, dref = _token_terms(
            lp, old, ref, adv, m, eps_low, eps_high, clip_c, HAS_REF, HAS_DUAL
        )
        adv = adv + tl.zeros_like(lr)
        d = tl.where(s1 <= s2, -ratio * adv, 0.0)
        if HAS_DUAL:
            d = tl.where((adv < 0.0) & (pg1 > -clip_c * adv), 0.0, d)
        d = tl.where(adv == 0.0, 0.0, d)
        if USE_KL:
            d = d + kl_beta * (1.0 - tl.exp(dref))
        g = tl.where(m, d * scale, 0.0)
        tl.store(grad_ptr + row * stride_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=inb)


# Largest token block per program (module-level so tests can shrink it to get several blocks per row).
MAX_BLOCK_T = 2048


def _block_t(n_cols: int, device: torch.device) -> int:
    # In the interpreter the per-program cost dominates, so one block spans a whole row there.
    cap = MAX_BLOCK_T if (buffers.compiled(device) or MAX_BLOCK_T < 2048) else 8192
    return max(16, min(cap, triton.next_power_of_2(max(n_cols, 1))))


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


class GRPOLossFunction(torch.autograd.Function):
    """Fused GRPO loss; returns (loss, stats tensor [6]) and differentiates w.r.t. logprobs only."""

    @staticmethod
    def forward(
        ctx, logprobs, old, adv, mask, ref, eps_low, eps_high, clip_c, kl_beta, agg, normalizer, max_len
    ):  # type: ignore[override]
        n_rows, n_cols = logprobs.shape
        dev = logprobs.device
        block_t = _block_t(n_cols, dev)
        n_blk = max(1, triton.cdiv(n_cols, block_t))
        part = new_buffer((_N_PARTIALS, n_rows, n_blk), torch.float32, dev)
        has_ref = ref is not None
        if n_rows > 0 and n_cols > 0:
            _grpo_loss_fwd_kernel[(n_rows, n_blk)](
                logprobs,
                old,
                ref if has_ref else logprobs,
                adv,
                mask,
                part,
                n_rows,
                n_cols,
                logprobs.stride(0),
                old.stride(0),
                ref.stride(0) if has_ref else 0,
                mask.stride(0),
                float(eps_low),
                float(eps_high),
                float(clip_c or 0.0),
                HAS_REF=has_ref,
                HAS_DUAL=clip_c is not None,
                BLOCK_T=block_t,
                num_warps=4 if buffers.compiled(logprobs.device) else 1,
            )
        else:
            part.zero_()
        rows = part.sum(dim=2, dtype=torch.float64)  # [8, N]
        coef = row_coefficients(rows[_CNT], agg, normalizer, max_len)
        per_row = rows[_PG] + (kl_beta * rows[_KL] if kl_beta != 0.0 else 0.0)
        out_dt = torch.promote_types(logprobs.dtype, torch.float32)
        loss = (coef * per_row).sum().to(out_dt)
        n_tok = rows[_CNT].sum().clamp_min(1.0)
        stats = torch.stack([rows[i].sum() / n_tok for i in (_CLO, _CHI, _DUAL, _RATIO, _AKL, _KL)]).to(
            torch.float32
        )
        ctx.save_for_backward(logprobs, old, adv, mask, ref, coef.to(torch.float32))
        ctx.cfg = (float(eps_low), float(eps_high), clip_c, float(kl_beta), block_t, n_blk)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):  # type: ignore[override]
        logprobs, old, adv, mask, ref, coef = ctx.saved_tensors
        eps_low, eps_high, clip_c, kl_beta, block_t, n_blk = ctx.cfg
        n_rows, n_cols = logprobs.shape
        grad = new_buffer_like(logprobs)
        if n_rows == 0 or n_cols == 0:
            return grad, *([None] * 11)
        scale = (coef * g_loss.to(torch.float32)).contiguous()  # upstream gradient folded in on device
        has_ref = ref is not None
        _grpo_loss_bwd_kernel[(n_rows, n_blk)](
            logprobs,
            old,
            ref if has_ref else logprobs,
            adv,
            mask,
            scale,
            grad,
            n_cols,
            logprobs.stride(0),
            old.stride(0),
            ref.stride(0) if has_ref else 0,
            mask.stride(0),
            grad.stride(0),
            eps_low,
            eps_high,
            float(clip_c or 0.0),
            kl_beta,
            HAS_REF=has_ref,
            USE_KL=has_ref and kl_beta != 0.0,
            HAS_DUAL=clip_c is not None,
            BLOCK_T=block_t,
            num_warps=4 if buffers.compiled(logprobs.device) else 1,
        )
        return grad, *([None] * 11)


_STAT_NAMES = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "ref_kl")


def grpo_loss_triton(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    clip_c: float | None,
    kl_beta: float,
    agg: str,
    normalizer: float | torch.Tensor | None,
    max_len: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Launch the fused loss; same contract as megatron_recycle_kernels.grpo_loss."""
    check_loss_args(
        logprobs,
        old_logprobs,
        advantages,
        loss_mask,
        ref_logprobs,
        eps_low,
        eps_high,
        clip_c,
        kl_beta,
        agg,
        normalizer,
        max_len,
    )
    loss, stats = GRPOLossFunction.apply(
        _rowmajor(logprobs),
        _rowmajor(old_logprobs),
        advantages.contiguous(),
        _rowmajor(loss_mask),
        None if ref_logprobs is None else _rowmajor(ref_logprobs),
        eps_low,
        eps_high,
        clip_c,
        kl_beta,
        agg,
        normalizer,
        max_len,
    )
    return loss, dict(zip(_STAT_NAMES, stats.unbind(0)))
