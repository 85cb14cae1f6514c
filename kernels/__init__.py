"""Triton kernels for the RL math, with PyTorch references (import name: megatron_recycle_kernels).

Public functions (definitions: METHOD.md section 3; ground truth: `reference.py`):
  grpo_advantages, grpo_loss, token_logprobs, chunked_token_logprobs.
Dispatch (resolve_impl): an explicit `impl="triton" | "torch"` argument wins; then the environment
variable MEGATRON_RECYCLE_KERNELS_IMPL=triton|torch; then CUDA tensors run the Triton kernels and
CPU tensors the PyTorch path, unless TRITON_INTERPRET=1 was set before this package's import
(``INTERPRETED``; then the Triton kernels run in the interpreter, which is how CPU tests check
them; it is slow, about 1-3 ms per program, so CPU code that only needs the numbers should pass
impl="torch" or set the variable to torch).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import buffers, reference
from .advantages import grpo_advantages_triton
from .logprobs import (
    HAS_TRITON,
    ChunkedTokenLogprobsFunction,
    TokenLogprobsFunction,
    check_targets,
    vocab_range,
)
from .policy_loss import grpo_loss_triton  # not "grpo_loss.py": a submodule would shadow the function
from .reference import AGG_MODES

__all__ = [
    "AGG_MODES",
    "IMPL_ENV",
    "chunked_token_logprobs",
    "grpo_advantages",
    "grpo_loss",
    "reference",
    "resolve_impl",
    "token_logprobs",
]

_IMPLS = (None, "triton", "torch")
IMPL_ENV = "MEGATRON_RECYCLE_KERNELS_IMPL"


def _defined_for_interpreter() -> bool:
    """Whether Triton defined this process's kernels for its interpreter. Triton decides when a
    kernel is defined (this package's import), from TRITON_INTERPRET in any spelling it accepts
    ("1", "true", "on", "yes"): the dispatch follows that decision, not the variable's value now."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    from .advantages import _finish_groups

    return isinstance(_finish_groups, InterpretedFunction)


INTERPRETED = _defined_for_interpreter()


def resolve_impl(tensor: torch.Tensor, impl: str | None = None) -> str:
    """Pick "triton" or "torch" for a call on `tensor` (see the module docstring for the rule)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not one of 'triton', 'torch' or None (automatic)")
    interpret = INTERPRETED
    if impl is None:
        env = os.environ.get(IMPL_ENV, "").strip().lower() or None
        if env not in _IMPLS:
            raise ValueError(f"{IMPL_ENV}={env!r} is not one of 'triton', 'torch' (or unset for automatic)")
        impl = env
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError(
                "impl='triton' asked for, but triton is not importable; install triton or use impl='torch'"
            )
        if not buffers.compiled(tensor.device) and not interpret:
            raise RuntimeError(
                "impl='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing megatron_recycle_kernels (this process imported it without), move the tensor to "
                "CUDA, or use impl='torch'"
            )
        return "triton"
    if buffers.compiled(tensor.device):
        return "triton" if HAS_TRITON else "torch"
    return "triton" if (interpret and HAS_TRITON) else "torch"


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    norm_by_std: bool = True,
    unbiased: bool = True,
    eps: float = 1e-6,
    *,
    num_groups: int | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-normalized advantages and signal flags for GRPO (one kernel launch on the Triton path).

    Groups are contiguous blocks of `group_size` or given by `group_index` (ids in [0, num_groups),
    any order, ragged). Returns (advantages[N], group_mean[G], group_std[G], signal[G] bool); a
    group of size 1 or with all-equal rewards has advantage exactly 0 and signal False.
    Advantages are float32 (float64 for float64 rewards); they carry no gradient.
    Rewards must be finite: a NaN would make its group look like one without signal. The PyTorch
    path checks (ValueError); the Triton path does not, as the check would cost a host sync per
    launch, so its caller does (the trainer refuses non-finite rewards before the pool sees them).
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (added to the group std before dividing), got {eps}")
    if resolve_impl(rewards, impl) == "torch":
        if rewards.is_floating_point():
            flat = rewards.detach().flatten()
            finite = torch.isfinite(flat)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                raise ValueError(f"rewards must be finite, got {flat[bad].item()} at index {bad}")
        if rewards.dtype != torch.float64:
            rewards = rewards.to(torch.float32)
        with torch.no_grad():
            return reference.grpo_advantages_reference(
                rewards, group_size, group_index, norm_by_std, unbiased, eps, num_groups=num_groups
            )
    return grpo_advantages_triton(rewards, group_size, group_index, norm_by_std, unbiased, eps, num_groups)


def grpo_loss(
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
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate GRPO loss (dual clip and k3 KL optional), differentiable w.r.t. `logprobs`.

    `normalizer` is the global token count (token-mean) or sequence count (seq-mean-*) of the whole
    batch over all micro-batches and data-parallel ranks: summing the per-micro-batch losses then
    gives exactly the full-batch gradient. Stats (detached 0-d tensors, token means over this
    call's unmasked tokens): clip_frac_low, clip_frac_high, dual_clip_frac, ratio_mean, approx_kl,
    ref_kl. See reference.grpo_loss_reference for the precise definition.
    """
    if resolve_impl(logprobs, impl) == "torch":
        return reference.grpo_loss_reference(
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
    return grpo_loss_triton(
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


def _check_temperature(temperature: float) -> float:
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    *,
    impl: str | None = None,
    inplace_backward: bool = False,
    validate_targets: bool = True,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[targets] per row (and the entropy), differentiable w.r.t. logits.

    With `tp_group`, `logits` is this rank's vocabulary shard [T, V/tp] (rank r holds ids
    [r*V/tp, (r+1)*V/tp)); the ranks exchange 4 floats per token in one all_gather and backward
    gives the gradient of the local shard only. Logits are read in their own dtype (bf16 stays
    bf16) and computed in fp32; only the logits themselves and two [T] vectors are kept for
    backward. Outputs are float32 (float64 for float64 logits).

    `inplace_backward=True`: the backward writes the logits' gradient over the logits themselves,
    so no second [T, V] buffer is allocated (the trainer's choice: its logits serve nothing after
    the loss). The logits are then gone; their autograd version is bumped, so any other use of them
    that autograd saved fails loudly (as does a second backward through the same graph) instead
    of reading the gradient.

    `validate_targets=False` skips the target-range check, the call's one host sync (it reads the
    ids' min and max back), so the call can run inside a CUDA graph and never stalls the host;
    for callers that checked the ids themselves (the trainer checks every token id against the
    model's vocabulary when it cuts its micro-batches). A target outside [0, V) then gives a NaN
    log-prob and a NaN gradient row (on every tensor-parallel rank), never another token's value.

    `row_mask` [T] (bool or integer): rows where it is 0 are skipped: log-prob 0, entropy 0 and
    gradient 0, their targets neither read nor judged (an ignored position may hold -100). The
    Triton kernels do not read those rows' logits at all (the backward only writes their zero
    gradient), which is what a caller scoring every position of a sequence saves on the masked
    ones; the PyTorch path computes them and zeroes the results.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be [T, V] (flatten batch and sequence first), got shape {tuple(logits.shape)}"
        )
    inv_temp = _check_temperature(temperature)
    check_targets(targets, logits.shape[0], vocab_range(logits.shape[1], tp_group)[1], validate_targets, row_mask)
    use_triton = resolve_impl(logits, impl) == "triton"
    if use_triton and logits.stride(1) != 1:
        logits = logits.contiguous()
    logp, entropy = TokenLogprobsFunction.apply(
        logits, targets.contiguous(), inv_temp, tp_group, use_triton, return_entropy, bool(inplace_backward),
        None if row_mask is None else row_mask.contiguous(),
    )
    return (logp, entropy) if return_entropy else logp


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int = 4096,
    return_entropy: bool = False,
    *,
    impl: str | None = None,
    validate_targets: bool = True,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs(hidden @ weight.T, ...) without ever holding more than [chunk_size, V_local] logits.

    `weight` is the output layer (or this rank's vocabulary shard of it, [V/tp, H]); differentiable
    w.r.t. hidden and weight. With tp_group the hidden gradient is all-reduced over the group.
    `validate_targets`, `row_mask`: as in token_logprobs (the masked rows' logits are still
    computed, chunk by chunk with the others, but not read after; their gradient rows are 0).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [T, H] and weight [V_local, H] with the same H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 row, got {chunk_size}")
    inv_temp = _check_temperature(temperature)
    check_targets(targets, hidden.shape[0], vocab_range(weight.shape[0], tp_group)[1], validate_targets, row_mask)
    use_triton = resolve_impl(hidden, impl) == "triton"
    logp, entropy = ChunkedTokenLogprobsFunction.apply(
        hidden, weight, targets.contiguous(), inv_temp, tp_group, use_triton, int(chunk_size), return_entropy,
        None if row_mask is None else row_mask.contiguous(),
    )
    return (logp, entropy) if return_entropy else logp
