"""token_logprobs and chunked_token_logprobs against the float64 reference (Triton interpreter and PyTorch)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron_recycle_kernels import chunked_token_logprobs, logprobs, token_logprobs
from megatron_recycle_kernels.logprobs import ChunkedTokenLogprobsFunction, TokenLogprobsFunction
from megatron_recycle_kernels.reference import chunked_token_logprobs_reference, token_logprobs_reference

IMPLS = ["triton", "torch"]


def _dev(impl, triton_device):
    return triton_device if impl == "triton" else torch.device("cpu")


def _grads_both(logits, targets, temperature, impl, w_lp, w_ent, **kw):
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, targets, temperature=temperature, return_entropy=True, impl=impl, **kw)
    (g,) = torch.autograd.grad((w_lp * lp).sum() + (w_ent * ent).sum(), x)
    return lp, ent, g


def _reference(logits, targets, temperature, w_lp, w_ent):
    x = logits.detach().double().cpu().requires_grad_()
    lp, ent = token_logprobs_reference(x, targets.cpu(), temperature, return_entropy=True)
    (g,) = torch.autograd.grad((w_lp.double().cpu() * lp).sum() + (w_ent.double().cpu() * ent).sum(), x)
    return lp, ent, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,vocab,block", [(1, 7, 4096), (9, 300, 64), (20, 1000, 4096), (5, 129, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fp32_matches_reference(impl, rows, vocab, block, temperature, triton_device, monkeypatch):
    """Several vocabulary blocks per row when `block` < vocab; large logits so the online max matters."""
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", block)
    monkeypatch.setattr(logprobs, "TORCH_CHUNK_ELEMENTS", 4 * block)  # PyTorch path: a few rows per chunk
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 8 + 30).to(dev)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(dev)
    w_lp, w_ent = torch.randn(rows, generator=g).to(dev), torch.randn(rows, generator=g).to(dev)
    lp, ent, grad = _grads_both(logits, targets, temperature, impl, w_lp, w_ent)
    rlp, rent, rgrad = _reference(logits, targets, temperature, w_lp, w_ent)
    assert lp.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double().cpu(), rent, rtol=1e-5, atol=2e-5)
    # the gradient carries log p = z/T - lse, whose fp32 rounding at |z/T| ~ 100 is a few 1e-6 (the
    # H200's exp and summation order gave 3.4e-6 on one element of 20,000): the same absolute bound
    # as log p itself
    torch.testing.assert_close(grad.double().cpu(), rgrad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_of_one_output_only(impl, which, triton_device):
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g).to(dev).requires_grad_()
    targets = torch.randint(0, 50, (6,), generator=g).to(dev)
    lp, ent = token_logprobs(logits, targets, return_entropy=True, impl=impl)
    out = lp if which == "logp" else ent
    (grad,) = torch.autograd.grad(out.sum(), logits)
    x = logits.detach().double().cpu().requires_grad_()
    rlp, rent = token_logprobs_reference(x, targets.cpu(), return_entropy=True)
    (rgrad,) = torch.autograd.grad((rlp if which == "logp" else rent).sum(), x)
    torch.testing.assert_close(grad.double().cpu(), rgrad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_logits_are_read_in_bf16(impl, triton_device):
    """Same bf16 values in both; outputs float32 within 1e-5 (fp32 compute), bf16 gradient within ~1 ulp."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(12, 500, generator=g) * 4).bfloat16().to(dev)
    targets = torch.randint(0, 500, (12,), generator=g).to(dev)
    w_lp, w_ent = torch.randn(12, generator=g).to(dev), torch.randn(12, generator=g).to(dev)
    lp, ent, grad = _grads_both(logits, targets, 0.9, impl, w_lp, w_ent)
    rlp, rent, rgrad = _reference(logits, targets, 0.9, w_lp, w_ent)
    assert lp.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), rent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), rgrad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_logits_outside_the_target(impl, triton_device):
    """Vocabulary entries masked with -inf (e.g. padding ids) contribute nothing and get zero gradient."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 40, generator=g)
    logits[:, 30:] = float("-inf")
    targets = torch.tensor([0, 5, 29, 12])
    w = torch.ones(4)
    lp, ent, grad = _grads_both(logits.to(dev), targets.to(dev), 1.0, impl, w.to(dev), w.to(dev))
    rlp, rent, _ = _reference(logits[:, :30], targets, 1.0, w, w)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), rent, rtol=1e-5, atol=1e-5)
    assert torch.equal(grad[:, 30:].cpu(), torch.zeros(4, 10))


@pytest.mark.parametrize("case", ["large", "rising", "minus_inf", "bf16"])
def test_the_statistics_kernel_over_many_blocks(case, triton_device, monkeypatch):
    """The forward statistics kernel over several vocabulary blocks per row (64 wide, on a GPU too):
    log p and entropy against float64. "rising" raises the running maximum at every block (each step
    rescales); "minus_inf" has -inf logits inside a block, a whole -inf block, and a row that is -inf
    but for its target."""
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 64)
    g = torch.Generator().manual_seed(11)
    rows, vocab, temp = 6, 300, 0.7
    logits = torch.randn(rows, vocab, generator=g) * 8 + 30
    targets = torch.randint(0, vocab, (rows,), generator=g)
    if case == "rising":
        logits = torch.linspace(-20, 40, vocab).repeat(rows, 1) + 0.01 * logits
    if case == "minus_inf":
        logits[:, 5:9] = float("-inf")
        logits[:, 128:192] = float("-inf")
        logits[2] = float("-inf")
        targets = torch.arange(rows) * 20 + 10  # finite targets: 10, 30, ... 110
        targets[2] = 200
        logits[2, 200] = 1.5
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x = logits.to(dtype)
    lp, ent = token_logprobs(x.to(triton_device), targets.to(triton_device), temp, return_entropy=True, impl="triton")
    # float64 reference with -inf as -1e4 (its exp is exactly 0 there; -inf would give 0 * -inf)
    rlp, rent = token_logprobs_reference(x.double().clamp(min=-1e4), targets, temp, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double().cpu(), rent, rtol=1e-5, atol=2e-5)
    # without the entropy the kernel skips its moment (one reduction less per block): the same log p,
    # and the moment's slot is 0 as on the PyTorch path
    alone = token_logprobs(x.to(triton_device), targets.to(triton_device), temp, impl="triton")
    torch.testing.assert_close(alone.double().cpu(), rlp, rtol=1e-5, atol=2e-5)
    stats = logprobs._stats_triton(x.to(triton_device), targets.to(triton_device), 0, 1 / temp, False, x.shape[1])
    assert torch.equal(stats[3].cpu(), torch.zeros(rows))


def test_torch_path_keeps_no_fp32_copy_and_passes_gradcheck():
    """The memory-lean PyTorch Function saves only the logits and [T] vectors; its float64 gradient is exact."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (5,), generator=g)
    lp, ent = TokenLogprobsFunction.apply(logits, targets, 1.0 / 0.8, None, False)
    saved = lp.grad_fn.saved_tensors
    assert saved[0] is logits or saved[0].data_ptr() == logits.data_ptr()
    assert all(t is None or t.numel() <= 5 for t in saved[1:])  # None: no row_mask
    fn = lambda x: TokenLogprobsFunction.apply(x, targets, 1.25, None, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs_reference(x, targets, 0.8, True), (logits,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_equals_unchunked(impl, chunk, triton_device):
    """hidden @ weight.T chunk by chunk: same outputs and same hidden / weight gradients as the full path."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(13, 16, generator=g).to(dev)
    w = (torch.randn(70, 16, generator=g) * 0.5).to(dev)
    targets = torch.randint(0, 70, (13,), generator=g).to(dev)
    w_lp, w_ent = torch.randn(13, generator=g).to(dev), torch.randn(13, generator=g).to(dev)
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = chunked_token_logprobs(
        hc, wc, targets, temperature=0.7, chunk_size=chunk, return_entropy=True, impl=impl
    )
    gh, gw = torch.autograd.grad((w_lp * lp).sum() + (w_ent * ent).sum(), (hc, wc))
    hu, wu = h.clone().requires_grad_(), w.clone().requires_grad_()
    ulp, uent = token_logprobs(hu @ wu.t(), targets, temperature=0.7, return_entropy=True, impl=impl)
    uh, uw = torch.autograd.grad((w_lp * ulp).sum() + (w_ent * uent).sum(), (hu, wu))
    torch.testing.assert_close(lp, ulp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, uent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, uh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, uw, rtol=1e-5, atol=1e-6)
    # and both agree with the float64 definition
    hr, wr = h.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    rlp, rent = chunked_token_logprobs_reference(hr, wr, targets.cpu(), 0.7, True)
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_bf16(impl, triton_device):
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(9)
    h = torch.randn(10, 32, generator=g).bfloat16().to(dev).requires_grad_()
    w = (torch.randn(90, 32, generator=g) * 0.3).bfloat16().to(dev).requires_grad_()
    targets = torch.randint(0, 90, (10,), generator=g).to(dev)
    lp = chunked_token_logprobs(h, w, targets, chunk_size=4, impl=impl)
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    hr, wr = h.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    rlp = chunked_token_logprobs_reference(hr, wr, targets.cpu())
    rh, rw = torch.autograd.grad(rlp.sum(), (hr, wr))
    # bf16 matmul of the logits (as the real output layer does) then fp32 softmax: about 1e-2
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gh.double().cpu(), rh, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gw.double().cpu(), rw, rtol=3e-2, atol=3e-2)


def test_chunked_torch_path_gradcheck():
    g = torch.Generator().manual_seed(10)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=g)

    def fn(h, w):
        lp, ent = ChunkedTokenLogprobsFunction.apply(h, w, targets, 1.0, None, False, 2)
        return lp + 0.5 * ent

    assert torch.autograd.gradcheck(fn, (h, w))


@pytest.mark.parametrize(
    "targets, match",
    [
        (torch.tensor([0, 10]), r"\[0, 10\)"),
        (torch.tensor([-100, 1]), r"\[0, 10\)"),
        (torch.tensor([1]), "one id per row"),
        (torch.tensor([1.0, 2.0]), "integer"),
    ],
)
def test_bad_targets_raise(targets, match):
    with pytest.raises((ValueError, TypeError), match=match):
        token_logprobs(torch.zeros(2, 10), targets, impl="torch")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunked", [False, True])
def test_unvalidated_out_of_range_targets_give_nan_rows(impl, chunked, triton_device, monkeypatch):
    """validate_targets=False (no host sync): a target outside [0, V) (-100 for an ignored position,
    V, far beyond) gives a NaN log-prob and a NaN gradient row, never a finite wrong value (the
    kernels took 0 for such a target's logit before); every other row is exact. The same call
    validated raises."""
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 16)  # several vocabulary blocks per row
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(31)
    rows, vocab, hid = 7, 40, 6
    targets = torch.randint(0, vocab, (rows,), generator=g)
    bad = torch.tensor([False, True, False, True, False, True, False])
    targets[bad] = torch.tensor([-100, vocab, vocab + 9])
    w_lp = torch.randn(rows, generator=g, dtype=torch.float64)
    if chunked:
        hidden = torch.randn(rows, hid, generator=g, dtype=torch.float64)
        weight = torch.randn(vocab, hid, generator=g, dtype=torch.float64)
        x = [hidden.float().to(dev).requires_grad_(), weight.float().to(dev).requires_grad_()]
        run = lambda **kw: chunked_token_logprobs(*x, targets.to(dev), 0.9, chunk_size=3,  # noqa: E731
                                                  return_entropy=True, impl=impl, **kw)
        ref_x = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        ref = chunked_token_logprobs_reference(*ref_x, targets.clamp(0, vocab - 1), 0.9, True)
    else:
        logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
        x = [logits.float().to(dev).requires_grad_()]
        run = lambda **kw: token_logprobs(x[0], targets.to(dev), 0.9, return_entropy=True, impl=impl, **kw)  # noqa: E731
        ref_x = [logits.clone().requires_grad_()]
        ref = token_logprobs_reference(ref_x[0], targets.clamp(0, vocab - 1), 0.9, return_entropy=True)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        run()
    lp, ent = run(validate_targets=False)
    lp, ent = lp.double().cpu(), ent.double().cpu()
    assert torch.isnan(lp[bad]).all() and not torch.isnan(lp[~bad]).any()
    torch.testing.assert_close(lp[~bad], ref[0][~bad].detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, ref[1].detach(), rtol=1e-5, atol=2e-5)  # the entropy needs no target
    # upstream 0 on the bad rows, as a loss mask would give: their gradient is NaN all the same
    w_ok = torch.where(bad, 0.0, w_lp)
    grads = torch.autograd.grad((w_ok.float().to(dev) * run(validate_targets=False)[0]).sum(), x)
    ref_grads = torch.autograd.grad((w_ok * torch.where(bad, 0.0, ref[0])).sum(), ref_x)
    grad, rgrad = grads[0].double().cpu(), ref_grads[0]
    assert torch.isnan(grad[bad]).all() and not torch.isnan(grad[~bad]).any()
    torch.testing.assert_close(grad[~bad], rgrad[~bad], rtol=1e-4, atol=2e-5)
    if chunked:  # every weight row adds up all rows' logit gradients, the NaN ones included
        assert torch.isnan(grads[1]).all()


def test_bad_temperature_and_shapes_raise():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 10), torch.tensor([1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[T, V\]"):
        token_logprobs(torch.zeros(2, 3, 10), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="same H"):
        chunked_token_logprobs(torch.zeros(2, 4), torch.zeros(10, 5), torch.tensor([1, 2]))


@pytest.mark.distributed
def test_two_rank_vocab_parallel_equals_single_rank():
    """2 gloo ranks, each with half the vocabulary: same outputs, and each rank's gradient is its slice."""
    worker = Path(__file__).with_name("tp_worker.py")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("rank ok") == 2, proc.stdout


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_not_asked_is_not_computed_silently(impl, triton_device):
    """Without return_entropy only log-probs come back; the internal entropy slot is NaN, never a wrong number."""
    dev = _dev(impl, triton_device)
    logits = torch.randn(3, 20).to(dev)
    targets = torch.tensor([1, 2, 3]).to(dev)
    lp = token_logprobs(logits, targets, impl=impl)
    assert isinstance(lp, torch.Tensor) and lp.shape == (3,)
    _, ent = TokenLogprobsFunction.apply(logits, targets, 1.0, None, impl == "triton", False)
    assert torch.isnan(ent).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_left_untouched(impl, dtype, triton_device):
    """Forward and backward must not scale or shift the caller's logits / hidden / weight in place."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(5, 40, generator=g).to(dev, dtype).requires_grad_()
    h = torch.randn(5, 8, generator=g).to(dev, dtype).requires_grad_()
    w = torch.randn(40, 8, generator=g).to(dev, dtype).requires_grad_()
    targets = torch.randint(0, 40, (5,), generator=g).to(dev)
    before = [t.detach().clone() for t in (logits, h, w)]
    lp, ent = token_logprobs(logits, targets, temperature=0.7, return_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    lp, ent = chunked_token_logprobs(h, w, targets, 0.7, chunk_size=2, return_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    for a, b in zip((logits, h, w), before):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_strided_logits_view(impl, triton_device):
    """logits[:, :V] of a wider buffer (row stride > V): read in place, gradient lands in the right slots."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(14)
    wide = torch.randn(6, 64, generator=g).to(dev).requires_grad_()
    targets = torch.randint(0, 50, (6,), generator=g).to(dev)
    lp, ent = token_logprobs(wide[:, :50], targets, return_entropy=True, impl=impl)
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), wide)
    x = wide.detach().double().cpu().requires_grad_()
    rlp, rent = token_logprobs_reference(x[:, :50], targets.cpu(), return_entropy=True)
    (rgrad,) = torch.autograd.grad(rlp.sum() + rent.sum(), x)
    torch.testing.assert_close(lp.double().cpu(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), rgrad, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad[:, 50:].cpu(), torch.zeros(6, 14))


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_one_launch_forward_equals_statistics_then_merge(entropy, masked, dtype, triton_device, monkeypatch):
    """On one rank the statistics kernel merges its own rows (FINAL): log p, entropy and
    log-sum-exp equal what the [4, T] statistics and the merge kernel give (the TP path's two
    launches): bit for bit in the interpreter, to rounding where the compiler may fuse a multiply
    and an add differently. Covered: several vocabulary blocks per row, a row of -inf logits, a
    row whose -inf logits hold the target, ids outside the vocabulary (NaN rows, unvalidated),
    masked rows (NaN logits there), float64 outputs for float64 logits."""
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 32)
    g = torch.Generator().manual_seed(11)
    rows, vocab = 12, 100
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 6
    x[1] = float("-inf")  # nothing finite: lse -inf
    x[2, :50] = float("-inf")
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[2], targets[3], targets[4] = 7, vocab, -100  # target on a -inf logit; two ids outside
    keep = torch.ones(rows, dtype=torch.bool)
    if masked:
        keep[[0, 5, 9]] = False
        x[[0, 5, 9]] = float("nan")
    logits, targets = x.to(dtype).to(triton_device), targets.to(triton_device)
    row_mask = keep.to(triton_device) if masked else None
    final = logprobs._merged_outputs(rows, dtype, logits.device)
    assert logprobs._stats_triton(logits, targets, 0, 0.8, entropy, vocab, row_mask, final=final) is None
    stats = logprobs._stats_triton(logits, targets, 0, 0.8, entropy, vocab, row_mask)
    want = logprobs._merge(stats, None, entropy, dtype, True, row_mask)
    exact = triton_device.type == "cpu"
    for name, got, w in zip(("logp", "entropy", "lse"), final, want):
        assert got.dtype == w.dtype, name
        if exact:
            assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got.nan_to_num(), w.nan_to_num()), name
        else:
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)
    lp, ent, lse = (t.cpu() for t in final)
    assert lp[3].isnan() and lp[4].isnan() and not lse[3].isnan()  # an id outside: NaN log p only
    assert lse[1] == float("-inf") and lp[2] == float("-inf")
    assert ent.isnan().all() if not entropy else not ent[[0, 5, 6]].isnan().any()
    if masked:
        assert torch.equal(lp[~keep], torch.zeros(3, dtype=lp.dtype)) and torch.equal(lse[~keep], torch.zeros(3))


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("validate", [True, False])
def test_forward_and_backward_launch_only_the_kernels(entropy, validate, triton_device, device_ops):
    """Triton path on one rank: the pass over the logits, which merges each row's statistics itself
    (one launch: no merge kernel, no chain of PyTorch ops over [T] vectors), then one gradient
    kernel. The only other ops are the
    target-range check (aminmax + stack, one host sync), which a clear error for an id outside
    the vocabulary (-100 for ignored positions) needs; with validate_targets=False there are none
    (such an id then gives NaN, see test_unvalidated_out_of_range_targets_give_nan_rows)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 300, generator=g).to(triton_device).requires_grad_()
    targets = torch.randint(0, 300, (9,), generator=g).to(triton_device)
    upstream = [torch.randn(9, generator=g).to(triton_device) for _ in range(2)]
    ops = device_ops(logprobs, "_logprob_stats_kernel", "_logprob_combine_kernel", "_logprob_grad_kernel")
    with ops:
        out = token_logprobs(logits, targets, 0.7, return_entropy=entropy, impl="triton", validate_targets=validate)
        forward = list(ops.log)
        ops.log.clear()
        outs = out if entropy else (out,)
        (grad,) = torch.autograd.grad(outs, logits, grad_outputs=upstream[: len(outs)])
    kernels = [op for op in forward if op.startswith("_logprob_")]
    assert kernels == ["_logprob_stats_kernel"]
    check = forward[: forward.index("_logprob_stats_kernel")]
    assert forward == [*check, *kernels]  # nothing after the pass over the logits
    if not validate:
        assert check == []
    else:
        assert check[:2] == ["aten.aminmax.default", "aten.stack.default"]
    # a CUDA tensor's tolist() may add its device-to-host copy; nothing else
    assert set(check[2:]) <= {"aten._to_copy.default", "aten.copy_.default", "aten._local_scalar_dense.default"}, check
    assert ops.log == ["_logprob_grad_kernel"]
    x = logits.detach().double().cpu().requires_grad_()
    want = token_logprobs_reference(x, targets.cpu(), 0.7, return_entropy=True)
    loss = sum((w * u.double().cpu()).sum() for w, u in zip(want[: len(outs)], upstream))
    (want_grad,) = torch.autograd.grad(loss, x)
    for got, w in zip(outs, want):
        torch.testing.assert_close(got.double().cpu(), w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_in_place_backward_gives_the_same_gradient_in_the_logits_storage(
    impl, temperature, dtype, triton_device, monkeypatch
):
    """inplace_backward=True: the gradient equals the ordinary backward's and lives in the logits'
    own memory (no second [T, V] buffer); the logits are consumed. Several vocabulary blocks per
    row (Triton) and several row chunks (PyTorch), each read before it is overwritten."""
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(logprobs, "TORCH_CHUNK_ELEMENTS", 600)  # 2 rows of 300 per chunk
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(21)
    base = (torch.randn(7, 300, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 300, (7,), generator=g).to(dev)
    w_lp, w_ent = torch.randn(7, generator=g).to(dev), torch.randn(7, generator=g).to(dev)
    leaf = base.to(dev).requires_grad_()
    lp, ent = token_logprobs(leaf, targets, temperature, return_entropy=True, impl=impl)
    (expected,) = torch.autograd.grad((w_lp * lp).sum() + (w_ent * ent).sum(), leaf)
    src = base.to(dev).requires_grad_()
    logits = src * 1  # a non-leaf, as the model's output is
    lp2, ent2 = token_logprobs(logits, targets, temperature, return_entropy=True, impl=impl, inplace_backward=True)
    assert torch.equal(lp2, lp) and torch.equal(ent2, ent)
    version = logits._version
    grad_logits = []
    logits.register_hook(lambda gr: grad_logits.append(gr))
    ((w_lp * lp2).sum() + (w_ent * ent2).sum()).backward()
    assert torch.equal(src.grad, expected)
    assert grad_logits[0].data_ptr() == logits.data_ptr()  # the gradient was written over the logits
    assert torch.equal(logits.detach(), expected) and logits._version > version


@pytest.mark.parametrize("impl", IMPLS)
def test_the_in_place_backward_refuses_a_second_reader_of_the_logits(impl, triton_device):
    """Another op that saved the logits for its own backward either runs its backward first (autograd
    goes from the latest op back, so one applied after token_logprobs does: the result is exact) or
    fails loudly; so does a second backward through the same graph. Never a silent wrong gradient."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(22)
    src = torch.randn(5, 40, generator=g).to(dev).requires_grad_()
    targets = torch.randint(0, 40, (5,), generator=g).to(dev)

    def total(inplace, squared_first):
        logits = src * 1
        squared = (logits * logits).sum() if squared_first else None  # saves the logits themselves
        lp = token_logprobs(logits, targets, impl=impl, inplace_backward=inplace)
        if squared is None:
            squared = (logits * logits).sum()
        return lp.sum() + squared

    (expected,) = torch.autograd.grad(total(False, False), src)
    (got,) = torch.autograd.grad(total(True, False), src)  # the squaring's backward reads the logits first
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(total(True, True), src)  # ours overwrites them before the squaring reads them
    loss = token_logprobs(src * 1, targets, impl=impl, inplace_backward=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_masked_rows_are_skipped(impl, inplace, entropy, triton_device, monkeypatch):
    """row_mask: rows where it is 0 give log-prob 0, entropy 0 (NaN when not asked for, as every
    row) and a zero gradient, also written over the logits in place, whatever their logits hold
    (NaN, inf); their targets are neither read nor judged (-100 or V + 3 there pass the validated call). Every other row equals the
    float64 reference, and a bad id on a kept row still raises."""
    monkeypatch.setattr(logprobs, "MAX_BLOCK_V", 16)  # several vocabulary blocks per row
    monkeypatch.setattr(logprobs, "TORCH_CHUNK_ELEMENTS", 80)  # PyTorch path: 2 rows per chunk
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(41)
    rows, vocab = 9, 40
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4 + 20
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[~keep] = torch.tensor([-100, vocab + 3, -100, -7])
    w_lp, w_ent = torch.randn(rows, generator=g, dtype=torch.float64), torch.randn(rows, generator=g, dtype=torch.float64)
    poisoned = logits.float().clone()
    poisoned[1] = float("nan")  # masked rows may hold anything (a padding position's logits)
    poisoned[4, 3] = float("inf")
    src = poisoned.to(dev).requires_grad_()
    x = src * 1 if inplace else src
    out = token_logprobs(x, targets.to(dev), 0.8, return_entropy=entropy, impl=impl, inplace_backward=inplace,
                         row_mask=keep.to(dev))
    lp, ent = out if entropy else (out, None)
    loss = (w_lp.float().to(dev) * lp).sum() + ((w_ent.float().to(dev) * ent).sum() if entropy else 0.0)
    (grad,) = torch.autograd.grad(loss, src)
    lp, grad = lp.double().cpu(), grad.double().cpu()
    ref_x = logits.clone().requires_grad_()
    rlp, rent = token_logprobs_reference(ref_x, targets.clamp(0, vocab - 1), 0.8, return_entropy=True)
    kept = keep.double()
    rloss = (w_lp * rlp * kept).sum() + ((w_ent * rent * kept).sum() if entropy else 0.0)
    (rgrad,) = torch.autograd.grad(rloss, ref_x)
    assert torch.equal(lp[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
    torch.testing.assert_close(lp[keep], rlp[keep].detach(), rtol=1e-5, atol=2e-5)
    if entropy:
        ent = ent.double().cpu()
        assert torch.equal(ent[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
        torch.testing.assert_close(ent[keep], rent[keep].detach(), rtol=1e-5, atol=2e-5)
    assert torch.equal(grad[~keep], torch.zeros(int((~keep).sum()), vocab, dtype=torch.float64))
    torch.testing.assert_close(grad, rgrad, rtol=1e-4, atol=2e-5)
    bad = targets.clone()
    bad[0] = vocab  # a kept row
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        token_logprobs(src, bad.to(dev), row_mask=keep.to(dev), impl=impl)
    with pytest.raises(ValueError, match="row_mask must be"):
        token_logprobs(src, targets.to(dev), row_mask=keep[:-1].to(dev), impl=impl)
    with pytest.raises(ValueError, match="row_mask is on meta"):  # not where the targets are
        token_logprobs(src, targets.to(dev), row_mask=keep.to("meta"), impl=impl)


def test_masked_rows_are_not_read(triton_device, device_ops):
    """Triton path: rows whose mask is 0 are not read by either pass (NaN logits there change
    nothing), and the mask adds no launch: one kernel forward, one backward."""
    g = torch.Generator().manual_seed(43)
    keep = torch.tensor([True, False, True, False, False, True])
    logits = torch.randn(6, 50, generator=g)
    logits[~keep] = float("nan")
    logits = logits.to(triton_device).requires_grad_()
    targets = torch.randint(0, 50, (6,), generator=g).to(triton_device)
    upstream = torch.ones(6).to(triton_device)
    ops = device_ops(logprobs, "_logprob_stats_kernel", "_logprob_combine_kernel", "_logprob_grad_kernel")
    with ops:
        lp = token_logprobs(logits, targets, impl="triton", validate_targets=False, row_mask=keep.to(triton_device))
        assert ops.log == ["_logprob_stats_kernel"]
        ops.log.clear()
        (grad,) = torch.autograd.grad(lp, logits, grad_outputs=upstream)
        assert ops.log == ["_logprob_grad_kernel"]
    assert not torch.isnan(lp).any() and torch.equal(lp[~keep.to(triton_device)].cpu(), torch.zeros(3))
    assert not torch.isnan(grad).any() and torch.equal(grad[~keep.to(triton_device)].cpu(), torch.zeros(3, 50))
    want = token_logprobs_reference(logits.detach()[keep.to(triton_device)].double().cpu(), targets[keep.to(triton_device)].cpu())
    torch.testing.assert_close(lp[keep.to(triton_device)].double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_masked_rows_equal_unchunked(impl, triton_device):
    """chunked_token_logprobs(row_mask=) gives what token_logprobs(hidden @ weight.T, row_mask=)
    gives: masked rows 0 with a zero hidden gradient (-100 allowed there), the weight gradient
    from the kept rows only, chunks that start and end inside masked runs."""
    dev = _dev(impl, triton_device)
    g = torch.Generator().manual_seed(47)
    rows, hid, vocab = 11, 8, 60
    hidden = torch.randn(rows, hid, generator=g).to(dev)
    weight = (torch.randn(vocab, hid, generator=g) * 0.5).to(dev)
    keep = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[~keep] = -100
    targets, keep = targets.to(dev), keep.to(dev)
    w_lp, w_ent = torch.randn(rows, generator=g).to(dev), torch.randn(rows, generator=g).to(dev)
    h1, wt1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp1, ent1 = chunked_token_logprobs(h1, wt1, targets, 0.9, chunk_size=3, return_entropy=True, impl=impl,
                                       row_mask=keep)
    g1 = torch.autograd.grad((w_lp * lp1).sum() + (w_ent * ent1).sum(), (h1, wt1))
    h2, wt2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = token_logprobs(h2 @ wt2.t(), targets, 0.9, return_entropy=True, impl=impl, row_mask=keep)
    g2 = torch.autograd.grad((w_lp * lp2).sum() + (w_ent * ent2).sum(), (h2, wt2))
    torch.testing.assert_close(lp1, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent2, rtol=1e-5, atol=1e-5)
    assert torch.equal(lp1[~keep].cpu(), torch.zeros(5)) and torch.equal(g1[0][~keep].cpu(), torch.zeros(5, hid))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # masked rows' hidden states may hold anything (NaN, inf): nothing of them reaches a result
    poisoned = hidden.clone()
    poisoned[2] = float("nan")
    poisoned[6, 0] = float("inf")
    h3, wt3 = poisoned.requires_grad_(), weight.clone().requires_grad_()
    lp3, ent3 = chunked_token_logprobs(h3, wt3, targets, 0.9, chunk_size=3, return_entropy=True, impl=impl,
                                       row_mask=keep)
    g3 = torch.autograd.grad((w_lp * lp3).sum() + (w_ent * ent3).sum(), (h3, wt3))
    assert torch.equal(lp3, lp1) and torch.equal(g3[0][~keep].cpu(), torch.zeros(5, hid))
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
