"""The model's DDP wrapping, Megatron's optimizer and learning-rate schedule, and their state.

:func:`setup_model_and_optimizer` builds the model chunks for this rank's layout, loads weights,
wraps them in Megatron's DistributedDataParallel and builds the optimizer (Adam or SGD, the
distributed optimizer when asked, gradient clipping) with an OptimizerParamScheduler.
:func:`optimizer_state_dict` / :func:`load_optimizer_state_dict` give the optimizer state in a
layout-independent form for checkpoints (train/checkpoint.py, train/reshard.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def wrap_model_and_build_optimizer(
    model_chunks: list[torch.nn.Module],
    lr: float,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    bf16: bool = False,
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr: float = 0.0,
    lr_decay_style: str = "cosine",
    optimizer: str = "adam",
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    sgd_momentum: float = 0.0,
    overlap_grad_reduce: bool = False,
    ddp_bucket_size: int | None = None,
) -> tuple[list[torch.nn.Module], Any, Any]:
    """Wrap built model chunks in Megatron DDP; build get_megatron_optimizer and OptimizerParamScheduler.

    Also sets the model config hooks Megatron's schedules use (no_sync, grad sync, finalize grads,
    loss scale) and the gloo p2p settings PLATFORM.md requires. Returns (ddp_chunks, optimizer, scheduler).

    ``overlap_grad_reduce``: Megatron DDP's overlapped gradient reduction. The gradient buffer is
    cut into buckets of about ``ddp_bucket_size`` parameters (None: Megatron's default,
    max(40M, 1M x DP size)); in the last micro-batch's backward pass each bucket's all-reduce (or,
    with the distributed optimizer, reduce-scatter) starts asynchronously as soon as its last
    gradient is in, and the step waits for them all before the optimizer. The first step after the
    model is built reduces at the end (it learns which gradients each bucket waits for). The sums
    are the same; only when they are computed changes.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.utils import get_model_config

    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
    if total_steps < 1 or warmup_steps < 0 or warmup_steps >= total_steps:
        # Megatron's scheduler asserts lr_warmup_steps < lr_decay_steps (= total_steps)
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root"):
        raise ValueError(f"lr_decay_style={lr_decay_style!r}; use constant, linear, cosine or inverse-square-root")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}; use 'adam' or 'sgd'")
    if ddp_bucket_size is not None and (isinstance(ddp_bucket_size, bool) or int(ddp_bucket_size) != ddp_bucket_size
                                        or ddp_bucket_size < 1):
        raise ValueError(f"ddp_bucket_size={ddp_bucket_size!r}; use a number of parameters >= 1, or None")

    config = get_model_config(model_chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=bool(overlap_grad_reduce),
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=int(ddp_bucket_size) if ddp_bucket_size is not None else None,
    )
    ddp_chunks: list[torch.nn.Module] = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(model_chunks)
    ]
    for m in ddp_chunks:
        m.broadcast_params()  # every DP replica starts from DP rank 0's weights

    opt_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        sgd_momentum=sgd_momentum,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    opt = get_megatron_optimizer(opt_config, ddp_chunks)
    use_fused_cpu_adamw(opt)
    scheduler = OptimizerParamScheduler(
        opt,
        init_lr=warmup_start_lr(warmup_steps, lr),
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=lr_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )

    # Hooks the schedules call (the same ones Megatron's own training loop installs).
    config.no_sync_func = [m.no_sync for m in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    # With overlap, a pipeline schedule starts each chunk's remaining reductions itself once that
    # chunk's backward passes are done (stages other than the first reduce in the pipeline bubble).
    config.grad_sync_func = None
    if overlap_grad_reduce:
        config.grad_sync_func = ([m.start_grad_sync for m in ddp_chunks] if len(ddp_chunks) > 1
                                 else ddp_chunks[0].start_grad_sync)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = opt.scale_loss
    gloo_p2p_settings(config, len(ddp_chunks))
    return ddp_chunks, opt, scheduler


def gloo_p2p_settings(config: Any, num_chunks: int) -> None:
    """PLATFORM.md: batched p2p sync is wrong on gloo; interleaved PP also needs unbatched p2p.
    For every model whose chunks run Megatron's pipeline schedules (the policy, the KL reference)."""
    if dist.is_initialized() and dist.get_backend() == "gloo":
        config.batch_p2p_sync = False
        if num_chunks > 1:
            config.batch_p2p_comm = False


def describe_grad_reduction(ddp_chunks: list[torch.nn.Module]) -> str:
    """'' or, with overlapped gradient reduction, e.g. 'overlapped grad reduction (12 buckets)'."""
    first = ddp_chunks[0] if ddp_chunks else None
    ddp_config = getattr(first, "ddp_config", None)
    if ddp_config is None or not ddp_config.overlap_grad_reduce:
        return ""
    buckets = sum(len(g.buckets) for m in ddp_chunks for g in getattr(m, "bucket_groups", []))
    return f"overlapped grad reduction ({buckets} bucket{'s' if buckets != 1 else ''})"


def _sub_optimizers(opt: Any) -> list[Any]:
    """The Megatron optimizers of a ChainedOptimizer, or ``[opt]``."""
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def torch_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron (chained) optimizer."""
    found: list[torch.optim.Optimizer] = []
    for o in _sub_optimizers(opt):
        inner = getattr(o, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            found.append(inner)
    return found


def use_fused_cpu_adamw(opt: Any) -> int:
    """Switch torch AdamW (Megatron's fallback without TE/apex) to its fused CPU kernel when every
    parameter is a float CPU tensor: one kernel per tensor instead of a dozen elementwise passes
    (4x faster for 135M parameters on 2 cores; same update to fp32 rounding). Returns the number
    of param groups switched."""
    switched = 0
    for inner in torch_optimizers(opt):
        if not isinstance(inner, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            params = group["params"]
            if params and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


OPTIMIZER_STATE_FORMAT = "megatron-recycle-optimizer/1"


def _is_distributed_optimizer(o: Any) -> bool:
    from megatron.core.optimizer import DistributedOptimizer

    return isinstance(o, DistributedOptimizer)


def optimizer_state_dict(opt: Any) -> dict[str, Any]:
    """Everything a resumed run needs of a Megatron (chained) optimizer, per rank.

    Megatron's ``DistributedOptimizer.state_dict()`` holds only the parameter-independent part (its
    docstring: the Adam moments and fp32 main weights go through ``save_parameter_state``, a
    separate gather to DP rank 0), and it asserts when the optimizer has not stepped yet. Saved
    alone, a resumed run got moments allocated with ``torch.empty`` and, with bf16, fp32 main
    weights from the start of the run. Here each distributed optimizer saves this rank's shard
    as it is: the inner torch optimizer's own state dict (moments, step) and its parameters (the
    fp32 main-weight shards), which is exact because a resume keeps the layout
    (checkpoint.RESUME_KEYS). Other Megatron optimizers keep their own ``state_dict()`` (it
    includes the fp32 copies of bf16 weights). The tensors are the live ones, not copies:
    serialize the result before the next step.
    """
    parts: list[dict[str, Any]] = []
    for o in _sub_optimizers(opt):
        if _is_distributed_optimizer(o):
            inner = o.optimizer
            scaler = getattr(o, "grad_scaler", None)
            parts.append({
                "kind": "distributed",
                "inner": inner.state_dict(),
                "main_params": [p.detach() for g in inner.param_groups for p in g["params"]],
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
            })
        else:
            parts.append({"kind": "megatron", "state": o.state_dict()})
    return {"format": OPTIMIZER_STATE_FORMAT, "parts": parts}


def load_optimizer_state_dict(opt: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict`, on an optimizer of the same layout.

    A state saved by ``opt.state_dict()`` alone (checkpoints written before this format) still
    loads for the non-distributed optimizers; for a distributed one it is refused, since it never
    held the moments or the main weights. A state that does not fit raises CheckpointError.
    """
    from megatron_recycle.train.checkpoint import CheckpointError

    subs = _sub_optimizers(opt)
    if not isinstance(state, dict) or state.get("format") != OPTIMIZER_STATE_FORMAT:
        if any(_is_distributed_optimizer(o) for o in subs):
            raise CheckpointError(
                "this checkpoint's optimizer state was saved by Megatron's DistributedOptimizer.state_dict() "
                "alone (megatron-recycle before the optimizer format "
                f"{OPTIMIZER_STATE_FORMAT!r}): it lacks the Adam moments and fp32 main weights, so the run "
                "cannot be resumed exactly; start the run again (or a new one with --init-from a Hugging Face "
                "export of the weights)"
            )
        opt.load_state_dict(state)
        return
    parts = state["parts"]
    if len(parts) != len(subs):
        raise CheckpointError(f"optimizer state holds {len(parts)} optimizers, this run has {len(subs)}")
    for o, part in zip(subs, parts):
        distributed = _is_distributed_optimizer(o)
        if distributed != (part["kind"] == "distributed"):
            raise CheckpointError(f"optimizer state of kind {part['kind']!r} cannot load into {type(o).__name__}")
        if not distributed:
            o.load_state_dict(part["state"])
            continue
        inner = o.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        saved = part["main_params"]
        if len(saved) != len(params) or any(a.shape != b.shape for a, b in zip(params, saved)):
            raise CheckpointError("distributed optimizer state does not match this run's parameter shards")
        inner.load_state_dict(part["inner"])
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        scaler = getattr(o, "grad_scaler", None)
        if scaler is not None and part["grad_scaler"] is not None:
            scaler.load_state_dict(part["grad_scaler"])


