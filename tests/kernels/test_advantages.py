"""grpo_advantages: Triton kernels (interpreter on CPU) and the PyTorch path against the float64 reference.

The PyTorch path runs the reference's own code in the input's dtype, so its cases check precision
(fp32/bf16 against float64), not the formulas; test_method_anchors.py pins the formulas by hand.
"""

import os

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron_recycle_kernels import advantages as adv_mod
from megatron_recycle_kernels import grpo_advantages
from megatron_recycle_kernels.reference import grpo_advantages_reference


def _check(out, ref, atol=1e-5, group_of=None):
    a, mean, std, sig = out
    ra, rmean, rstd, rsig = ref
    assert a.shape == ra.shape and mean.shape == rmean.shape and sig.dtype == torch.bool
    assert torch.isfinite(a).all() and torch.isfinite(mean).all() and torch.isfinite(std).all()
    torch.testing.assert_close(a.double().cpu(), ra, atol=atol, rtol=1e-5)
    torch.testing.assert_close(mean.double().cpu(), rmean, atol=atol, rtol=1e-6)
    torch.testing.assert_close(std.double().cpu(), rstd, atol=atol, rtol=1e-5)
    assert torch.equal(sig.cpu(), rsig)
    if group_of is not None:  # advantages of no-signal groups are exactly zero, never NaN
        dead = ~rsig[group_of]
        assert torch.equal(a.cpu()[dead], torch.zeros(int(dead.sum()), dtype=a.dtype))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("norm_by_std,unbiased", [(True, True), (True, False), (False, True)])
def test_contiguous_groups_match_reference(impl, k, norm_by_std, unbiased, triton_device, monkeypatch):
    """Binary rewards in groups of k, several programs (tile shrunk), an all-correct and an all-wrong group."""
    monkeypatch.setattr(adv_mod, "TILE_ELEMENTS", 4 * triton.next_power_of_2(k))
    g = 11
    gen = torch.Generator().manual_seed(k)
    r = torch.randint(0, 2, (g * k,), generator=gen).double()
    r[:k] = 1.0  # all correct
    r[k : 2 * k] = 0.0  # all wrong
    dev = triton_device if impl == "triton" else torch.device("cpu")
    out = grpo_advantages(
        r.float().to(dev), group_size=k, norm_by_std=norm_by_std, unbiased=unbiased, impl=impl
    )
    ref = grpo_advantages_reference(r, group_size=k, norm_by_std=norm_by_std, unbiased=unbiased)
    _check(out, ref, group_of=torch.arange(g * k) // k)
    a, _, std, sig = out
    assert not sig[0] and not sig[1]
    assert torch.equal(a[: 2 * k].cpu(), torch.zeros(2 * k))
    if k == 1:
        assert (
            not sig.any() and torch.equal(a.cpu(), torch.zeros(g)) and torch.equal(std.cpu(), torch.zeros(g))
        )


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("block_n", [8, 4096])
def test_ragged_groups_match_reference(impl, block_n, triton_device, monkeypatch):
    """Ragged groups in shuffled order, with a size-1 group, an empty id, and continuous rewards."""
    monkeypatch.setattr(adv_mod, "RAGGED_BLOCK_G", 4)
    sizes = [3, 1, 5, 0, 2, 7, 4, 4, 6]
    idx = torch.cat([torch.full((s,), gi) for gi, s in enumerate(sizes)])
    perm = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1))
    idx = idx[perm]
    r = torch.rand(idx.numel(), generator=torch.Generator().manual_seed(2)).double()
    r[idx == 5] = 0.25  # all equal, continuous
    dev = triton_device if impl == "triton" else torch.device("cpu")
    monkeypatch.setattr(adv_mod, "RAGGED_BLOCK_N", block_n)
    monkeypatch.setattr(adv_mod, "INTERPRET_BLOCK_N", block_n)
    out = grpo_advantages(r.float().to(dev), group_index=idx.to(dev), impl=impl, num_groups=10)
    ref = grpo_advantages_reference(r, group_index=idx, num_groups=10)
    _check(out, ref, group_of=idx)
    sig = out[3].cpu()
    assert not sig[1] and not sig[3] and not sig[5] and not sig[9]
    assert sig[0] and sig[2] and sig[6]


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_equal_rewards_give_exact_zeros(impl, triton_device):
    """Non-representable equal rewards (0.1): the mean rounding must not leak into a nonzero advantage."""
    dev = triton_device if impl == "triton" else torch.device("cpu")
    r = torch.full((5 * 7,), 0.1, device=dev)
    a, mean, std, sig = grpo_advantages(r, group_size=7, impl=impl)
    assert torch.equal(a.cpu(), torch.zeros(35))
    assert torch.equal(std.cpu(), torch.zeros(5))
    assert torch.equal(mean.cpu(), torch.full((5,), 0.1))
    assert not sig.any()


