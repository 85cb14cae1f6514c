"""Distributed set-up: torch.distributed from torchrun's environment, megatron parallel_state, seeds.

One call, :func:`init_distributed`, works the same under ``torchrun`` (reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and in a plain single process (a world of 1 over an
in-memory store, no port). gloo on CPU, NCCL on GPU; the CPU compatibility patches are applied
when CUDA is absent. :func:`validate_layout` checks that a TP/PP(/VPP) layout divides both the
world and the model (heads, query groups, layers, FFN, vocabulary) and names what to change.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_recycle.model.compat import apply_cpu_compat

logger = logging.getLogger(__name__)

_OWNS_PROCESS_GROUP = False


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid (VPP = virtual stages per PP rank)."""

    world_size: int
    rank: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    """First attribute (or dict key) of ``cfg`` among ``names`` that is set."""
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def validate_layout(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    world_size: int | None = None,
    model_config: Any | None = None,
) -> None:
    """Raise ValueError, naming the offending numbers, when a TP/PP/VPP layout cannot work.

    ``model_config`` may be a Hugging Face config, a megatron TransformerConfig or a dict; the
    checks are: heads and query groups divisible by TP, FFN size and vocabulary divisible by TP,
    layers divisible by PP x VPP. ``world_size`` must be a multiple of TP x PP.
    """
    for name, v in (("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if vpp is not None:
        if not isinstance(vpp, int) or vpp < 1:
            raise ValueError(f"vpp={vpp!r} must be None or a positive integer")
        if vpp > 1 and pp < 2:
            raise ValueError(f"virtual pipeline stages (vpp={vpp}) need pp >= 2, got pp={pp}; set vpp=None")
    if world_size is not None and world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or change tp/pp"
        )
    if model_config is None:
        return
    heads = _get(model_config, "num_attention_heads")
    groups = _get(model_config, "num_key_value_heads", "num_query_groups", default=heads)
    layers = _get(model_config, "num_hidden_layers", "num_layers")
    ffn = _get(model_config, "intermediate_size", "ffn_hidden_size")
    vocab = _get(model_config, "vocab_size")
    if heads is not None and groups and heads % groups != 0:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}: "
                         "grouped-query attention shares each key/value head among a whole number of query heads")
    if heads is not None and heads % tp != 0:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tp={tp}; pick tp dividing {heads}")
    if groups is not None and groups % tp != 0:
        raise ValueError(
            f"num_key_value_heads (query groups)={groups} is not divisible by tp={tp}; "
            f"pick tp dividing {groups}"
        )
    if ffn is not None and ffn % tp != 0:
        raise ValueError(f"intermediate (FFN) size {ffn} is not divisible by tp={tp}; pick tp dividing {ffn}")
    if vocab is not None and vocab % tp != 0:
        raise ValueError(
            f"vocab_size={vocab} is not divisible by tp={tp}; padded vocabularies are not supported "
            f"(their extra logits would change log-probs), pick tp dividing {vocab}"
        )
    stages = pp * (vpp or 1)
    if layers is not None and layers % stages != 0:
        raise ValueError(
            f"num_layers={layers} is not divisible by pp*vpp = {pp}*{vpp or 1} = {stages}; "
            f"pick a pipeline layout whose stage count divides {layers}"
        )


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


DEFAULT_COLLECTIVE_TIMEOUT_MIN = 60.0


