"""The kernels against METHOD.md section 3 on numbers worked out by hand (not by the reference),
and the edge cases where floating point used to betray the reference: ratio overflow, the k3
terms at small log ratios, and -inf logits in the entropy.

Every other test compares an implementation with the reference; these pin the reference itself
(and both implementations with it) to the method's formulas.
"""

import math

import pytest
import torch
from megatron_recycle_kernels import grpo_advantages, grpo_loss, token_logprobs
from megatron_recycle_kernels.reference import grpo_loss_reference, token_logprobs_reference

IMPLS = ["torch", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
def test_advantages_by_hand(impl, triton_device):
    # group (0, 1, 1, 0): mean 0.5; unbiased std sqrt(1/3), population std 0.5; eps = 1e-6
    r = torch.tensor([0.0, 1.0, 1.0, 0.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64, device=triton_device)
    adv, mean, std, signal = grpo_advantages(r, group_size=4, impl=impl)
    s = math.sqrt(1 / 3)
    want = [-0.5 / (s + 1e-6), 0.5 / (s + 1e-6), 0.5 / (s + 1e-6), -0.5 / (s + 1e-6)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert mean.tolist() == [0.5, 3.0] and std.tolist() == pytest.approx([s, 0.0]) and signal.tolist() == [True, False]
    pop = grpo_advantages(r, group_size=4, unbiased=False, impl=impl)[0]
    assert pop[:4].tolist() == pytest.approx([-0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6)] * 1 + [0.5 / (0.5 + 1e-6),
                                             -0.5 / (0.5 + 1e-6)], rel=1e-6)
    dr = grpo_advantages(r, group_size=4, norm_by_std=False, impl=impl)[0]  # Dr. GRPO: r - mean
    assert dr.tolist() == pytest.approx([-0.5, 0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])


def _one_token(impl, device, lp, old, adv, **kw):
    """grpo_loss of a single unmasked token (token-mean: the loss is that token's term)."""
    x = torch.tensor([[lp]], dtype=torch.float64, device=device, requires_grad=True)
    loss, stats = grpo_loss(x, torch.tensor([[old]], dtype=torch.float64, device=device),
                            torch.tensor([adv], dtype=torch.float32, device=device),
                            torch.ones(1, 1, dtype=torch.bool, device=device), impl=impl, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), float(g), {k: float(v) for k, v in stats.items()}


@pytest.mark.parametrize("impl", IMPLS)
def test_clipped_surrogate_by_hand(impl, triton_device):
    tol = dict(rel=1e-5, abs=1e-7)
    lr = math.log(1.5)  # ratio 1.5
    # A = +1, ratio 1.5 > 1 + 0.28: clipped at 1.28, flat (no gradient); a high clip
    loss, g, st = _one_token(impl, triton_device, lr, 0.0, 1.0)
    assert loss == pytest.approx(-1.28, **tol) and g == pytest.approx(0.0, abs=1e-7)
    assert st["clip_frac_high"] == 1.0 and st["clip_frac_low"] == 0.0 and st["ratio_mean"] == pytest.approx(1.5, **tol)
    # A = -1, ratio 1.5: -min(-1.5, -1.28) = 1.5, gradient d(ratio)/d(logp) = ratio = 1.5
    loss, g, st = _one_token(impl, triton_device, lr, 0.0, -1.0)
    assert loss == pytest.approx(1.5, **tol) and g == pytest.approx(1.5, **tol) and st["clip_frac_high"] == 0.0
    # ... with the dual clip c = 1.2: min(1.5, 1.2 * 1) = 1.2, flat
    loss, g, st = _one_token(impl, triton_device, lr, 0.0, -1.0, clip_c=1.2)
    assert loss == pytest.approx(1.2, **tol) and g == pytest.approx(0.0, abs=1e-7) and st["dual_clip_frac"] == 1.0
    # A = -2, ratio 0.5 < 1 - 0.2: -min(-1.0, -1.6) = 1.6, flat; a low clip
    loss, g, st = _one_token(impl, triton_device, math.log(0.5), 0.0, -2.0)
    assert loss == pytest.approx(1.6, **tol) and g == pytest.approx(0.0, abs=1e-7) and st["clip_frac_low"] == 1.0
    # A = +2, ratio 0.5: -min(1.0, 1.6) = -1.0, gradient -A * ratio = -1.0
    loss, g, _ = _one_token(impl, triton_device, math.log(0.5), 0.0, 2.0)
    assert loss == pytest.approx(-1.0, **tol) and g == pytest.approx(-1.0, **tol)
    # approx_kl is k3 of the old policy against the current one: exp(old - lp) - (old - lp) - 1
    _, _, st = _one_token(impl, triton_device, lr, 0.0, 1.0)
    assert st["approx_kl"] == pytest.approx(1 / 1.5 + lr - 1, **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_k3_kl_term_by_hand(impl, triton_device):
    # KL to the reference, k3 = exp(ref - lp) - (ref - lp) - 1, weight beta, added to the token's term
    lp, ref, beta = -1.0, -0.5, 0.1
    d = ref - lp
    x = torch.tensor([[lp]], dtype=torch.float64, device=triton_device, requires_grad=True)
    one = torch.ones(1, 1, dtype=torch.bool, device=triton_device)
    loss, stats = grpo_loss(x, x.detach().clone(), torch.zeros(1, device=triton_device), one,
                            torch.tensor([[ref]], dtype=torch.float64, device=triton_device), kl_beta=beta, impl=impl)
    (g,) = torch.autograd.grad(loss, x)
    k3 = math.exp(d) - d - 1
    assert float(loss) == pytest.approx(beta * k3, rel=1e-5) and float(stats["ref_kl"]) == pytest.approx(k3, rel=1e-5)
    assert float(g) == pytest.approx(beta * (1 - math.exp(d)), rel=1e-5)  # d k3 / d lp


@pytest.mark.parametrize("impl", IMPLS)
def test_aggregation_modes_by_hand(impl, triton_device):
    # two rows at ratio 1, A = -1 and -2: each unmasked token's term is -A, 1 in row 0 and 2 in
    # row 1. Row 0 has 3 tokens (sum 3), row 1 has 1 (sum 2): token-mean (3 + 2) / 4 = 1.25;
    # seq-mean-token-mean (3/3 + 2/1) / 2 = 1.5; seq-mean-token-sum (3 + 2) / 2 = 2.5;
    # seq-mean-token-sum-norm (3 + 2) / (2 * 10) = 0.25 (every mode a different number)
    lp = torch.zeros(2, 4, dtype=torch.float64, device=triton_device)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool, device=triton_device)
    adv = torch.tensor([-1.0, -2.0], device=triton_device)
    want = {"token-mean": 1.25, "seq-mean-token-mean": 1.5, "seq-mean-token-sum": 2.5,
            "seq-mean-token-sum-norm": 0.25}
    for agg, value in want.items():
        loss, _ = grpo_loss(lp, lp, adv, mask, agg=agg, max_len=10, impl=impl)
        assert float(loss) == pytest.approx(value, rel=1e-6), agg
    # a normalizer replaces the count: token-mean over a global 8 tokens gives 5 / 8
    loss, _ = grpo_loss(lp, lp, adv, mask, agg="token-mean", normalizer=8.0, impl=impl)
    assert float(loss) == pytest.approx(0.625, rel=1e-6)


# ------------------------------------------------------------------------- floating-point edges
def test_reference_gradient_is_finite_where_the_ratio_overflows_but_the_term_is_flat():
    # log ratio 100 overflows exp in fp32 (and 800 in float64); where the term is flat in the
    # ratio (clip or dual clip active, A = 0) the gradient is 0, not 0 * inf = NaN
    for dtype, big in ((torch.float32, 100.0), (torch.float64, 800.0)):
        lp = torch.tensor([[big, 0.5]], dtype=dtype, requires_grad=True)
        old = torch.zeros(1, 2, dtype=dtype)
        mask = torch.ones(1, 2, dtype=torch.bool)
        for adv, kw in ((1.0, {}), (-1.0, {"clip_c": 3.0}), (0.0, {})):
            loss, _ = grpo_loss_reference(lp, old, torch.tensor([adv], dtype=dtype), mask, **kw)
            (g,) = torch.autograd.grad(loss, lp)
            assert torch.isfinite(loss) and torch.isfinite(g).all(), (dtype, adv, g)
            assert g[0, 0] == 0.0
            # the other token's gradient is the plain one: -A * ratio / 2 tokens, unless clipped
            r = math.exp(0.5)
            want = 0.0 if adv == 0 else (-adv * r / 2 if adv < 0 or r <= 1.28 else 0.0)
            assert float(g[0, 1]) == pytest.approx(want, rel=1e-6), (dtype, adv)


@pytest.mark.parametrize("impl", IMPLS)
def test_k3_stats_keep_their_precision_at_small_log_ratios(impl, triton_device):
    # near on-policy: |log ratio| ~ 1e-4, where exp(d) - d - 1 in fp32 is all rounding noise
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(4, 64, generator=g, dtype=torch.float64) * 3).float()
    old = (lp.double() + 1e-4 * torch.randn(4, 64, generator=g, dtype=torch.float64)).float()
    ref = (lp.double() + 1e-4 * torch.randn(4, 64, generator=g, dtype=torch.float64)).float()
    mask = torch.ones(4, 64, dtype=torch.bool)
    adv = torch.randn(4, generator=g)
    _, stats = grpo_loss(lp.to(triton_device), old.to(triton_device), adv.to(triton_device), mask.to(triton_device),
                         ref.to(triton_device), kl_beta=0.1, impl=impl)
    # truth: float64 on the same fp32-rounded inputs
    d_old, d_ref = old.double() - lp.double(), ref.double() - lp.double()
    want_kl = (torch.expm1(d_old) - d_old).mean().item()
    want_ref = (torch.expm1(d_ref) - d_ref).mean().item()
    assert want_kl > 0 and want_ref > 0
    assert float(stats["approx_kl"]) == pytest.approx(want_kl, rel=1e-3)
    assert float(stats["ref_kl"]) == pytest.approx(want_ref, rel=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_with_minus_infinity_logits(impl, triton_device):
    # a padded vocabulary: -inf logits contribute nothing (0 log 0 = 0), entropy and gradient finite
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0], [float("-inf"), 0.0, 0.0, float("-inf")]],
                          dtype=torch.float32, device=triton_device, requires_grad=True)
    targets = torch.tensor([1, 2], device=triton_device)
    lp, ent = token_logprobs(logits, targets, return_entropy=True, impl=impl)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 0)
    assert float(ent[0]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert float(ent[1]) == pytest.approx(math.log(2), rel=1e-5)
    (g,) = torch.autograd.grad((lp + ent).sum(), logits)
    assert torch.isfinite(g).all()
    ref_lp, ref_ent = token_logprobs_reference(logits.detach().double().cpu(), targets.cpu(), return_entropy=True)
    assert torch.isfinite(ref_ent).all() and ref_ent.tolist() == pytest.approx(ent.detach().double().cpu().tolist(), rel=1e-5)