def test_float64_rewards_stay_float64(triton_device):
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5], dtype=torch.float64, device=triton_device)
    a, mean, std, sig = grpo_advantages(r, group_size=3, impl="triton")
    assert a.dtype == torch.float64
    _check((a, mean, std, sig), grpo_advantages_reference(r.cpu(), group_size=3), atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(group_size=3, group_index=torch.zeros(6, dtype=torch.long)), "exactly one"),
        (dict(group_size=4), "do not split"),
        (dict(group_index=torch.tensor([0, 1, -1, 2, 2, 2])), "negative"),
        (dict(group_index=torch.zeros(5, dtype=torch.long)), "one entry per reward"),
        (dict(group_index=torch.tensor([0, 1, 4, 2, 2, 2]), num_groups=3), "num_groups"),
    ],
)
def test_bad_group_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(torch.zeros(6), impl="torch", **kwargs)


def test_dispatch_rule(monkeypatch):
    """Explicit impl wins, then MEGATRON_RECYCLE_KERNELS_IMPL, then device / TRITON_INTERPRET."""
    import megatron_recycle_kernels as K
    from megatron_recycle_kernels import IMPL_ENV, resolve_impl

    cpu = torch.zeros(1)
    monkeypatch.delenv(IMPL_ENV, raising=False)
    monkeypatch.setattr(K, "INTERPRETED", False)  # kernels defined without the interpreter
    assert resolve_impl(cpu) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_impl(cpu, "triton")
    monkeypatch.setattr(K, "INTERPRETED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the variable now does not change Triton's decision
    assert resolve_impl(cpu) == "triton" and resolve_impl(cpu, "torch") == "torch"
    monkeypatch.setenv(IMPL_ENV, "torch")
    assert resolve_impl(cpu) == "torch" and resolve_impl(cpu, "triton") == "triton"
    monkeypatch.setenv(IMPL_ENV, "cuda")
    with pytest.raises(ValueError, match=IMPL_ENV):
        resolve_impl(cpu)
    with pytest.raises(ValueError, match="impl="):
        resolve_impl(cpu, "numpy")


@pytest.mark.parametrize("block_g,block_n", [(4, 8), (4, 4096), (64, 8)])
def test_sorted_ragged_ids_take_the_searching_kernel(block_g, block_n, triton_device, device_ops, monkeypatch):
    """Ids that never decrease (each group's rollouts side by side, with an empty id, a size-1
    group, an all-equal group, and a last group ending at the last rollout) go to the kernel whose
    programs binary-search their own rollouts: several programs (4 ids each) and several chunks
    (8 rollouts), or one of each; the results are the float64 reference's, every rollout written
    (outputs poisoned otherwise). Shuffled, the same ids take the scanning kernel."""
    monkeypatch.setattr(adv_mod, "RAGGED_BLOCK_G", block_g)
    monkeypatch.setattr(adv_mod, "RAGGED_BLOCK_N", block_n)
    monkeypatch.setattr(adv_mod, "INTERPRET_BLOCK_N", block_n)
    sizes = [3, 1, 5, 0, 2, 7, 4, 4, 6, 0, 0, 9]
    idx = torch.cat([torch.full((n,), gi) for gi, n in enumerate(sizes)])
    r = torch.rand(idx.numel(), generator=torch.Generator().manual_seed(3)).double()
    r[idx == 5] = 0.25
    names = ("_adv_ragged_kernel", "_adv_ragged_sorted_kernel")
    ref = grpo_advantages_reference(r, group_index=idx, num_groups=13)
    for order in (torch.arange(idx.numel()), torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(4))):
        ops = device_ops(adv_mod, *names)
        with ops:
            out = grpo_advantages(r[order].float().to(triton_device), group_index=idx[order].to(triton_device),
                                  num_groups=13, impl="triton")
        sorted_ids = bool((order == torch.arange(idx.numel())).all())
        assert [op for op in ops.log if op in names] == [names[sorted_ids]]
        a, mean, std, sig = (t.cpu() for t in out)
        torch.testing.assert_close(a.double(), ref[0][order], atol=1e-5, rtol=1e-5)
        _check((torch.empty(0), mean, std, sig), (torch.empty(0, dtype=torch.float64), *ref[1:]))
    assert not sig[3] and not sig[9] and not sig[5] and sig[11]


