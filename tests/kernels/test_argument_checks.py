"""Argument checks and dtype rules of the kernels' public functions, on both paths (mutants that
dropped them survived the other kernel tests)."""

from __future__ import annotations

import pytest
import torch
from megatron_recycle_kernels import grpo_advantages, grpo_loss


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_group_id_equal_to_num_groups_is_refused(impl):
    # K02: hi >= num_groups -> hi > num_groups. The Triton path silently skips the rollout
    with pytest.raises(ValueError, match="num_groups"):
        grpo_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), group_index=torch.tensor([0, 0, 1, 1]),
                        num_groups=1, impl=impl)


def test_num_groups_contradicting_group_size_is_refused():
    # K01
    with pytest.raises(ValueError, match="contradicts"):
        grpo_advantages(torch.zeros(6), group_size=3, num_groups=3, impl="torch")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_spread_below_eps_is_no_signal(impl):
    # K06: signal needs std > eps, not just unequal rewards
    r = torch.tensor([0.0, 0.0, 0.0, 1e-7, 0.0, 1.0, 0.0, 1.0])
    adv, _, std, sig = grpo_advantages(r, group_size=4, impl=impl)
    assert 0 < float(std[0]) < 1e-6
    assert sig.tolist() == [False, True] and torch.equal(adv[:4], torch.zeros(4))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", ["ref", "mask"])
def test_ref_and_mask_shapes_are_checked(impl, bad):
    # K07 / K08: a [N, 1] reference or mask broadcast silently on the PyTorch path
    x = torch.zeros(2, 3)
    ref = torch.zeros(2, 1) if bad == "ref" else torch.zeros(2, 3)
    mask = torch.ones(2, 1, dtype=torch.bool) if bad == "mask" else torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs" if bad == "ref" else "loss_mask"):
        grpo_loss(x, x, torch.ones(2), mask, ref, kl_beta=0.1, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_negative_eps_high_and_clip_c_one_are_refused(impl):
    # K09 / K10
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="eps_high"):
        grpo_loss(x, x, torch.zeros(2), x == 0, eps_high=-0.1, impl=impl)
    with pytest.raises(ValueError, match="clip_c"):
        grpo_loss(x, x, torch.zeros(2), x == 0, clip_c=1.0, impl=impl)


def test_bf16_rewards_give_float32_advantages_on_both_paths():
    # K17: the PyTorch path kept bf16 (and computed the std in bf16) without the cast
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.3, 0.7], dtype=torch.bfloat16)
    outs = [grpo_advantages(r, group_size=3, impl=impl) for impl in ("torch", "triton")]
    assert all(o[0].dtype == torch.float32 and o[1].dtype == torch.float32 for o in outs)
    torch.testing.assert_close(outs[0][0], outs[1][0])


def test_eps_zero_is_accepted():
    # K18: eps >= 0 is the documented rule
    adv, _, std, sig = grpo_advantages(torch.tensor([0.0, 1.0]), group_size=2, eps=0.0, impl="torch")
    assert sig.tolist() == [True] and adv.tolist() == pytest.approx([-1 / 2**0.5, 1 / 2**0.5])
