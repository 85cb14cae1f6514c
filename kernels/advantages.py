"""GRPO group advantages in one Triton launch: group mean, std, signal flag and per-rollout advantage.

Contiguous groups (fixed size K): each program loads a [groups x K] tile once and writes
everything. Ragged groups (an id per rollout, any order): each program owns a block of group ids,
streams over all rollouts merging per-chunk statistics (Chan's parallel variance, so no
sum-of-squares cancellation), then streams again to write the advantages of its rollouts: O(N x G)
work in all. When the ids never decrease (the launcher learns it in the same host sync as their
range), each program binary-searches where its groups' rollouts start and end and streams only
those: O(N x BLOCK_G). The
definitions, including exact zeros for all-equal and size-1 groups, are those of
reference.grpo_advantages_reference.
"""

from __future__ import annotations

import torch

from . import buffers
from .buffers import new_buffer
from .reference import resolve_groups, resolve_ragged_groups

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Tile sizes (module-level so tests can shrink them to exercise multi-program / multi-chunk paths).
# Compiled tiles are sized with the warps so that no thread holds more than 16 fp32 (8 fp64) values
# per tile tensor: larger tiles spilled registers on sm_90 (tools/compile_kernels.py shows it).
# Contiguous groups: groups per program = TILE_ELEMENTS // next_pow2(K) (halved for fp64).
TILE_ELEMENTS = 4096
RAGGED_BLOCK_G = 64  # ragged groups: group ids per program
RAGGED_BLOCK_N = 64  # ragged groups: rollouts per chunk on GPU (halved for fp64)
INTERPRET_BLOCK_N = 4096  # ... and in the interpreter, where fewer, larger steps are faster
COMPILED_WARPS = 8  # warps of the compiled advantage kernels (the interpreter ignores warps)

