"""The fused CPU AdamW switch: the same Adam updates as torch's unfused AdamW (fp32 rounding)."""

from __future__ import annotations

import pytest
import torch

from megatron_recycle.model.build import build_model_chunks
from megatron_recycle.model.convert import load_hf_weights
from megatron_recycle.train.batch import build_batch
from megatron_recycle.train.optim import torch_optimizers, wrap_model_and_build_optimizer
from megatron_recycle.train.step import GRPOLossConfig, grpo_train_step


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fused CPU AdamW is for CPU weights; on a GPU the model is on CUDA")
def test_fused_cpu_adamw_matches_unfused(world1, tiny):
    hf = tiny.tiny_hf_model("llama", True)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 128, (int(n),), generator=g).tolist() for n in (9, 12, 7, 10)]
    masks = [[0] * 4 + [1] * (len(s) - 4) for s in seqs]
    batch = build_batch(seqs, masks, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), group_ids=[0, 0, 1, 1])
    weights = {}
    for fused in (True, False):
        chunks = build_model_chunks(hf.config, layer_spec="local")
        load_hf_weights(chunks, hf)
        chunks, opt, sched = wrap_model_and_build_optimizer(chunks, lr=1e-2, clip_grad=1.0, total_steps=10,
                                                            lr_decay_style="constant")
        groups = [grp for o in torch_optimizers(opt) for grp in o.param_groups]
        assert groups and all(grp["fused"] for grp in groups)  # switched on by default on CPU
        if not fused:
            for grp in groups:
                grp["fused"] = False
        for _ in range(3):
            grpo_train_step(chunks, opt, sched, batch, 4, GRPOLossConfig())
        weights[fused] = [p.detach().clone() for p in chunks[0].parameters()]
    fresh = build_model_chunks(hf.config, layer_spec="local")
    load_hf_weights(fresh, hf)
    start = [p.detach() for p in fresh[0].parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(weights[False], start))
    assert moved > 1e-3
    diff = max((a - b).abs().max().item() for a, b in zip(weights[True], weights[False]))
    assert diff <= 1e-6, diff
