"""The kernels at the exact launch configurations they use on CUDA, run through the interpreter.

On a CPU the launchers normally pick interpreter-friendly tiles (one program per row, wide
blocks). Here `buffers.compiled` is forced to True, so they choose what a CUDA launch chooses
(the tiles tools/compile_kernels.py compiles for sm_90: 4,096-wide vocabulary blocks, 2,048-token
loss blocks, the advantage tiles sized against register spills), and the results are checked
against the float64 references with sizes that need several blocks or chunks of those tiles.
"""

from __future__ import annotations

import pytest
import torch
from megatron_recycle_kernels import buffers, grpo_advantages, grpo_loss, token_logprobs
from megatron_recycle_kernels.reference import (
    grpo_advantages_reference,
    grpo_loss_reference,
    token_logprobs_reference,
)


@pytest.fixture
def cuda_configs(triton_device, monkeypatch) -> torch.device:
    if triton_device.type == "cuda":  # already the real thing
        return triton_device
    monkeypatch.setattr(buffers, "compiled", lambda device: True)
    return triton_device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [5, 16])
def test_advantages_contiguous(cuda_configs, dtype, k):
    # 700 groups: more than one 4,096-element (2,048 for fp64) tile
    g = torch.Generator().manual_seed(k)
    n_groups = 700
    r = torch.randint(0, 3, (n_groups * k,), generator=g).double()
    r[:k] = 1.0  # an all-equal group
    out = grpo_advantages(r.to(dtype).to(cuda_configs), group_size=k, impl="triton")
    ref = grpo_advantages_reference(r, group_size=k)
    for got, want in zip(out[:3], ref[:3]):
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3].cpu(), ref[3]) and not out[3][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_advantages_ragged(cuda_configs, dtype):
    # 300 rollouts over 70 group ids: several 64-id programs and several 64 (32 for fp64) rollout chunks
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 70, (300,), generator=g)
    r = torch.rand(300, generator=g, dtype=torch.float64)
    out = grpo_advantages(r.to(dtype).to(cuda_configs), group_index=idx.to(cuda_configs), impl="triton")
    ref = grpo_advantages_reference(r, group_index=idx)
    for got, want in zip(out[:3], ref[:3]):
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3].cpu(), ref[3])


def _loss_against_reference(dev, n, cols, with_ref, clip_c, agg, seed, grad_atol, stat_names):
    """grpo_loss (Triton) on random fp32 rows against the float64 reference: loss, gradient and
    the named statistics."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, cols, generator=g, dtype=torch.float64) * 3
    old = lp + 0.8 * torch.randn(n, cols, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(n, cols, generator=g, dtype=torch.float64) if with_ref else None
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, cols, generator=g) < 0.7
    kw = dict(clip_c=clip_c, kl_beta=0.05 if with_ref else 0.0, agg=agg, max_len=cols)
    x = lp.float().to(dev).requires_grad_(True)
    loss, stats = grpo_loss(x, old.float().to(dev), adv.float().to(dev), mask.to(dev),
                            ref_logprobs=None if ref is None else ref.float().to(dev), impl="triton", **kw)
    loss.backward()
    xr = lp.clone().requires_grad_(True)
    want, want_stats = grpo_loss_reference(xr, old, adv, mask, ref_logprobs=ref, **kw)
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=grad_atol, rtol=1e-5)
    for name in stat_names:
        torch.testing.assert_close(stats[name].double().cpu(), want_stats[name].double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cols,with_ref,clip_c", [(4500, True, 3.0), (1023, False, None)])
def test_grpo_loss(cuda_configs, cols, with_ref, clip_c):
    # 4,500 columns: three 2,048-token blocks per row, the last one partial
    _loss_against_reference(cuda_configs, 3, cols, with_ref, clip_c, "seq-mean-token-mean", cols, 1e-8,
                            ("clip_frac_low", "clip_frac_high", "ratio_mean"))


@pytest.mark.parametrize("rows_per_step,warps,n", [(16, 1, 40), (64, 2, 150), (2048, 16, 40)])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_finish_over_several_steps(cuda_configs, rows_per_step, warps, n, agg, monkeypatch):
    """The finish kernel's loop over the rows in steps of FINISH_ROWS, the last step partial (16
    and 64 rows per step: 3 steps; the sweep's 2,048 x 16 warps: one step, mostly masked; the rows
    are few because every row is a forward program, slow in the interpreter): loss, statistics and
    the gradient (whose row coefficient it writes) against the float64 reference."""
    from megatron_recycle_kernels import policy_loss

    monkeypatch.setattr(policy_loss, "FINISH_ROWS", rows_per_step)
    monkeypatch.setattr(policy_loss, "FINISH_WARPS", warps)
    _loss_against_reference(cuda_configs, n, 24, True, 3.0, agg, n, 1e-9,
                            ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "ref_kl"))


@pytest.mark.parametrize("vocab,grad_block", [(9000, 4096), (4096, 4096), (9000, 1024)])
def test_token_logprobs(cuda_configs, vocab, grad_block, monkeypatch):
    # 9,000: three 4,096-wide vocabulary blocks, the last one partial; the gradient kernel also at
    # another of tools/sweep_kernels.py's widths (GRAD_BLOCK_V; warps do not exist in the interpreter)
    from megatron_recycle_kernels import logprobs

    monkeypatch.setattr(logprobs, "GRAD_BLOCK_V", grad_block)
    g = torch.Generator().manual_seed(vocab + grad_block)
    rows = 5
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    tgt = torch.randint(0, vocab, (rows,), generator=g)
    x = logits.float().to(cuda_configs).requires_grad_(True)
    lp, ent = token_logprobs(x, tgt.to(cuda_configs), return_entropy=True, impl="triton")
    (lp.sum() + 0.5 * ent.sum()).backward()
    xr = logits.clone().requires_grad_(True)
    rlp, rent = token_logprobs_reference(xr, tgt, return_entropy=True)
    (rlp.sum() + 0.5 * rent.sum()).backward()
    torch.testing.assert_close(lp.double().cpu(), rlp.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), rent.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=1e-6, rtol=1e-4)
