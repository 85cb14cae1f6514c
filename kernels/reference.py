"""Plain PyTorch definitions of the RL math (METHOD.md section 3): the ground truth for the kernels.

Everything here is dtype-generic (tests run it in float64) and differentiable by autograd. It is
written for clarity, not speed or memory: the Triton kernels and the memory-lean PyTorch paths in
the sibling modules must agree with these functions.
"""

from __future__ import annotations

import numbers

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------------------------------
# Group advantages
# --------------------------------------------------------------------------------------------------


def resolve_groups(
    n: int,
    group_size: int | None,
    group_index: torch.Tensor | None,
    num_groups: int | None,
    device: torch.device,
    index: bool = True,
) -> tuple[torch.Tensor | None, int]:
    """Return (group id per rollout as int64 [N], number of groups G), validating the arguments.
    ``index=False``: contiguous groups get None instead of the ids (the Triton kernel needs none)."""
    if (group_size is None) == (group_index is None):
        raise ValueError(
            "grpo_advantages needs exactly one of group_size (contiguous groups of a fixed size) "
            f"or group_index (one group id per rollout); got group_size={group_size!r} and "
            f"group_index={'a tensor' if group_index is not None else None}"
        )
    if group_size is not None:
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size != 0:
            raise ValueError(
                f"{n} rewards do not split into groups of {group_size}; pass group_index for ragged groups"
            )
        g = n // group_size
        if num_groups is not None and num_groups != g:
            raise ValueError(f"num_groups={num_groups} contradicts {n} rewards / group_size {group_size}")
        return (torch.arange(n, device=device) // group_size if index else None), g
    assert group_index is not None
    idx, g, _ = resolve_ragged_groups(n, group_index, num_groups, device)
    return idx, g


def resolve_ragged_groups(
    n: int, group_index: torch.Tensor, num_groups: int | None, device: torch.device
) -> tuple[torch.Tensor, int, bool]:
    """(group id per rollout as int64 [N], number of groups G, whether the ids never decrease),
    validated, with one host sync for the bounds and the order together. Sorted ids (each group's
    rollouts side by side, the usual layout of a batch) let the Triton kernel give each program only
    its own groups' rollouts."""
    if group_index.dim() != 1 or group_index.numel() != n:
        raise ValueError(
            f"group_index must be 1-D with one entry per reward ({n}), got shape {tuple(group_index.shape)}"
        )
    if group_index.dtype.is_floating_point or group_index.dtype == torch.bool:
        raise TypeError(f"group_index must be an integer tensor, got {group_index.dtype}")
    idx = group_index.to(device=device, dtype=torch.int64)
    if n == 0:
        return idx, int(num_groups or 0), True
    lo, hi = torch.aminmax(idx)
    descents = (idx[1:] < idx[:-1]).sum()
    lo, hi, descents = torch.stack([lo, hi, descents]).tolist()  # one host sync for all three
    if lo < 0:
        raise ValueError(f"group_index has a negative group id ({lo}); ids must be in [0, num_groups)")
    if num_groups is None:
        num_groups = hi + 1
    elif hi >= num_groups:
        raise ValueError(f"group_index has id {hi} but num_groups={num_groups}; pass a larger num_groups")
    return idx, int(num_groups), descents == 0


def grpo_advantages_reference(
    rewards: torch.Tensor,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    norm_by_std: bool = True,
    unbiased: bool = True,
    eps: float = 1e-6,
    num_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO advantages: A_i = (r_i - mean_g) / (std_g + eps) (or r_i - mean_g), 0 for no-signal groups.

    A group carries signal when it has at least 2 members, its rewards are not all equal and its
    std exceeds eps. Returns (advantages[N], mean[G], std[G], signal[G] bool); empty groups have
    mean 0, std 0, no signal. The arithmetic runs in the dtype of `rewards` (float64 in tests).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    r = rewards if rewards.dtype.is_floating_point else rewards.to(torch.float32)
    n = r.numel()
    idx, g = resolve_groups(n, group_size, group_index, num_groups, r.device)
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    total = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, r)
    mean = total / count.clamp_min(1)
    centered = r - mean[idx]
    m2 = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, centered * centered)
    denom = (count - 1) if unbiased else count
    std = torch.where(count > 1, (m2 / denom.clamp_min(1)).sqrt(), torch.zeros_like(m2))
    big = torch.finfo(r.dtype).max
    gmax = torch.full((g,), -big, dtype=r.dtype, device=r.device).scatter_reduce(0, idx, r, "amax")
    gmin = torch.full((g,), big, dtype=r.dtype, device=r.device).scatter_reduce(0, idx, r, "amin")
    equal = gmax == gmin
    # All-equal groups: exact mean, exact zero std (rounding in sum/count must not leak through).
    mean = torch.where(equal & (count > 0), gmax, mean)
    std = torch.where(equal, torch.zeros_like(std), std)
    signal = (count > 1) & ~equal & (std > eps)
    centered = r - mean[idx]
    adv = centered / (std[idx] + eps) if norm_by_std else centered
    adv = torch.where(signal[idx], adv, torch.zeros_like(adv))
    return adv, mean, std, signal


