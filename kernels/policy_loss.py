"""Fused GRPO clipped-surrogate loss: one Triton pass forward, one backward.

Forward: a 2-D grid of (row, token blocks) programs computes every token's loss term (ratio,
clip, dual clip, k3 KL) and reduces it, with the token counts and the statistics, to per-program
partial sums [8, N, programs per row], so no [N, T] intermediate is written; one more program (the finish
kernel) adds them up in float64 per row, applies the aggregation mode's row coefficients
(reference.row_coefficients) and writes the loss, the six statistics and the mode's denominator.
Backward recomputes the per-token derivative from the same inputs and scales it by the row
coefficient times the upstream gradient, both read from device memory. A forward and backward is
three kernel launches and no host sync: at a few million tokens the inputs are tens of MB, which
an H100 reads in microseconds, so every extra launch would be a visible share of the time
(benchmarks/KERNELS.md).
"""

from __future__ import annotations

import struct

import torch

from . import buffers
from .buffers import new_buffer, new_buffer_like
from .reference import AGG_MODES, check_loss_args

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Rows of the partial-sum buffer the forward kernel writes and the finish kernel reads (by these
# offsets): 0 policy term, 1 reference KL, 2 token count, 3 low clips, 4 high clips, 5 dual clips,
# 6 ratio, 7 approximate KL.
_N_PARTIALS = 8
# How the finish kernel gets the normalizer: none (the local count), a host number, a device tensor.
_NORM_NONE, _NORM_HOST, _NORM_DEVICE = range(3)


if HAS_TRITON:

    @triton.jit
    def _expm1(d):
        """exp(d) - 1, by its series where |d| < 0.1 (the direct form cancels there in fp32)."""
        series = d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (1.0 / 720.0))))))
        return tl.where(tl.abs(d) < 0.1, series, tl.exp(d) - 1.0)

    @triton.jit
    def _k3(d):
        """k3 = exp(d) - d - 1 >= 0, by its series where |d| < 0.1: the direct form's cancellation
        there gave noise, even negative values, at the small log ratios of near on-policy steps."""
        series = d * d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (1.0 / 720.0)))))
        return tl.where(tl.abs(d) < 0.1, series, tl.exp(d) - d - 1.0)

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
    def _load_tokens(
        lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, inb, stride_lp, stride_old, stride_ref, stride_mask,
        HAS_REF: tl.constexpr,
    ):
        """One token block of a row: mask (bool), log-probs, old and reference log-probs in fp32
        (the reference is the log-probs themselves without one)."""
        m = (tl.load(mask_ptr + row * stride_mask + cols, mask=inb, other=0) != 0) & inb
        lp = tl.load(lp_ptr + row * stride_lp + cols, mask=inb, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * stride_old + cols, mask=inb, other=0.0).to(tl.float32)
        if HAS_REF:
            ref = tl.load(ref_ptr + row * stride_ref + cols, mask=inb, other=0.0).to(tl.float32)
        else:
            ref = lp
        return m, lp, old, ref

    @triton.jit
    def _partial_terms(
        lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, n_cols, stride_lp, stride_old, stride_ref, stride_mask,
        adv, eps_low, eps_high, clip_c, HAS_REF: tl.constexpr, HAS_DUAL: tl.constexpr,
    ):
        """The eight per-token terms of one token block whose sums the forward writes (zero where
        masked): policy loss, KL to the reference, token, low-clip, high-clip and dual-clip counts,
        ratio, k3 of old vs current. The forward's one-block path spells the same terms out, reduced
        as they come (fewer live registers: the measured kernel); tests check both paths against
        the float64 reference (test_grpo_loss.py, one block and 2 or 3 per program)."""
        inb = cols < n_cols
        m, lp, old, ref = _load_tokens(
            lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, inb, stride_lp, stride_old, stride_ref, stride_mask, HAS_REF
        )
        lr, ratio, s1, s2, pg1, pg, dref = _token_terms(lp, old, ref, adv, m, eps_low, eps_high, clip_c, HAS_REF, HAS_DUAL)
        a = adv + tl.zeros_like(lr)  # a vector, so that boolean masks combine elementwise (also in the interpreter)
        zero = tl.zeros_like(lr)
        kl = zero
        if HAS_REF:
            kl = tl.where(m, _k3(dref), zero)
        dual = zero
        if HAS_DUAL:
            dual = tl.where(m & (a < 0.0) & (pg1 > -clip_c * a), 1.0, 0.0)
        nlr = -lr
        return (
            tl.where(m, pg, zero),
            kl,
            m.to(tl.float32),
            tl.where(m & (a < 0.0) & (ratio < 1.0 - eps_low), 1.0, 0.0),
            tl.where(m & (a > 0.0) & (ratio > 1.0 + eps_high), 1.0, 0.0),
            dual,
            tl.where(m, ratio, zero),
            tl.where(m, _k3(nlr), zero),
        )

    @triton.jit
    def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
        """Combine function of the forward's joint reduction: eight sums at once."""
        return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7

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
        TILES: tl.constexpr,
        JOINT: tl.constexpr,
    ):
        """Program (row, p) covers TILES token blocks of BLOCK_T from block p * TILES on, adds each
        block's terms into per-lane accumulators and reduces them once: eight partial sums per
        program, whatever TILES (so more tiles per program means fewer reductions per token).
        JOINT: the eight sums in one multi-operand reduction (tl.reduce over a tuple) instead of
        eight: each of the eight crosses the warps through shared memory with its own barriers,
        which made the forward (1.3 TB/s on an H200) much slower than the backward (3.6 TB/s),
        whose loads are the same but which reduces nothing."""
        row = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        n_part = tl.num_programs(1)
        if TILES == 1 and not JOINT:
            # One block, each term reduced as soon as it is computed: the code measured on an H200
            # (2026-11-30), kept as it was. The accumulators below stay live to the loop's end.
            cols = p * BLOCK_T + tl.arange(0, BLOCK_T)
            inb = cols < n_cols
            m, lp, old, ref = _load_tokens(
                lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, inb, stride_lp, stride_old, stride_ref, stride_mask, HAS_REF
            )
            adv = tl.load(adv_ptr + row).to(tl.float32)
            lr, ratio, s1, s2, pg1, pg, dref = _token_terms(
                lp, old, ref, adv, m, eps_low, eps_high, clip_c, HAS_REF, HAS_DUAL
            )
            mf = m.to(tl.float32)
            zero = tl.zeros_like(lr)
            adv = adv + zero  # a vector, so that boolean masks combine elementwise (also in the interpreter)
            out = part_ptr + row * n_part + p
            stride_p = n_rows * n_part
            tl.store(out + 0 * stride_p, tl.sum(tl.where(m, pg, zero), axis=0))
            if HAS_REF:
                kl = _k3(dref)
                tl.store(out + 1 * stride_p, tl.sum(tl.where(m, kl, zero), axis=0))
            else:
                tl.store(out + 1 * stride_p, 0.0)
            tl.store(out + 2 * stride_p, tl.sum(mf, axis=0))
            tl.store(out + 3 * stride_p, tl.sum(tl.where(m & (adv < 0.0) & (ratio < 1.0 - eps_low), 1.0, 0.0), axis=0))
            tl.store(out + 4 * stride_p, tl.sum(tl.where(m & (adv > 0.0) & (ratio > 1.0 + eps_high), 1.0, 0.0), axis=0))
            if HAS_DUAL:
                tl.store(out + 5 * stride_p, tl.sum(tl.where(m & (adv < 0.0) & (pg1 > -clip_c * adv), 1.0, 0.0), axis=0))
            else:
                tl.store(out + 5 * stride_p, 0.0)
            tl.store(out + 6 * stride_p, tl.sum(tl.where(m, ratio, zero), axis=0))
            nlr = -lr
            tl.store(out + 7 * stride_p, tl.sum(tl.where(m, _k3(nlr), zero), axis=0))
        else:
            adv = tl.load(adv_ptr + row).to(tl.float32)
            out = part_ptr + row * n_part + p
            stride_p = n_rows * n_part
            a0 = tl.zeros([BLOCK_T], tl.float32)
            a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
            for i in range(TILES):
                cols = (p * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)
                t0, t1, t2, t3, t4, t5, t6, t7 = _partial_terms(
                    lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, n_cols, stride_lp, stride_old, stride_ref,
                    stride_mask, adv, eps_low, eps_high, clip_c, HAS_REF, HAS_DUAL,
                )
                a0, a1, a2, a3 = a0 + t0, a1 + t1, a2 + t2, a3 + t3
                a4, a5, a6, a7 = a4 + t4, a5 + t5, a6 + t6, a7 + t7
            if JOINT:
                s0, s1, s2, s3, s4, s5, s6, s7 = tl.reduce((a0, a1, a2, a3, a4, a5, a6, a7), 0, _add8)
                tl.store(out + 0 * stride_p, s0)
                tl.store(out + 1 * stride_p, s1)
                tl.store(out + 2 * stride_p, s2)
                tl.store(out + 3 * stride_p, s3)
                tl.store(out + 4 * stride_p, s4)
                tl.store(out + 5 * stride_p, s5)
                tl.store(out + 6 * stride_p, s6)
                tl.store(out + 7 * stride_p, s7)
            else:
                tl.store(out + 0 * stride_p, tl.sum(a0, axis=0))
                tl.store(out + 1 * stride_p, tl.sum(a1, axis=0))
                tl.store(out + 2 * stride_p, tl.sum(a2, axis=0))
                tl.store(out + 3 * stride_p, tl.sum(a3, axis=0))
                tl.store(out + 4 * stride_p, tl.sum(a4, axis=0))
                tl.store(out + 5 * stride_p, tl.sum(a5, axis=0))
                tl.store(out + 6 * stride_p, tl.sum(a6, axis=0))
                tl.store(out + 7 * stride_p, tl.sum(a7, axis=0))

    @triton.jit
    def _grpo_loss_finish_kernel(
        part_ptr,
        loss_ptr,
        stats_ptr,
        denom_ptr,
        norm_ptr,
        n_rows,
        n_part,
        norm_hi,
        norm_lo,
        beta_hi,
        beta_lo,
        max_len,
        AGG: tl.constexpr,
        NORM: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """One program: per-row sums of the forward's partials (float64), the loss under the
        aggregation mode AGG (index into reference.AGG_MODES), the six statistics, and the mode's
        denominator D (backward's row coefficient is 1 / D, or 1 / (D * row tokens) for
        seq-mean-token-mean). Host floats arrive as float32 pairs (hi + lo) to keep float64 precision."""
        stride_p = n_rows * n_part
        zero = tl.zeros([BLOCK_R], dtype=tl.float64)
        acc_loss = zero
        acc_cnt = zero
        acc_kl = zero
        acc_clo = zero
        acc_chi = zero
        acc_dual = zero
        acc_ratio = zero
        acc_akl = zero
        f64 = tl.zeros([], dtype=tl.float64)  # scalar arguments (float32 / int, or Python numbers in the interpreter) + f64
        beta = (f64 + beta_hi) + beta_lo
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = rows < n_rows
            base = part_ptr + rows.to(tl.int64) * n_part
            pg = zero
            kl = zero
            cnt = zero
            for b in range(0, n_part):
                pg += tl.load(base + b, mask=ok, other=0.0).to(tl.float64)
                kl += tl.load(base + (1 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
                cnt += tl.load(base + (2 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
                acc_clo += tl.load(base + (3 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
                acc_chi += tl.load(base + (4 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
                acc_dual += tl.load(base + (5 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
                acc_ratio += tl.load(base + (6 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
                acc_akl += tl.load(base + (7 * stride_p + b), mask=ok, other=0.0).to(tl.float64)
            row_loss = pg + beta * kl
            if AGG == 1:
                row_loss = row_loss / tl.maximum(cnt, 1.0)
            acc_loss += row_loss
            acc_cnt += cnt
            acc_kl += kl
        total_cnt = tl.sum(acc_cnt, axis=0)
        if NORM == 1:
            denom = (f64 + norm_hi) + norm_lo
        elif NORM == 2:
            denom = tl.load(norm_ptr).to(tl.float64)
        elif AGG == 0:
            denom = tl.maximum(total_cnt, 1.0)
        else:
            denom = tl.maximum(f64 + n_rows, 1.0)
        if AGG == 3:
            denom = denom * max_len
        tl.store(denom_ptr, denom)
        tl.store(loss_ptr, (tl.sum(acc_loss, axis=0) / denom).to(loss_ptr.dtype.element_ty))
        n_tok = tl.maximum(total_cnt, 1.0)
        tl.store(stats_ptr + 0, (tl.sum(acc_clo, axis=0) / n_tok).to(tl.float32))
        tl.store(stats_ptr + 1, (tl.sum(acc_chi, axis=0) / n_tok).to(tl.float32))
        tl.store(stats_ptr + 2, (tl.sum(acc_dual, axis=0) / n_tok).to(tl.float32))
        tl.store(stats_ptr + 3, (tl.sum(acc_ratio, axis=0) / n_tok).to(tl.float32))
        tl.store(stats_ptr + 4, (tl.sum(acc_akl, axis=0) / n_tok).to(tl.float32))
        tl.store(stats_ptr + 5, (tl.sum(acc_kl, axis=0) / n_tok).to(tl.float32))

    @triton.jit
    def _grpo_loss_bwd_kernel(
        lp_ptr,
        old_ptr,
        ref_ptr,
        adv_ptr,
        mask_ptr,
        part_ptr,
        denom_ptr,
        g_ptr,
        grad_ptr,
        n_rows,
        n_part,
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
        ROW_MEAN: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        # the row coefficient (reference.row_coefficients) in float64, then times the upstream gradient
        denom = tl.load(denom_ptr)
        if ROW_MEAN:  # seq-mean-token-mean: also divided by the row's unmasked-token count
            cnt_ptr = part_ptr + 2 * n_rows * n_part + row * n_part
            cnt = tl.load(cnt_ptr).to(tl.float64)
            for b in range(1, n_part):
                cnt += tl.load(cnt_ptr + b).to(tl.float64)
            denom = tl.maximum(cnt, 1.0) * denom
        scale = (1.0 / denom).to(tl.float32) * tl.load(g_ptr).to(tl.float32)
        inb = cols < n_cols
        m, lp, old, ref = _load_tokens(
            lp_ptr, old_ptr, ref_ptr, mask_ptr, row, cols, inb, stride_lp, stride_old, stride_ref, stride_mask, HAS_REF
        )
        adv = tl.load(adv_ptr + row).to(tl.float32)
        lr, ratio, s1, s2, pg1, pg, dref = _token_terms(
            lp, old, ref, adv, m, eps_low, eps_high, clip_c, HAS_REF, HAS_DUAL
        )
        adv = adv + tl.zeros_like(lr)
        d = tl.where(s1 <= s2, -ratio * adv, 0.0)
        if HAS_DUAL:
            d = tl.where((adv < 0.0) & (pg1 > -clip_c * adv), 0.0, d)
        d = tl.where(adv == 0.0, 0.0, d)
        if USE_KL:
            d = d - kl_beta * _expm1(dref)
        g = tl.where(m, d * scale, 0.0)
        tl.store(grad_ptr + row * stride_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=inb)


# Largest token block per program (module-level so tests can shrink it to get several blocks per row).
MAX_BLOCK_T = 2048
# Token blocks per forward program (its partial sums are reduced once per program), and the warps
# of the forward and backward programs on a GPU. On an H200 (2026-11-30) with 1 tile of 2048 and 4
# warps the forward read about 1.3 TB/s and the backward 3.6 TB/s; tools/sweep_kernels.py tries
# other settings on the next GPU.
LOSS_FWD_TILES = 1
LOSS_WARPS = 4
# The forward's eight partial sums in one multi-operand reduction instead of eight (JOINT above);
# off (the measured kernel) until tools/sweep_kernels.py has timed it on a GPU.
LOSS_FWD_JOINT = False


def _block_t(n_cols: int, device: torch.device) -> int:
    # In the interpreter the per-program cost dominates, so one block spans a whole row there.
    cap = MAX_BLOCK_T if (buffers.compiled(device) or MAX_BLOCK_T < 2048) else 8192
    return max(16, min(cap, triton.next_power_of_2(max(n_cols, 1))))


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _f32_pair(x: float) -> tuple[float, float]:
    """A host float as two float32 values whose sum is it to about 48 bits: Triton passes Python
    floats to a kernel as float32, which would round a token count above 2**24 or a KL weight."""
    hi = struct.unpack("f", struct.pack("f", float(x)))[0]
    return hi, float(x) - hi


def _normalizer_arg(normalizer: float | torch.Tensor | None, dev: torch.device) -> tuple[int, torch.Tensor | None, float, float]:
    """(mode, device tensor, hi, lo) of the finish kernel's normalizer argument."""
    if normalizer is None:
        return _NORM_NONE, None, 0.0, 0.0
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"a tensor normalizer must hold one number, got shape {tuple(normalizer.shape)}")
        return _NORM_DEVICE, normalizer.reshape(1).to(dev), 0.0, 0.0
    return (_NORM_HOST, None, *_f32_pair(normalizer))


# Rows per step of the finish kernel's loop (one program adds up [8, N, programs per row] partials).
# Its warps on a GPU. On an H200 (2026-11-30) at 512 rows and 4 warps it took 4.4 us at 4M tokens
# and 10.3 us at 16M (4,096-token rows: 1,024 and 4,096 rows, 2 and 8 steps of its loop), a third
# of the forward's time at 16M; tools/sweep_kernels.py tries wider steps with more warps.
FINISH_ROWS = 512
FINISH_WARPS = 4


class GRPOLossFunction(torch.autograd.Function):
    """Fused GRPO loss; returns (loss, stats tensor [6]) and differentiates w.r.t. logprobs only."""

    @staticmethod
    def forward(
        ctx, logprobs, old, adv, mask, ref, eps_low, eps_high, clip_c, kl_beta, agg, normalizer, max_len
    ):  # type: ignore[override]
        n_rows, n_cols = logprobs.shape
        dev = logprobs.device
        compiled = buffers.compiled(dev)
        block_t = _block_t(n_cols, dev)
        n_blk = max(1, triton.cdiv(n_cols, block_t))  # token blocks per row (the backward's grid)
        tiles = max(1, min(int(LOSS_FWD_TILES), n_blk))
        n_part = triton.cdiv(n_blk, tiles)  # forward programs, and partial sums, per row
        warps = LOSS_WARPS if compiled else 1
        has_ref = ref is not None
        if n_rows > 0 and n_cols > 0:
            part = new_buffer((_N_PARTIALS, n_rows, n_part), torch.float32, dev)
            _grpo_loss_fwd_kernel[(n_rows, n_part)](
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
                TILES=tiles,
                JOINT=bool(LOSS_FWD_JOINT),
                num_warps=warps,
            )
        else:  # nothing to reduce: zero partials (at least one element, so the finish kernel has a pointer)
            part = torch.zeros((_N_PARTIALS, max(n_rows, 1), n_part), dtype=torch.float32, device=dev)
        loss = new_buffer((), torch.promote_types(logprobs.dtype, torch.float32), dev)
        stats = new_buffer((len(_STAT_NAMES),), torch.float32, dev)
        denom = new_buffer((1,), torch.float64, dev)
        norm_mode, norm_t, norm_hi, norm_lo = _normalizer_arg(normalizer, dev)
        beta_hi, beta_lo = _f32_pair(kl_beta if has_ref else 0.0)
        block_r = FINISH_ROWS if compiled else max(16, min(4096, triton.next_power_of_2(max(n_rows, 1))))
        _grpo_loss_finish_kernel[(1,)](
            part, loss, stats, denom, denom if norm_t is None else norm_t, n_rows, n_part,
            norm_hi, norm_lo, beta_hi, beta_lo, int(max_len or 0),
            AGG=AGG_MODES.index(agg), NORM=norm_mode, BLOCK_R=block_r, num_warps=FINISH_WARPS if compiled else 1,
        )  # fmt: skip
        ctx.save_for_backward(logprobs, old, adv, mask, ref, part, denom)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the statistics (a launch saved)
        ctx.cfg = (float(eps_low), float(eps_high), clip_c, float(kl_beta), block_t, n_blk, n_part, warps, agg)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):  # type: ignore[override]
        logprobs, old, adv, mask, ref, part, denom = ctx.saved_tensors
        eps_low, eps_high, clip_c, kl_beta, block_t, n_blk, n_part, warps, agg = ctx.cfg
        n_rows, n_cols = logprobs.shape
        if g_loss is None:
            return None, *([None] * 11)
        grad = new_buffer_like(logprobs)
        if n_rows == 0 or n_cols == 0:
            return grad, *([None] * 11)
        has_ref = ref is not None
        _grpo_loss_bwd_kernel[(n_rows, n_blk)](
            logprobs,
            old,
            ref if has_ref else logprobs,
            adv,
            mask,
            part,
            denom,
            g_loss,  # read on the device: no host sync
            grad,
            n_rows,
            n_part,
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
            ROW_MEAN=agg == "seq-mean-token-mean",
            BLOCK_T=block_t,
            num_warps=warps,
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