def warmup_start_lr(warmup_steps: int, lr: float) -> float:
    """Where the schedule starts: 0 with a warm-up, else the peak (one rule for build and restore)."""
    return 0.0 if warmup_steps > 0 else lr


# Per-group hyperparameters a torch load_state_dict puts back with the saved groups (the same-
# layout resume) and a resharded resume must put back itself: Megatron's scheduler reads each
# group's max_lr/min_lr, not its own.
_GROUP_HPARAMS = ("max_lr", "min_lr", "betas", "eps", "momentum")
_GROUP_SIGNATURE = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _signature(group: dict[str, Any]) -> str:
    return repr(tuple(group.get(k) for k in _GROUP_SIGNATURE))


def group_hparams(opt: Any) -> list[dict[str, Any]]:
    """The per-group hyperparameters of every torch optimizer inside ``opt``, one entry per kind
    of group (its wd/lr multipliers), for a checkpoint."""
    seen: dict[str, dict[str, Any]] = {}
    for inner in torch_optimizers(opt):
        for g in inner.param_groups:
            values = {k: (tuple(g[k]) if isinstance(g[k], (list, tuple)) else g[k]) for k in _GROUP_HPARAMS if k in g}
            seen.setdefault(_signature(g), {"signature": _signature(g), **values})
    return list(seen.values())