def test_sorted_ragged_ids_at_cuda_tiles(triton_device, monkeypatch):
    """The searching kernel at the CUDA tiles (64 ids per program, 64 rollouts per chunk, 32 in
    fp64) against the float64 reference: some 2,800 rollouts in 700 sorted groups of 0 to 8."""
    from megatron_recycle_kernels import buffers

    if triton_device.type != "cuda":
        monkeypatch.setattr(buffers, "compiled", lambda device: True)
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 9, (700,), generator=g)
    idx = torch.repeat_interleave(torch.arange(700), sizes)
    r = torch.randint(0, 3, (idx.numel(),), generator=g).double() / 2
    ref = grpo_advantages_reference(r, group_index=idx, num_groups=700)
    for dtype in (torch.float32, torch.float64):
        out = grpo_advantages(r.to(dtype).to(triton_device), group_index=idx.to(triton_device), num_groups=700,
                              impl="triton")
        _check(out, ref, group_of=idx)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    levels=st.sampled_from([2, 3, 1000]),
    seed=st.integers(0, 2**16),
)
def test_ragged_property_matches_reference(sizes, levels, seed):
    """Any ragged layout (empty, size-1, equal-reward groups included) matches the float64 reference."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter not enabled")
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.full((s,), gi, dtype=torch.long) for gi, s in enumerate(sizes)])
    if idx.numel() == 0:
        return
    if seed % 2:  # shuffled (the scanning kernel); even seeds keep the ids sorted (the searching one)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
    r = (torch.randint(0, levels, (idx.numel(),), generator=g).double() / max(levels - 1, 1)).float().double()
    out = grpo_advantages(r.float().to(dev), group_index=idx.to(dev), num_groups=len(sizes), impl="triton")
    _check(out, grpo_advantages_reference(r, group_index=idx, num_groups=len(sizes)), group_of=idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contiguous_groups_are_one_launch_and_nothing_else(dtype, triton_device, device_ops):
    """Fixed-size groups: the kernel and no other device op (it needs no group-id tensor)."""
    r = torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(0)).to(triton_device, dtype)
    ops = device_ops(adv_mod, "_adv_contiguous_kernel", "_adv_ragged_kernel")
    with ops:
        adv, mean, std, sig = grpo_advantages(r, group_size=5, impl="triton")
    assert ops.log == ["_adv_contiguous_kernel"]
    want = grpo_advantages_reference(r.double().cpu(), group_size=5)
    torch.testing.assert_close(adv.double().cpu(), want[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(sig.cpu(), want[3])


@pytest.mark.parametrize("spelling", ["true", "0"])
def test_dispatch_follows_what_triton_decided_at_import(spelling):
    """Triton reads TRITON_INTERPRET when the kernels are defined and accepts "true" as well as "1":
    with "true" the kernels run (interpreted) on CPU tensors; with "0" at import they were compiled
    for a GPU, and setting "1" afterwards does not route CPU tensors to them."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "import megatron_recycle_kernels as K\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "print(K.INTERPRETED, K.resolve_impl(torch.zeros(1)))\n"
        "if K.INTERPRETED:\n"
        "    adv = K.grpo_advantages(torch.tensor([1., 0., 1., 1.]), group_size=2, impl='triton')[0]\n"
        "    print([round(a, 4) for a in adv.tolist()])\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": spelling, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    if spelling == "true":
        assert lines[0] == "True triton" and lines[1] == "[0.7071, -0.7071, 0.0, 0.0]"
    else:
        assert lines[0] == "False torch"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_finite_rewards_and_negative_eps_are_refused(impl):
    # a NaN reward made its group "no signal" (std NaN on one path, 0 on the other): the pool
    # would have recycled a group whose reward was broken. The PyTorch path checks; the Triton
    # path leaves it to its caller (a check would be a host sync per launch on a GPU).
    if impl == "torch":
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="rewards must be finite, got .* at index 1"):
                grpo_advantages(torch.tensor([1.0, bad, 0.0, 1.0]), group_size=4, impl=impl)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        grpo_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=-1.0, impl=impl)