def elastic_restart_count() -> int:
    """How often torchrun has restarted this worker group (``TORCHELASTIC_RESTART_COUNT``; 0 on the
    first start and outside torchrun). Under ``torchrun --max-restarts N`` (the launch scripts'
    MAX_RESTARTS) a group that lost a worker starts again with the same arguments."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return max(0, int(value))
    except ValueError:
        logger.warning("ignoring TORCHELASTIC_RESTART_COUNT=%r (not an integer)", value)
        return 0


def restarts_share_the_agent_store() -> bool:
    """True when torchrun may restart the workers (``TORCHELASTIC_MAX_RESTARTS`` > 0) and they
    share its agent's TCP store (``TORCHELASTIC_USE_AGENT_STORE``): the store keeps the keys of the
    last attempt, and the restarted process group can meet them (a hang, seen with gloo on one
    node and on two)."""
    try:
        max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return False
    return max_restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def max_over_world(value: int) -> int:
    """The largest of every rank's ``value`` (collective when a multi-rank group exists)."""
    t = torch.tensor([int(value)], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def restarted_anywhere() -> bool:
    """Whether any rank's worker group is a torchrun restart (collective when a group exists).

    Across nodes the counts differ: the node whose worker failed counts a restart, the others
    only re-join the rendezvous and keep their count, so every rank takes the maximum."""
    return max_over_world(elastic_restart_count()) > 0


def _timeout_min(timeout_min: float | None) -> float:
    minutes = DEFAULT_COLLECTIVE_TIMEOUT_MIN if timeout_min is None else float(timeout_min)
    if not minutes > 0:
        raise ValueError(f"collective timeout must be > 0 minutes, got {timeout_min}")
    return minutes


def init_process_group(backend: str | None = None, timeout_min: float | None = None) -> bool:
    """The default process group from torchrun's environment (a world of 1 without one); True
    when this call created it, False when one existed. backend defaults to ``nccl`` with CUDA
    (each process on device LOCAL_RANK) and ``gloo`` without. :func:`init_distributed` calls it;
    code that needs only collectives (sharded evaluation before training) may call it first, and
    init_distributed then reuses the group.

    ``timeout_min`` (default :data:`DEFAULT_COLLECTIVE_TIMEOUT_MIN`, config ``run.collective_timeout_min``):
    how long a collective may wait for the other ranks before it fails. torch's own default for
    NCCL is 10 minutes, which a rank waiting while its model-parallel leader generates rollouts or
    evaluates can exceed on a large model."""
    global _OWNS_PROCESS_GROUP
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ValueError("backend='nccl' needs CUDA, and no CUDA device is visible; use backend='gloo'")
    if dist.is_initialized():
        return False
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK") or 0
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=_timeout_min(timeout_min))
    if world is None or (world == 1 and "MASTER_ADDR" not in os.environ):
        # Plain single process: an in-memory store, no port to find.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if rank is None:
            raise RuntimeError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun")
        if rank == 0 and restarts_share_the_agent_store():
            logger.warning(
                "torchrun --max-restarts with its agent's shared TCP store: a restarted worker group can "
                "hang in init_process_group on the last attempt's keys (pytorch/pytorch#135712); set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (recipes/launch_*.sh do with MAX_RESTARTS)")
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    _OWNS_PROCESS_GROUP = True
    return True


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    seed: int = 0,
    backend: str | None = None,
    model_config: Any | None = None,
    timeout_min: float | None = None,
) -> ParallelLayout:
    """Initialize torch.distributed, megatron parallel_state and the model-parallel RNG seeds.

    Uses torchrun's environment when present, otherwise a world of 1. backend defaults to
    ``nccl`` with CUDA and ``gloo`` without. An existing process group is reused. Seeds follow
    Megatron: ``seed + 100 * pp_rank`` for python/numpy/torch, then the TP RNG tracker.
    ``timeout_min``: how long a collective waits for the other ranks, on the default group and on
    megatron's groups (:func:`init_process_group`).
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    global _OWNS_PROCESS_GROUP
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()

    validate_layout(tp, pp, vpp, None, model_config)  # model shape first: fail before any set-up
    created_now = init_process_group(backend, timeout_min)
    world_size = dist.get_world_size()
    try:
        validate_layout(tp, pp, vpp, world_size)
    except ValueError:
        if created_now:  # leave no half-initialized state behind
            dist.destroy_process_group()
            _OWNS_PROCESS_GROUP = False
        raise

    if ps.model_parallel_is_initialized():
        have = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
        )
        want = (tp, pp, vpp if (vpp or 1) > 1 else None)
        if have != want:
            raise RuntimeError(
                f"megatron parallel_state is already initialized with tp,pp,vpp={have}, asked for {want}; "
                "call destroy_distributed() first"
            )
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if (vpp or 1) > 1 else None,
            # megatron's own groups (TP, PP, DP, embedding, ...) wait as long as the default group
            distributed_timeout_minutes=_timeout_min(timeout_min),
        )

    pp_rank = ps.get_pipeline_model_parallel_rank()
    s = seed + 100 * pp_rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)

    layout = ParallelLayout(
        world_size=world_size,
        rank=dist.get_rank(),
        tp=tp,
        pp=pp,
        vpp=vpp if (vpp or 1) > 1 else None,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=pp_rank,
        dp_rank=ps.get_data_parallel_rank(),
        backend=str(dist.get_backend()),
        device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
    )
    logger.info("distributed initialized: %s", layout)
    return layout


def destroy_distributed(keep_process_group: bool = False) -> None:
    """Tear down megatron parallel_state and (unless kept) the process group this module created.

    ``keep_process_group=True`` lets one set of processes try several TP/PP layouts in a row.
    """
    from megatron.core import parallel_state as ps

    global _OWNS_PROCESS_GROUP
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if keep_process_group:
        return
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
