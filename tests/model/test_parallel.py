"""init_distributed / destroy_distributed in one process (a world of 1, no torchrun)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_recycle.model.parallel import destroy_distributed, init_distributed


@pytest.fixture
def clean_world():
    if dist.is_initialized():
        pytest.skip("a process group from another test is still alive")
    yield
    destroy_distributed()


def test_world_of_one_layout_and_seeds(clean_world, tiny):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    layout = init_distributed(tp=1, pp=1, seed=7, model_config=tiny.tiny_config("llama", True))
    assert (layout.world_size, layout.rank, layout.tp, layout.pp, layout.dp) == (1, 0, 1, 1, 1)
    assert layout.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    assert ps.model_parallel_is_initialized()
    a = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(3))  # python/numpy/torch seeded with seed + 100 * pp_rank
    with tensor_parallel.get_cuda_rng_tracker().fork():  # the TP RNG stream exists
        pass
    assert init_distributed(tp=1, pp=1, seed=7).tp == 1  # same layout again: reused
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp = 1\*2 = 2"):
        init_distributed(tp=1, pp=2)
    assert dist.is_initialized() and ps.model_parallel_is_initialized()  # the live set-up survives
    destroy_distributed()
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()


def test_layout_larger_than_world_fails_and_cleans_up(clean_world):
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp = 2\*1 = 2"):
        init_distributed(tp=2, pp=1)
    assert not dist.is_initialized()


def test_model_that_does_not_divide_fails_before_setup(clean_world, tiny):
    with pytest.raises(ValueError, match=r"num_layers=2 is not divisible by pp\*vpp = 4\*1 = 4"):
        init_distributed(tp=1, pp=4, model_config=tiny.tiny_config("qwen3", True))
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU only")
def test_nccl_without_cuda_is_refused(clean_world):
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA"):
        init_distributed(backend="nccl")
