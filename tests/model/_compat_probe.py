"""Run each megatron-core call that needs a CPU patch, first unpatched, then patched; print JSON.

Run in a fresh process by test_compat.py so the unpatched calls see a pristine megatron-core
(the patches are process-global). Output: {check: {"unpatched": error or null, "patched": ...}}.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _err(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we report any failure
        return f"{type(e).__name__}: {e}"
    return None


def seed_tracker() -> dict:
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    restored = torch.equal(before, torch.get_rng_state())
    with tracker.fork():
        b = torch.rand(4)
    # The fork continues its own stream: a fresh tracker with the same seed reproduces a then b.
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        a2, b2 = torch.rand(4), torch.rand(4)
    g = torch.Generator().manual_seed(123 + 2718)  # megatron's TP seed offset, tp_rank 0
    expect = torch.rand(4, generator=g)
    return {
        "cpu_state_restored": restored,
        "stream_continues": bool(torch.equal(a, a2) and torch.equal(b, b2) and not torch.equal(a, b)),
        "tp_seed_matches_megatron_formula": bool(torch.equal(a, expect)),
    }


def rotary() -> dict:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    emb = rope(5)
    return {"device": str(emb.device), "shape": list(emb.shape)}


def grad_norm() -> dict:
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    grads = [torch.full((3,), 2.0), torch.full((4,), 1.0)]
    norm = get_grad_norm_fp32(grads, norm_type=2)
    return {"norm": float(norm), "expected": math.sqrt(3 * 4.0 + 4 * 1.0)}


def clip_grads() -> dict:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 0.0, 4.0])
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    return {"grad": p.grad.tolist(), "expected": [3.0 / (5.0 + 1e-6), 0.0, 4.0 / (5.0 + 1e-6)]}


def type_strings() -> dict:
    x = torch.ones(2)
    return {
        "float_type": x.type(),
        "to_double_dtype": str(x.type(torch.float64).dtype),
        "to_cuda_string": [
            str(x.type("torch.cuda.DoubleTensor").dtype),
            str(x.type("torch.cuda.DoubleTensor").device),
        ],
        "dot_cuda_device": str(x.cuda().device),
        "factory_device": str(torch.zeros(1, device="cuda").device),
        "to_cuda_device": str(x.to("cuda").device),
    }


def grad_sync() -> dict:
    """megatron's DDP gradient reduction (newer megatron-core waits on torch.cuda.current_stream()
    in start_grad_sync): gradients land in main_grad, averaged over the (one-rank) DP group."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2, bias=False)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=lin)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    model(x).sum().backward()
    model.finish_grad_sync()
    return {"main_grad": lin.weight.main_grad.tolist(), "expected": x.sum(0).expand(2, 4).tolist()}


def recompute() -> dict:
    """megatron's activation checkpointing (selective and full recomputation): the backward pass
    runs the function again under the forward's saved RNG states; the gradient is unchanged and the
    random numbers drawn in the recomputation are the forward's."""
    from megatron.core import tensor_parallel

    draws = []

    def fn(x):
        noise = torch.rand(x.shape)  # stands in for dropout: must be the same draw when recomputed
        draws.append(noise)
        return (x * x * noise).sum(dim=0)

    x = torch.arange(1.0, 7.0).reshape(2, 3).requires_grad_(True)
    torch.manual_seed(5)
    out = tensor_parallel.checkpoint(fn, False, x)
    after_forward = torch.rand(1)
    out.sum().backward()
    after_backward = torch.rand(1)
    g = torch.Generator().manual_seed(5)  # the stream without any recomputation
    expect = [torch.rand(2, 3, generator=g), torch.rand(1, generator=g), torch.rand(1, generator=g)]
    return {
        "grad_matches": bool(torch.allclose(x.grad, 2 * x.detach() * draws[0])),
        "recomputed_same_draw": len(draws) == 2 and bool(torch.equal(draws[0], draws[1])),
        # the recomputation leaves the generator where it was: the stream goes on as without it
        "stream_continues": bool(torch.equal(draws[0], expect[0]) and torch.equal(after_forward, expect[1])
                                 and torch.equal(after_backward, expect[2])),
    }


def shape_exchange() -> dict:
    """megatron's p2p shape exchange between pipeline stages (config.variable_seq_lengths, for
    micro-batches of different shapes) synchronizes CUDA afterwards; here with nothing to send or
    receive (one stage), so only that call can fail."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    config = ModelParallelConfig(variable_seq_lengths=True, pipeline_dtype=torch.float32)
    comm = P2PCommunicator(ps.get_pipeline_model_parallel_group(), config)
    prev, nxt = comm._communicate_shapes(None, None, False, False)
    return {"shapes": [list(prev), list(nxt)]}


CHECKS = {
    "seed_tracker": seed_tracker,
    "rotary": rotary,
    "grad_norm": grad_norm,
    "clip_grads": clip_grads,
    "type_strings": type_strings,
    "grad_sync": grad_sync,
    "recompute": recompute,
    "shape_exchange": shape_exchange,
}


def main() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    out: dict = {name: {} for name in CHECKS}
    for name, fn in CHECKS.items():
        out[name]["unpatched"] = _err(fn)
    from megatron_recycle.model.compat import apply_cpu_compat, device_mode_suspended, remove_cpu_compat

    out["applied"] = apply_cpu_compat()
    with device_mode_suspended():  # the mode is off inside: a CUDA factory call fails again
        out["suspended_factory"] = _err(lambda: torch.zeros(1, device="cuda"))
    out["resumed_factory"] = str(torch.zeros(1, device="cuda").device)
    from torch.overrides import TorchFunctionMode

    from megatron_recycle.model.compat import device_mode_lifted

    class Count(TorchFunctionMode):  # another mode, pushed above the compat mode
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with device_mode_lifted():  # only the compat mode goes: CUDA factories fail, types are CPU types
        out["lifted_factory"] = _err(lambda: torch.zeros(1, device="cuda"))
        out["lifted_type"] = torch.zeros(1).type()
    out["relifted_type"] = torch.zeros(1).type()
    with Count():
        with device_mode_lifted():  # compat mode not on top: every override off, Count sees nothing
            torch.zeros(1).add(1)
            out["lifted_under_other_mode_count"] = Count.n
            out["lifted_under_other_mode_factory"] = _err(lambda: torch.zeros(1, device="cuda"))
        torch.zeros(1).add(1)
        out["other_mode_after_count"] = Count.n
    out["applied_again"] = apply_cpu_compat()
    # patch 5 alone: the other four on, torch.cuda.current_stream as torch has it
    from megatron_recycle.model import compat

    out["stream_patched"] = type(torch.cuda.current_stream()).__name__
    torch.cuda.current_stream = compat._STATE["originals"]["current_stream"]
    out["grad_sync_without_stream_patch"] = _err(grad_sync)
    torch.cuda.current_stream = compat._cpu_current_stream
    import inspect

    from megatron.core.distributed import param_and_grad_buffer

    out["megatron_waits_on_current_stream"] = "current_stream" in inspect.getsource(
        param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync
    )
    for name, fn in CHECKS.items():
        try:
            out[name]["patched"] = fn()
        except Exception:  # noqa: BLE001
            out[name]["patched"] = {"error": traceback.format_exc()}
    remove_cpu_compat()
    out["after_remove_unpatched_again"] = _err(CHECKS["grad_norm"])
    out["after_remove_stream"] = _err(torch.cuda.current_stream)
    out["after_remove_synchronize"] = _err(torch.cuda.synchronize)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    sys.stdout.write("\nPROBE-JSON " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