def apply_group_hparams(opt: Any, saved: list[dict[str, Any]]) -> int:
    """Put saved :func:`group_hparams` (of any layout's ranks) back into ``opt``'s groups of the same
    kind; returns the number of groups set. A kind of group the checkpoint did not have gets the
    values every saved kind agrees on."""
    by_sig = {e["signature"]: e for e in saved}
    common = {k: saved[0][k] for k in _GROUP_HPARAMS if saved and all(k in e and e[k] == saved[0][k] for e in saved)}
    n = 0
    for inner in torch_optimizers(opt):
        for g in inner.param_groups:
            values = by_sig.get(_signature(g), common)
            for k in _GROUP_HPARAMS:
                if k in g and k in values:
                    g[k] = tuple(values[k]) if isinstance(g[k], tuple) else values[k]
            n += 1
    return n


def hparam_differences(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    """Adam/SGD settings (betas, eps, momentum) the restore changed from this config's."""
    a, b = (before or [{}])[0], (after or [{}])[0]
    return [f"{k} {b[k]} (this config: {a[k]})" for k in ("betas", "eps", "momentum")
            if k in a and k in b and a[k] != b[k]]


def finish_schedule_restore(scheduler: Any) -> None:
    """After ``scheduler.load_state_dict``: the warm-up's start value follows the restored schedule
    (Megatron does not save init_lr; the constructor took it from this config's warm-up), and the
    groups' lr and weight decay are set again from the restored values (Megatron's load steps the
    scheduler before it restores start_wd/end_wd, so the first update used this config's decay)."""
    scheduler.init_lr = warmup_start_lr(scheduler.lr_warmup_steps, scheduler.max_lr)
    scheduler.step(0)


_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd")


def schedule_differences(scheduler: Any, saved: dict[str, Any]) -> list[str]:
    """The settings of a saved learning-rate schedule that differ from ``scheduler``'s.

    Megatron's OptimizerParamScheduler.load_state_dict keeps the checkpoint's values
    (use_checkpoint_opt_param_scheduler, its default), so a run resumed with another optim.lr,
    optim.warmup_steps or train.steps continues the checkpoint's schedule; the caller says so.
    """
    mine = scheduler.state_dict()
    return [f"{k} {saved[k]} (this config: {mine[k]})" for k in _SCHEDULE_KEYS
            if k in saved and k in mine and saved[k] != mine[k]]


def setup_model_and_optimizer(
    hf_config: Any,
    *,
    bf16: bool = False,
    load_weights: Callable[[list[torch.nn.Module]], None] | None = None,
    layer_spec: str = "auto",
    model_options: dict[str, Any] | None = None,
    **optimizer_kwargs: Any,
) -> tuple[list[torch.nn.Module], Any, Any]:
    """Build this rank's GPTModel chunks (model.build), wrap them in Megatron DDP, build optimizer + LR schedule.

    Call after init_distributed. ``load_weights(chunks)`` (e.g. HF -> Megatron conversion) runs
    on the bare chunks before DDP and the optimizer copy them. ``model_options``: TransformerConfig
    fields (model.build.memory_options: recomputation, sequence parallelism). ``bf16`` goes to both
    the model and the optimizer; ``optimizer_kwargs`` (``lr`` required) to
    wrap_model_and_build_optimizer, whose arguments they are.
    """
    import inspect

    from megatron_recycle.model.build import build_model_chunks

    # a missing lr or a misspelled key fails here, before the model is built
    inspect.signature(wrap_model_and_build_optimizer).bind([], bf16=bf16, **optimizer_kwargs)
    chunks = build_model_chunks(hf_config, bf16=bf16, layer_spec=layer_spec, **(model_options or {}))
    if load_weights is not None:
        load_weights(chunks)
    return wrap_model_and_build_optimizer(chunks, bf16=bf16, **optimizer_kwargs)