# --------------------------------------------------------------------------------------------------
# Clipped surrogate loss
# --------------------------------------------------------------------------------------------------


def check_loss_args(
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
) -> None:
    """Validate grpo_loss arguments; raise with the offending value and the fix."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("loss_mask", loss_mask)):
        if t.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}"
            )
    if ref_logprobs is not None and ref_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}"
        )
    if advantages.shape != (logprobs.shape[0],):
        raise ValueError(f"advantages must be [N={logprobs.shape[0]}], got shape {tuple(advantages.shape)}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}")
    if agg == "seq-mean-token-sum-norm" and (
        isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len <= 0
    ):
        raise ValueError(f"agg='seq-mean-token-sum-norm' needs a positive integer max_len, got {max_len!r}")
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(
            f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}"
        )
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"dual clip constant clip_c must be > 1 (or None to disable), got {clip_c}")
    if kl_beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_beta={kl_beta} needs ref_logprobs; pass them or set kl_beta=0")
    # A tensor normalizer (a count still on the device) is not read here: checking its value would
    # cost a host sync per call; the caller's count is positive by construction.
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"a tensor normalizer must hold one number, got shape {tuple(normalizer.shape)}")
    elif normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be positive (a global token or sequence count), got {normalizer}")


def row_coefficients(
    row_tokens: torch.Tensor,
    agg: str,
    normalizer: float | torch.Tensor | None,
    max_len: int | None,
) -> torch.Tensor:
    """Per-row weight c_i so that loss = sum_i c_i * sum_t m_it * l_it, from the unmasked count per row.

    token-mean: 1 / D, D = normalizer or the local unmasked-token count (1 if there are none).
    seq-mean-*: 1 / (s_i * D), D = normalizer or the number of rows N; s_i is the row's token
    count (seq-mean-token-mean; 1 for an empty row), 1 (token-sum) or max_len (token-sum-norm).
    Fully masked rows count as sequences in N and contribute 0 loss.
    """
    rt = row_tokens.to(torch.float64)
    n_rows = rt.shape[0]
    ones = torch.ones(n_rows, dtype=torch.float64, device=rt.device)
    if agg == "token-mean":
        d = rt.sum().clamp_min(1.0) if normalizer is None else normalizer
        return ones / d
    d = float(max(n_rows, 1)) if normalizer is None else normalizer
    if agg == "seq-mean-token-mean":
        return 1.0 / (rt.clamp_min(1.0) * d)
    if agg == "seq-mean-token-sum":
        return ones / d
    if agg == "seq-mean-token-sum-norm":
        assert max_len is not None
        return ones / (float(max_len) * d)
    raise ValueError(f"agg={agg!r} is not one of {AGG_MODES}")


def grpo_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float | None = None,
    kl_beta: float = 0.0,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss (+ optional dual clip and k3 KL), aggregated per `agg`.

    Arithmetic runs in the dtype of `logprobs` promoted to at least float32. Masked tokens never
    touch the loss or the gradient (their values may be garbage); a zero advantage gives a zero
    policy term even when the ratio overflows. Stats are token means over unmasked tokens:
    clip_frac_low/high (the clip is active), dual_clip_frac, ratio_mean, approx_kl (k3 of the
    old policy against the current one), ref_kl (k3 to the reference; 0 without one).
    """
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
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    m = loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0
    lp = logprobs.to(dt)
    old = old_logprobs.to(dt)
    adv = advantages.to(dt)[:, None].expand_as(lp)
    zero = torch.zeros((), dtype=dt, device=lp.device)
    log_ratio = torch.where(m, lp - old, zero)
    with torch.no_grad():
        # Tokens whose policy term is flat in the ratio (masked, zero advantage, an active clip or
        # dual clip): no gradient through exp, whose backward would give 0 * inf = NaN where the
        # ratio overflows while the loss stays finite. Loss values are unchanged.
        r0 = torch.exp(log_ratio)
        flat = (~m) | (adv == 0) | ((adv > 0) & (r0 > 1.0 + eps_high)) | ((adv < 0) & (r0 < 1.0 - eps_low))
        if clip_c is not None:
            flat |= (adv < 0) & (-torch.minimum(r0 * adv, torch.clamp(r0, 1.0 - eps_low, 1.0 + eps_high) * adv)
                                 > -clip_c * adv)
    log_ratio = torch.where(flat, log_ratio.detach(), log_ratio)
    ratio = torch.exp(log_ratio)
    s1 = ratio * adv
    s2 = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    pg = -torch.minimum(s1, s2)
    if clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -clip_c * adv), pg)
    pg = torch.where(adv == 0, zero, pg)
    tok = pg
    ref_kl_tok = torch.zeros_like(lp)
    if ref_logprobs is not None:
        d_ref = torch.where(m, ref_logprobs.to(dt) - lp, zero)
        ref_kl_tok = torch.expm1(d_ref) - d_ref  # k3, without exp(d) - d - 1's cancellation at small d
        if kl_beta != 0.0:
            tok = tok + kl_beta * ref_kl_tok
    tok = torch.where(m, tok, zero)
    coef = row_coefficients(m.sum(dim=1), agg, normalizer, max_len).to(dt)
    loss = (coef[:, None] * tok).sum()

    with torch.no_grad():
        mf = m.to(dt)
        n_tok = mf.sum().clamp_min(1.0)
        neg_lr = -log_ratio
        stats = {
            "clip_frac_low": ((adv < 0) & (ratio < 1.0 - eps_low)).to(dt).mul(mf).sum() / n_tok,
            "clip_frac_high": ((adv > 0) & (ratio > 1.0 + eps_high)).to(dt).mul(mf).sum() / n_tok,
            "dual_clip_frac": (
                ((adv < 0) & (-torch.minimum(s1, s2) > -clip_c * adv)).to(dt).mul(mf).sum() / n_tok
                if clip_c is not None
                else zero.clone()
            ),
            "ratio_mean": (ratio * mf).sum() / n_tok,
            "approx_kl": ((torch.expm1(neg_lr) - neg_lr) * mf).sum() / n_tok,
            "ref_kl": (ref_kl_tok * mf).sum() / n_tok,
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------
# Token log-probabilities
# --------------------------------------------------------------------------------------------------


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature) at the target ids, and the entropy of that distribution.

    Computes in the dtype of `logits` promoted to at least float32 (float64 in tests).
    """
    dt = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dt) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # 0 * log 0 = 0: a -inf logit (a padded vocabulary) adds nothing, and no NaN in the backward
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, entropy


def chunked_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unchunked definition of chunked_token_logprobs: logits = hidden @ weight.T, then as above."""
    return token_logprobs_reference(hidden @ weight.t(), targets, temperature, return_entropy)