if HAS_TRITON:

    @triton.jit
    def _finish_groups(n, mean, m2, gmax, gmin, eps, UNBIASED: tl.constexpr):
        """From count / mean / M2 / max / min per group to (mean, std, signal) with exact zero-variance."""
        if UNBIASED:
            denom = tl.maximum(n - 1.0, 1.0)
        else:
            denom = tl.maximum(n, 1.0)
        std = tl.where(n > 1.0, tl.sqrt(tl.maximum(m2, 0.0) / denom), 0.0)
        equal = gmax == gmin
        mean = tl.where(equal & (n > 0.0), gmax, mean)
        mean = tl.where(n > 0.0, mean, 0.0)
        std = tl.where(equal | (n < 1.0), 0.0, std)
        signal = (n > 1.0) & (gmax != gmin) & (std > eps)
        return mean, std, signal

    @triton.jit
    def _merge_chunk(r_ptr, idx_ptr, i, ok, g, n, mean, m2, gmax, gmin, ACC: tl.constexpr):
        """Fold one chunk of rollouts (positions i, valid where ok) into the running count, mean,
        M2, max and min of the groups g (Chan's parallel merge; one-hot membership tile)."""
        r = tl.load(r_ptr + i, mask=ok, other=0.0).to(ACC)
        gi = tl.load(idx_ptr + i, mask=ok, other=-1)
        hot = (gi[None, :] == g[:, None]) & ok[None, :]
        n_c = tl.sum(hot.to(ACC), axis=1)
        mean_c = tl.sum(tl.where(hot, r[None, :], 0.0), axis=1) / tl.maximum(n_c, 1.0)
        d = tl.where(hot, r[None, :] - mean_c[:, None], 0.0)
        m2_c = tl.sum(d * d, axis=1)
        n_new = n + n_c
        delta = mean_c - mean
        frac = n_c / tl.maximum(n_new, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_c + delta * delta * n * frac
        gmax = tl.maximum(gmax, tl.max(tl.where(hot, r[None, :], float("-inf")), axis=1))
        gmin = tl.minimum(gmin, tl.min(tl.where(hot, r[None, :], float("inf")), axis=1))
        return n_new, mean, m2, gmax, gmin

    @triton.jit
    def _chunk_advantages(r_ptr, idx_ptr, i, ok, g, mean, scale, ACC: tl.constexpr):
        """Advantages of one chunk of rollouts from their groups' mean and scale, and which of
        the rollouts belong to the groups g."""
        r = tl.load(r_ptr + i, mask=ok, other=0.0).to(ACC)
        gi = tl.load(idx_ptr + i, mask=ok, other=-1)
        hot = (gi[None, :] == g[:, None]) & ok[None, :]
        mine = tl.sum(hot.to(tl.int32), axis=0) > 0
        mu = tl.sum(tl.where(hot, mean[:, None], 0.0), axis=0)
        sc = tl.sum(tl.where(hot, scale[:, None], 0.0), axis=0)
        return (r - mu) * sc, mine

    @triton.jit
    def _store_groups(mean_ptr, std_ptr, sig_ptr, g, g_ok, n, mean, m2, gmax, gmin, eps,
                      NORM: tl.constexpr, UNBIASED: tl.constexpr, ACC: tl.constexpr):
        """Finish and store the groups' mean, std and signal; return (mean, the advantage scale)."""
        mean, std, signal = _finish_groups(n, mean, m2, gmax, gmin, eps, UNBIASED)
        tl.store(mean_ptr + g, mean, mask=g_ok)
        tl.store(std_ptr + g, std, mask=g_ok)
        tl.store(sig_ptr + g, signal.to(tl.uint8), mask=g_ok)
        sig_f = signal.to(ACC)
        if NORM:
            scale = sig_f / (std + eps)
        else:
            scale = sig_f
        return mean, scale

    @triton.jit
    def _adv_contiguous_kernel(
        r_ptr,
        adv_ptr,
        mean_ptr,
        std_ptr,
        sig_ptr,
        n_groups,
        group_size,
        eps,
        NORM: tl.constexpr,
        UNBIASED: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Program p: groups [p*BLOCK_G, (p+1)*BLOCK_G) as a [BLOCK_G, BLOCK_K] tile, one read, one write."""
        g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        k = tl.arange(0, BLOCK_K)
        g_ok = g < n_groups
        valid = g_ok[:, None] & (k[None, :] < group_size)
        offs = g.to(tl.int64)[:, None] * group_size + k[None, :]
        r = tl.load(r_ptr + offs, mask=valid, other=0.0).to(ACC)
        n = tl.sum(valid.to(ACC), axis=1)
        mean = tl.sum(r, axis=1) / tl.maximum(n, 1.0)
        d = tl.where(valid, r - mean[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
        gmax = tl.max(tl.where(valid, r, float("-inf")), axis=1)
        gmin = tl.min(tl.where(valid, r, float("inf")), axis=1)
        mean, std, signal = _finish_groups(n, mean, m2, gmax, gmin, eps, UNBIASED)
        a = r - mean[:, None]
        if NORM:
            a = a / (std[:, None] + eps)
        a = tl.where(signal[:, None], a, 0.0)
        tl.store(adv_ptr + offs, a, mask=valid)
        tl.store(mean_ptr + g, mean, mask=g_ok)
        tl.store(std_ptr + g, std, mask=g_ok)
        tl.store(sig_ptr + g, signal.to(tl.uint8), mask=g_ok)

    @triton.jit
    def _adv_ragged_kernel(
        r_ptr,
        idx_ptr,
        adv_ptr,
        mean_ptr,
        std_ptr,
        sig_ptr,
        n_items,
        n_groups,
        eps,
        NORM: tl.constexpr,
        UNBIASED: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Program p owns group ids [p*BLOCK_G, (p+1)*BLOCK_G); membership is a one-hot tile per chunk."""
        g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = g < n_groups
        cols = tl.arange(0, BLOCK_N)
        n = tl.zeros((BLOCK_G,), ACC)
        mean = tl.zeros((BLOCK_G,), ACC)
        m2 = tl.zeros((BLOCK_G,), ACC)
        gmax = tl.full((BLOCK_G,), float("-inf"), ACC)
        gmin = tl.full((BLOCK_G,), float("inf"), ACC)
        for start in range(0, n_items, BLOCK_N):
            i = start + cols
            n, mean, m2, gmax, gmin = _merge_chunk(r_ptr, idx_ptr, i, i < n_items, g, n, mean, m2, gmax, gmin, ACC)
        mean, scale = _store_groups(mean_ptr, std_ptr, sig_ptr, g, g_ok, n, mean, m2, gmax, gmin, eps,
                                    NORM, UNBIASED, ACC)
        for start in range(0, n_items, BLOCK_N):
            i = start + cols
            adv, mine = _chunk_advantages(r_ptr, idx_ptr, i, i < n_items, g, mean, scale, ACC)
            tl.store(adv_ptr + i, adv, mask=mine)

    @triton.jit
    def _lower_bound_step(idx_ptr, lo, hi, target):
        """One probe of a binary search for the first position in [lo, hi) of the sorted ids whose
        id is not below target; done once lo == hi."""
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(idx_ptr + mid, mask=active, other=0)
        below = v < target
        return tl.where(active & below, mid + 1, lo), tl.where(active & ~below, mid, hi)

    @triton.jit
    def _adv_ragged_sorted_kernel(
        r_ptr,
        idx_ptr,
        adv_ptr,
        mean_ptr,
        std_ptr,
        sig_ptr,
        n_items,
        n_groups,
        eps,
        search_steps,
        NORM: tl.constexpr,
        UNBIASED: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Sorted ids (never decreasing): program p owns group ids [g0, g_end) = [p*BLOCK_G,
        min((p+1)*BLOCK_G, G)), and so the rollouts [first, last) with first the first position
        whose id is not below g0 and last the first whose id is not below g_end: two binary searches
        over the ids (``search_steps`` = ceil(log2(N + 1)) probes each). It streams only that range,
        twice, with the one-hot tiles and Chan merges of _adv_ragged_kernel: O(N * BLOCK_G) work in
        all instead of O(N * G). Ids that no rollout carries get count 0 (mean 0, std 0, no signal)."""
        g0 = tl.program_id(0) * BLOCK_G
        g = g0 + tl.arange(0, BLOCK_G)
        g_ok = g < n_groups
        g_end = tl.minimum(g0 + BLOCK_G, n_groups)
        first = tl.zeros((), tl.int64)
        hi0 = first + n_items
        last = first
        hi1 = hi0
        for _probe in range(0, search_steps):
            first, hi0 = _lower_bound_step(idx_ptr, first, hi0, g0)
            last, hi1 = _lower_bound_step(idx_ptr, last, hi1, g_end)
        cols = tl.arange(0, BLOCK_N)
        n = tl.zeros((BLOCK_G,), ACC)
        mean = tl.zeros((BLOCK_G,), ACC)
        m2 = tl.zeros((BLOCK_G,), ACC)
        gmax = tl.full((BLOCK_G,), float("-inf"), ACC)
        gmin = tl.full((BLOCK_G,), float("inf"), ACC)
        for start in range(first, last, BLOCK_N):
            i = start + cols
            n, mean, m2, gmax, gmin = _merge_chunk(r_ptr, idx_ptr, i, i < last, g, n, mean, m2, gmax, gmin, ACC)
        mean, scale = _store_groups(mean_ptr, std_ptr, sig_ptr, g, g_ok, n, mean, m2, gmax, gmin, eps,
                                    NORM, UNBIASED, ACC)
        for start in range(first, last, BLOCK_N):
            i = start + cols
            ok = i < last
            # every rollout in [first, last) is one of this program's, so ok is its membership too
            adv, in_block = _chunk_advantages(r_ptr, idx_ptr, i, ok, g, mean, scale, ACC)
            tl.store(adv_ptr + i, adv, mask=ok)


def grpo_advantages_triton(
    rewards: torch.Tensor,
    group_size: int | None,
    group_index: torch.Tensor | None,
    norm_by_std: bool,
    unbiased: bool,
    eps: float,
    num_groups: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the advantage kernel; same contract as megatron_recycle_kernels.grpo_advantages."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    out_dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    acc = tl.float64 if out_dt == torch.float64 else tl.float32
    r = rewards.contiguous()
    n = r.numel()
    dev = r.device
    ragged = group_index is not None
    is_sorted = False
    if ragged:
        idx, g, is_sorted = resolve_ragged_groups(n, group_index, num_groups, dev)
        idx = idx.to(torch.int32).contiguous()
    else:
        _, g = resolve_groups(n, group_size, None, num_groups, dev, index=False)
    adv = new_buffer((n,), out_dt, dev)
    mean = new_buffer((g,), out_dt, dev)
    std = new_buffer((g,), out_dt, dev)
    sig = new_buffer((g,), torch.uint8, dev)
    if g == 0:
        return adv, mean, std, sig.view(torch.bool)
    common = dict(NORM=bool(norm_by_std), UNBIASED=bool(unbiased), ACC=acc)
    wide = 2 if out_dt == torch.float64 else 1  # fp64 values take two registers
    compiled = buffers.compiled(dev)
    if not ragged:
        assert group_size is not None
        block_k = triton.next_power_of_2(group_size)
        block_g = max(1, min(triton.next_power_of_2(g), max(1, TILE_ELEMENTS // wide // block_k)))
        # small tiles get fewer warps: at most 16 register words per thread and tile tensor
        warps = max(1, min(COMPILED_WARPS, block_g * block_k * wide // (32 * 16)))
        grid = (triton.cdiv(g, block_g),)
        _adv_contiguous_kernel[grid](
            r, adv, mean, std, sig, g, group_size, float(eps),
            **common, BLOCK_G=block_g, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip
    else:
        block_g = min(triton.next_power_of_2(g), RAGGED_BLOCK_G)
        cap = max(1, RAGGED_BLOCK_N // wide) if compiled else INTERPRET_BLOCK_N
        block_n = min(triton.next_power_of_2(max(n, 1)), cap)
        grid = (triton.cdiv(g, block_g),)
        warps = COMPILED_WARPS if compiled else 1
        if is_sorted:  # each program streams only its own groups' rollouts
            _adv_ragged_sorted_kernel[grid](
                r, idx, adv, mean, std, sig, n, g, float(eps), max(1, n.bit_length()),
                **common, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=warps,
            )  # fmt: skip
        else:
            _adv_ragged_kernel[grid](
                r, idx, adv, mean, std, sig, n, g, float(eps),
                **common, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=warps,
            )  # fmt: skip
    return adv, mean, std, sig.view(torch.bool)
