"""grpo_loss: the fused Triton kernels and the PyTorch path against the float64 reference.

The PyTorch path runs the reference's own code in the input's dtype, so its cases check precision
(fp32/bf16 against float64), not the formulas; test_method_anchors.py pins the formulas by hand.
"""

import pytest
import torch
from megatron_recycle_kernels import AGG_MODES, grpo_loss
from megatron_recycle_kernels import policy_loss as grpo_loss_mod
from megatron_recycle_kernels.reference import grpo_loss_reference

N, T = 6, 45
MAX_LEN = 50


def make_batch(seed: int, n: int = N, t: int = T, spread: float = 0.8):
    """Log-probs with log ratios up to about +-2 (both clips and the dual clip fire), a fully masked
    row, a zero-advantage row whose masked tokens hold garbage (huge log ratios) that must stay inert."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = lp + spread * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.7
    adv[1] = 0.0
    mask[2] = False
    old[3, ~mask[3]] = 500.0  # garbage under the mask: exp would overflow if it were touched
    return lp, old, ref, adv, mask


CASES = [
    dict(),
    dict(clip_c=3.0),
    dict(ref=True, kl_beta=0.0),  # reference given: ref_kl stat only
    dict(ref=True, kl_beta=0.05, clip_c=3.0),
    dict(ref=True, kl_beta=0.1, normalizer=123.0),
    dict(normalizer=7.0, eps_low=0.1, eps_high=0.5),
]


def _run(impl, device, dtype, agg, case, seed=0):
    lp, old, ref, adv, mask = make_batch(seed)
    kw = {k: v for k, v in case.items() if k != "ref"}
    r = ref if case.get("ref") else None
    x = lp.to(device=device, dtype=dtype).requires_grad_()
    loss, stats = grpo_loss(
        x,
        old.to(device, dtype),
        adv.to(device, torch.float32),
        mask.to(device),
        None if r is None else r.to(device, dtype),
        agg=agg,
        max_len=MAX_LEN,
        impl=impl,
        **kw,
    )
    (g,) = torch.autograd.grad(loss * 1.7, x)  # a non-unit upstream gradient
    # Reference on exactly the same (rounded) inputs, in float64.
    xr = x.detach().double().cpu().requires_grad_()
    lr, sr = grpo_loss_reference(
        xr,
        old.to(dtype).double(),
        adv.float().double(),
        mask,
        None if r is None else r.to(dtype).double(),
        agg=agg,
        max_len=MAX_LEN,
        **kw,
    )
    (gr,) = torch.autograd.grad(lr * 1.7, xr)
    return loss, stats, g, lr, sr, gr


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp32_matches_reference(impl, agg, case, triton_device, monkeypatch):
    monkeypatch.setattr(grpo_loss_mod, "MAX_BLOCK_T", 16)  # several token blocks per row
    dev = triton_device if impl == "triton" else torch.device("cpu")
    loss, stats, g, lr, sr, gr = _run(impl, dev, torch.float32, agg, CASES[case])
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double().cpu(), gr, rtol=1e-5, atol=1e-7)
    assert set(stats) == set(sr)
    for k in sr:
        torch.testing.assert_close(stats[k].double().cpu(), sr[k], rtol=1e-5, atol=1e-6, msg=k)
    # masked tokens get exactly zero gradient, the garbage row too
    _, _, _, _, mask = make_batch(0)
    assert torch.equal(g.cpu()[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("tiles,joint", [(2, False), (3, False), (1, True), (2, True)])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_several_token_blocks_per_forward_program(tiles, joint, agg, triton_device, monkeypatch):
    """LOSS_FWD_TILES > 1: each forward program adds several 16-token blocks into per-lane sums
    (a row of 45 tokens is 3 blocks: with 2 per program the second runs past the row's end, with 3
    one program covers the row); LOSS_FWD_JOINT: the eight sums in one multi-operand reduction
    (one block or two per program); loss, statistics
    and gradient as the float64 reference, and the backward (its own grid of blocks) reads the
    right per-row token counts for seq-mean-token-mean."""
    monkeypatch.setattr(grpo_loss_mod, "MAX_BLOCK_T", 16)
    monkeypatch.setattr(grpo_loss_mod, "LOSS_FWD_TILES", tiles)
    monkeypatch.setattr(grpo_loss_mod, "LOSS_FWD_JOINT", joint)
    loss, stats, g, lr, sr, gr = _run("triton", triton_device, torch.float32, agg, dict(ref=True, kl_beta=0.05, clip_c=3.0))
    torch.testing.assert_close(loss.double().cpu(), lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double().cpu(), gr, rtol=1e-5, atol=1e-7)
    for k in sr:
        torch.testing.assert_close(stats[k].double().cpu(), sr[k], rtol=1e-5, atol=1e-6, msg=k)


def test_extreme_ratios_hit_both_clips_and_the_dual_clip(triton_device):
    """The batch above really exercises the clip branches (else the comparison proves little)."""
    loss, stats, g, lr, sr, gr = _run("triton", triton_device, torch.float32, "token-mean", dict(clip_c=3.0))
    assert sr["clip_frac_low"] > 0.02 and sr["clip_frac_high"] > 0.02 and sr["dual_clip_frac"] > 0.01
    lp, old, _, adv, mask = make_batch(0)
    ratio = (lp - old).exp()
    dual = mask & (adv[:, None] < 0) & (ratio > 3.0)
    assert dual.any() and torch.equal(g.cpu()[dual], torch.zeros(int(dual.sum())))  # dual clip: no gradient


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_bf16_inputs(impl, agg, triton_device):
    """bf16 log-probs are read in bf16 and computed in fp32; the bf16 gradient is within about 1 bf16 ulp."""
    dev = triton_device if impl == "triton" else torch.device("cpu")
    case = dict(ref=True, kl_beta=0.05, clip_c=3.0)
    loss, stats, g, lr, sr, gr = _run(impl, dev, torch.bfloat16, agg, case)
    assert g.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), lr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.double().cpu(), gr, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_all_masked_gives_zero_loss_and_grad(impl, agg, triton_device):
    dev = triton_device if impl == "triton" else torch.device("cpu")
    lp, old, ref, adv, _ = make_batch(3)
    x = lp.float().to(dev).requires_grad_()
    mask = torch.zeros(N, T, dtype=torch.bool, device=dev)
    loss, stats = grpo_loss(
        x,
        old.float().to(dev),
        adv.float().to(dev),
        mask,
        ref.float().to(dev),
        kl_beta=0.1,
        agg=agg,
        max_len=MAX_LEN,
        impl=impl,
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad.cpu(), torch.zeros(N, T))
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_and_dp_ranks_add_up_to_the_full_batch_gradient(impl, agg, triton_device):
    """Rows split over 2 'DP ranks' x 2 micro-batches with the global normalizer: same gradient, bit for bit."""
    dev = triton_device if impl == "triton" else torch.device("cpu")
    n = 10
    lp, old, ref, adv, mask = (
        t.float().to(dev) if t.is_floating_point() else t.to(dev) for t in make_batch(5, n=n)
    )
    kw = dict(ref_logprobs=ref, kl_beta=0.05, clip_c=3.0, agg=agg, max_len=MAX_LEN, impl=impl)
    x = lp.clone().requires_grad_()
    full, _ = grpo_loss(x, old, adv, mask, **kw)
    full.backward()
    normalizer = mask.sum() if agg == "token-mean" else float(n)  # a device tensor works as well
    splits = [[0, 3], [3, 4], [4, 8], [8, 10]]  # rank 0: mb 0, 1; rank 1: mb 2, 3 (ragged sizes)
    y = lp.clone().requires_grad_()
    total = 0.0
    for a, b in splits:
        rows = slice(a, b)
        part, _ = grpo_loss(
            y[rows],
            old[rows],
            adv[rows],
            mask[rows],
            **{**kw, "ref_logprobs": ref[rows]},
            normalizer=normalizer,
        )
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(y.grad, x.grad)


def test_normalizer_scales_the_loss(triton_device):
    lp, old, _, adv, mask = make_batch(7)
    args = (
        lp.float().to(triton_device),
        old.float().to(triton_device),
        adv.float().to(triton_device),
        mask.to(triton_device),
    )
    a, _ = grpo_loss(*args, normalizer=10.0, impl="triton")
    b, _ = grpo_loss(*args, normalizer=40.0, impl="triton")
    c, _ = grpo_loss(*args, impl="triton")
    torch.testing.assert_close(a, 4 * b)
    torch.testing.assert_close(c * mask.sum(), a * 10.0)


def test_reference_gradcheck():
    lp, old, ref, adv, mask = make_batch(11, n=4, t=6, spread=0.5)
    for agg in AGG_MODES:

        def fn(x, agg=agg):
            return grpo_loss_reference(x, old, adv, mask, ref, clip_c=3.0, kl_beta=0.1, agg=agg, max_len=8)[0]

        assert torch.autograd.gradcheck(fn, (lp.clone().requires_grad_(),))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(agg="mean"), "not one of"),
        (dict(agg="seq-mean-token-sum-norm"), "max_len"),
        (dict(clip_c=0.5), "clip_c"),
        (dict(kl_beta=0.1), "ref_logprobs"),
        (dict(normalizer=0.0), "normalizer"),
        (dict(eps_low=1.5), "eps_low"),
    ],
)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_arguments_raise(kwargs, match, impl, triton_device):
    dev = triton_device if impl == "triton" else torch.device("cpu")
    x = torch.zeros(2, 3, device=dev)
    with pytest.raises(ValueError, match=match):
        grpo_loss(x, x, torch.zeros(2, device=dev), x > 0, impl=impl, **kwargs)


def test_shape_mismatch_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, torch.zeros(3), x > 0, impl="torch")
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(x, torch.zeros(2, 4), torch.zeros(2), x > 0, impl="torch")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_views_are_read_correctly(impl, triton_device):
    """Row-strided views (a slice of a wider buffer, as a trainer's shifted log-probs are) need no copy."""
    dev = triton_device if impl == "triton" else torch.device("cpu")
    lp, old, ref, adv, mask = make_batch(13, t=T + 5)
    cut = (slice(None), slice(2, T + 2))
    x = lp.float().to(dev).requires_grad_()
    loss, _ = grpo_loss(
        x[cut],
        old.float().to(dev)[cut],
        adv.float().to(dev),
        mask.to(dev)[cut],
        ref.float().to(dev)[cut],
        kl_beta=0.1,
        clip_c=3.0,
        impl=impl,
    )
    (g,) = torch.autograd.grad(loss, x)
    xr = lp.clone().requires_grad_()
    lr, _ = grpo_loss_reference(
        xr[cut], old[cut], adv.float().double(), mask[cut], ref[cut], kl_beta=0.1, clip_c=3.0
    )
    (gr,) = torch.autograd.grad(lr, xr)
    torch.testing.assert_close(loss.double().cpu(), lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double().cpu(), gr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("normalizer", [None, 300.0, "tensor"])
def test_forward_and_backward_are_three_launches_and_nothing_else(agg, normalizer, triton_device, device_ops):
    """The fused loss finishes its aggregation on the device: a forward is the token kernel and the
    finish kernel, a backward the gradient kernel, with no other device op and no host sync (each
    PyTorch op would be one more launch, a large share of the time at a few million tokens)."""
    ops = device_ops(grpo_loss_mod, "_grpo_loss_fwd_kernel", "_grpo_loss_finish_kernel", "_grpo_loss_bwd_kernel")
    log = ops.log
    lp, old, ref, adv, mask = (t.float().to(triton_device) if t.is_floating_point() else t.to(triton_device)
                               for t in make_batch(3))
    norm = mask.sum() if normalizer == "tensor" else normalizer
    x = lp.clone().requires_grad_()
    upstream = torch.tensor(1.5, device=triton_device)
    with ops:
        loss, stats = grpo_loss(x, old, adv, mask, ref, kl_beta=0.1, clip_c=3.0, agg=agg, normalizer=norm,
                                max_len=MAX_LEN, impl="triton")
        forward = list(log)
        log.clear()
        (g,) = torch.autograd.grad(loss, x, grad_outputs=upstream)
    assert forward == ["_grpo_loss_fwd_kernel", "_grpo_loss_finish_kernel"]
    assert log == ["_grpo_loss_bwd_kernel"]
    # and the numbers are still the reference's
    xr = lp.double().cpu().requires_grad_()
    want, want_stats = grpo_loss_reference(xr, old.double().cpu(), adv.double().cpu(), mask.cpu(), ref.double().cpu(),
                                           kl_beta=0.1, clip_c=3.0, agg=agg,
                                           normalizer=None if norm is None else float(norm), max_len=MAX_LEN)
    (gr,) = torch.autograd.grad(want, xr, grad_outputs=torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.double().cpu(), gr, rtol=1e-5, atol=1e-8)
    for name, v in want_stats.items():
        torch.testing.assert_close(stats[name].double().cpu(), v.double(), rtol=1e-5, atol=1e-6)


def test_a_host_normalizer_keeps_float64_precision(triton_device):
    """Triton passes Python floats as float32; the normalizer travels as a float32 pair, so a
    count above 2**24 is not rounded (float32 would make 16,777,217 into 16,777,216). float64
    inputs, so that the loss is returned in float64 (both calls add up the same partial sums)."""
    lp, old, _, adv, mask = make_batch(4)
    args = (lp.to(triton_device), old.to(triton_device), adv.to(triton_device), mask.to(triton_device))
    big = float(2**24 + 1)
    loss, _ = grpo_loss(*args, normalizer=big, impl="triton")
    per_token_sum, _ = grpo_loss(*args, normalizer=1.0, impl="triton")
    assert loss.item() != 0.0
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(per_token_sum.item() / big, rel=1e-13, abs=0.0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_tensor_normalizer_must_hold_one_number(impl, triton_device):
    # (on the PyTorch path a [N] normalizer broadcast silently into per-row divisors when N matched)
    dev = triton_device if impl == "triton" else "cpu"
    x = torch.zeros(2, 3, device=dev)
    with pytest.raises(ValueError, match="one number"):
        grpo_loss(x, x, torch.zeros(2, device=dev), x > 0, normalizer=torch.tensor([1.0, 2.0], device=dev), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("max_len", [2.5, 0.5, True, 0])
def test_token_sum_norm_needs_a_positive_integer_max_len(impl, max_len, triton_device):
    # a fractional max_len was divided by as given on one path and truncated on the other
    dev = triton_device if impl == "triton" else "cpu"
    x = torch.zeros(2, 3, device=dev)
    with pytest.raises(ValueError, match="positive integer max_len"):
        grpo_loss(x, x, torch.zeros(2, device=dev), x > 0, agg="seq-mean-token-sum-norm", max_len=max_len, impl=impl)
