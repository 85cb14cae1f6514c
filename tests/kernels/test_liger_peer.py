"""Cross-check against a peer: liger-kernel's triton_grpo_loss on the same logits (skipped without it).

Liger fuses log-softmax and the loss; here token_logprobs feeds grpo_loss. Where the two define the
same loss (token-level ratio, k3 KL, no dual clip) loss and logits gradient must agree.
"""

import pytest
import torch
from megatron_recycle_kernels import grpo_loss, token_logprobs

liger_grpo = pytest.importorskip(
    "liger_kernel.transformers.grpo_loss", reason="liger-kernel is not installed"
)

# liger loss_type -> our aggregation mode
MODES = [("bnpo", "token-mean"), ("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")]


@pytest.mark.parametrize("liger_mode, agg", MODES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("layout", ["sliced", "every-row-masked"])
def test_matches_liger_triton_grpo_loss(liger_mode, agg, beta, layout, triton_device):
    """``every-row-masked``: tools/bench_kernels.py's logits -> loss layout, every position of the
    [b, L+1] logits through a free view (the last against a dummy target) with the loss mask as
    token_logprobs' row_mask, as liger skips the rows its mask zeroes."""
    b, length, vocab, temp = 3, 10, 64, 0.9
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, length + 1, vocab, generator=g) * 2).to(triton_device)
    ids = torch.randint(0, vocab, (b, length), generator=g).to(triton_device)
    with torch.no_grad():
        cur = torch.log_softmax(logits[:, :-1].double() / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = (cur + 0.4 * torch.randn(b, length, generator=g, dtype=torch.float64).to(triton_device)).float()
    ref = (cur + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64).to(triton_device)).float()
    adv = torch.randn(b, generator=g).to(triton_device)
    mask = (torch.rand(b, length, generator=g) < 0.8).to(triton_device)

    x1 = logits.clone().requires_grad_()
    peer, _ = liger_grpo.triton_grpo_loss(
        x1,
        old,
        ref if beta else None,
        ids,
        adv,
        mask.float(),
        temperature=temp,
        beta=beta,
        eps_low=0.2,
        eps_high=0.28,
        inplace=False,
        loss_type=liger_mode,
        max_completion_length=length,
        reduce=True,
    )
    (g1,) = torch.autograd.grad(peer, x1)

    x2 = logits.clone().requires_grad_()
    if layout == "sliced":
        lp = token_logprobs(x2[:, :-1].reshape(-1, vocab), ids.reshape(-1), temperature=temp, impl="triton").view(
            b, length
        )
    else:
        every = torch.cat([ids, ids[:, :1]], dim=1).reshape(-1)
        rows = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).reshape(-1)
        lp = token_logprobs(x2.view(-1, vocab), every, temperature=temp, impl="triton", validate_targets=False,
                            row_mask=rows).view(b, length + 1)[:, :-1]
    ours, _ = grpo_loss(
        lp,
        old,
        adv,
        mask,
        ref if beta else None,
        eps_low=0.2,
        eps_high=0.28,
        kl_beta=beta,
        agg=agg,
        max_len=length,
        impl="triton",
    )
    (g2,) = torch.autograd.grad(ours, x2)
    torch.testing.assert_close(ours, peer.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
