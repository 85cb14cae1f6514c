"""Resume a checkpoint on another parallel layout: TP, PP, VPP, DP size, distributed optimizer or not.

A checkpoint holds each rank's own shards (train/checkpoint.py), which a resume on the same
layout loads as they are. Each rank also saves :func:`model_space_records`: for every parameter it
holds, the parameter's global Megatron name and TP shard index, and references to its model
tensor, the fp32 main weights and optimizer moments this rank's optimizer owns, and the flat
range of the TP shard those cover (the distributed optimizer splits each shard over the DP ranks;
the other Megatron optimizers hold all of it). They are references to the tensors the
checkpoint saves anyway, and torch.save stores a storage once, so the records add only names
and numbers to the files.

:func:`load_resharded` rebuilds, for every parameter of the new layout, the full Hugging
Face-named tensors from the old ranks' records (TP shards joined by
``convert.hf_tensors_from_shards``, the DP ranges laid side by side and checked to cover every
element exactly once) and cuts the new shards with ``convert._megatron_to_hf_value``, the function
the Hugging Face weight import uses. The optimizer state is elementwise, so the layout transforms
of the weights apply to it unchanged. Nothing is recomputed: after a resharded load the model,
the main weights and the moments are the checkpoint's values, bit for bit
(tests/train/test_reshard.py). Only the RNG streams cannot be carried over to other ranks; the
caller restarts them (train/resume.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

RESHARD_FORMAT = "megatron-recycle-reshard/1"


def _main_params(o: Any) -> dict[int, torch.Tensor]:
    """id(model param) -> the tensor a non-distributed Megatron optimizer steps (its fp32 copy or itself)."""
    found: dict[int, torch.Tensor] = {}
    if hasattr(o, "float16_groups"):  # Float16OptimizerWithFloat16Params (bf16 weights, fp32 copies)
        for model_group, main_group in zip(o.float16_groups, o.fp32_from_float16_groups):
            for p, main in zip(model_group, main_group):
                found[id(p)] = main
        for group in o.fp32_from_fp32_groups:
            for p in group:
                found[id(p)] = p
    else:  # FP32Optimizer: the torch optimizer steps the model parameters themselves
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                found[id(p)] = p
    return found


class _Owner:
    """Where one model parameter's optimizer state lives on this rank: (main tensor, torch optimizer,
    flat range of the TP shard), or nothing when another DP rank owns all of it."""

    def __init__(self, opt: Any) -> None:
        from megatron_recycle.train.optim import _is_distributed_optimizer, _sub_optimizers

        self.subs = [(o, _is_distributed_optimizer(o)) for o in _sub_optimizers(opt)]
        self.plain = [(o, _main_params(o)) for o, distributed in self.subs if not distributed]

    def find(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, Any, int, int] | None:
        for o, distributed in self.subs:
            if not distributed or p not in o.model_param_gbuf_map:
                continue
            try:
                rng = o._get_model_param_range_map(p)["param"]
            except KeyError:
                return None  # held by the distributed optimizer, owned by another DP rank
            gi, order = o.model_param_group_index_map[p]
            return o.optimizer.param_groups[gi]["params"][order], o.optimizer, int(rng.start), int(rng.end)
        for o, mains in self.plain:
            main = mains.get(id(p))
            if main is not None:
                return main, o.optimizer, 0, p.numel()
        return None


def _group_of(inner: Any, main: torch.Tensor) -> dict[str, Any]:
    return next(g for g in inner.param_groups if any(q is main for q in g["params"]))


def _global_name(model: Any, name: str) -> str:
    """A chunk's parameter name with the layer numbered in the whole model (PP/VPP chunks count from 0)."""
    from megatron_recycle.model.convert import _LAYER_RE, _global_layer_index

    m = _LAYER_RE.match(name)
    if m is None:
        return name
    return f"decoder.layers.{_global_layer_index(model, int(m.group(1)))}.{m.group(2)}"


def model_space_records(chunks: Sequence[Any], opt: Any) -> dict[str, Any]:
    """This rank's parameters and optimizer state by global Megatron name (references, not copies).

    Serialize the result (the checkpoint does) before the next optimizer step changes the tensors.
    """
    from megatron.core import parallel_state as ps

    from megatron_recycle.model.build import unwrap_model

    owner = _Owner(opt)
    params: dict[str, Any] = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, p in model.named_parameters():
            rec: dict[str, Any] = {"weight": p.detach(), "start": None, "end": None, "main": None, "state": {}}
            found = owner.find(p)
            if found is not None:
                main, inner, start, end = found
                rec.update(start=start, end=end, main=main.detach().reshape(-1))
                rec["state"] = {
                    k: (v.detach().reshape(-1) if v.dim() > 0 else v.detach())
                    for k, v in inner.state.get(main, {}).items() if isinstance(v, torch.Tensor)
                }
                # fused Adams (apex, transformer-engine) count steps per param group, not per parameter
                group = _group_of(inner, main)
                step = _group_step(group)
                if step is not None and "step" not in rec["state"]:
                    rec["state"]["step"] = torch.tensor(step)
            params[_global_name(model, name)] = rec
    return {
        "format": RESHARD_FORMAT,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "params": params,
    }


class SavedModelSpace:
    """The old ranks' records, read as full Hugging Face-named tensors of any kind: "weight", "main"
    or an optimizer state key ("exp_avg", "exp_avg_sq", ...)."""

    def __init__(self, records: Sequence[dict[str, Any]], hf_config: Any) -> None:
        from megatron_recycle.model.convert import hf_names_of
        from megatron_recycle.train.checkpoint import CheckpointError

        self.cfg = hf_config
        self.by_name: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
        for i, r in enumerate(records):
            if not isinstance(r, dict) or r.get("format") != RESHARD_FORMAT:
                raise CheckpointError(
                    f"rank {i}'s part of this checkpoint has no model-space records (format {RESHARD_FORMAT!r}; "
                    "checkpoints written before it can be neither resharded nor exported, only resumed on the layout "
                    "that saved them)"
                )
            for name, rec in r["params"].items():
                self.by_name.setdefault(name, []).append((int(r["tp"]), int(r["tp_rank"]), rec))
        self.owner_of: dict[str, str] = {}
        for name in self.by_name:
            for hf in hf_names_of(name, hf_config):
                self.owner_of[hf] = name
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.has_state = any(rec["state"] for recs in self.by_name.values() for _, _, rec in recs)
        self.state_keys = sorted({k for recs in self.by_name.values() for _, _, rec in recs
                                  for k, v in rec["state"].items() if v.dim() > 0})

    def _shards(self, name: str, kind: str) -> list[torch.Tensor]:
        from megatron_recycle.train.checkpoint import CheckpointError

        recs = self.by_name[name]
        tps = {tp for tp, _, _ in recs}
        if len(tps) != 1:
            raise CheckpointError(f"{name}: saved with several TP sizes {sorted(tps)}")
        tp = tps.pop()
        out = []
        for t in range(tp):
            mine = [rec for size, r, rec in recs if r == t]
            if not mine:
                raise CheckpointError(f"{name}: no rank of the checkpoint holds TP shard {t} of {tp}")
            weight = mine[0]["weight"]
            if kind == "weight":
                out.append(weight)
                continue
            pieces = [(rec["start"], rec["end"], rec["main"] if kind == "main" else rec["state"].get(kind))
                      for rec in mine if rec["start"] is not None]
            whole = [x for s, e, x in pieces if s == 0 and e == weight.numel() and x is not None]
            if whole:  # a plain optimizer holds the whole shard (DP replicas hold copies)
                out.append(whole[0].view(weight.shape))
                continue
            flat = torch.empty(weight.numel(), dtype=torch.float32)
            count = torch.zeros(weight.numel(), dtype=torch.int32)
            for s, e, x in pieces:
                if x is None or x.numel() != e - s:
                    raise CheckpointError(f"{name}: TP shard {t} has no {kind!r} state for elements [{s}, {e})")
                flat[s:e] = x
                count[s:e] += 1
            if not bool((count == 1).all()):
                raise CheckpointError(
                    f"{name}: the saved {kind!r} ranges of TP shard {t} do not cover its {weight.numel()} elements "
                    f"exactly once (a rank's file missing, or two runs' files mixed)"
                )
            out.append(flat.view(weight.shape))
        return out

    def getter(self, kind: str) -> Callable[[str], torch.Tensor]:
        """get(hf_name) -> the full tensor of that kind (keeps one Megatron parameter's tensors cached)."""
        from megatron_recycle.model.convert import _LAYER_RE, hf_tensors_from_shards

        def get(hf_name: str) -> torch.Tensor:
            key = (kind, hf_name)
            if key not in self._cache:
                name = self.owner_of.get(hf_name)
                if name is None:
                    raise KeyError(hf_name)
                m = _LAYER_RE.match(name)
                layer = int(m.group(1)) if m else None
                shards = self._shards(name, kind)
                self._cache.clear()
                for n, t in hf_tensors_from_shards(name, layer, self.cfg, lambda dim: shards if dim is not None else shards[:1]):
                    self._cache[(kind, n)] = t
            return self._cache[key]

        return get

    def scalar_state(self) -> dict[str, torch.Tensor]:
        """The optimizer's per-parameter scalars (Adam's "step"), which every parameter shares."""
        for recs in self.by_name.values():
            for _, _, rec in recs:
                scalars = {k: v for k, v in rec["state"].items() if v.dim() == 0}
                if scalars:
                    return scalars
        return {}


@torch.no_grad()
def load_resharded(chunks: Sequence[Any], opt: Any, hf_config: Any, records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Fill this rank's model shard and optimizer state from every old rank's model-space records.

    ``records``: :func:`model_space_records` of each rank of the checkpoint (any layout). Returns
    counts of what was set. CheckpointError when the records do not hold a full model.
    """
    from megatron.core import parallel_state as ps

    from megatron_recycle.model.build import unwrap_model
    from megatron_recycle.model.convert import _megatron_to_hf_value
    from megatron_recycle.train.checkpoint import CheckpointError

    saved = SavedModelSpace(records, hf_config)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    owner = _Owner(opt)
    scalars = saved.scalar_state()
    counts = {"params": 0, "optimizer_shards": 0}

    def value(model: Any, name: str, kind: str, shape: torch.Size) -> torch.Tensor:
        try:
            v = _megatron_to_hf_value(model, name, saved.getter(kind), hf_config, tp, r)
        except KeyError as e:
            raise CheckpointError(f"{name}: the checkpoint does not hold {e} ({kind})") from None
        if v.shape != shape:
            raise CheckpointError(f"{name}: checkpoint gives shape {tuple(v.shape)} ({kind}), this run's shard is {tuple(shape)}")
        return v

    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, p in model.named_parameters():
            p.copy_(value(model, name, "weight", p.shape))
            counts["params"] += 1
            found = owner.find(p)
            if found is None:
                continue
            main, inner, start, end = found
            main.copy_(value(model, name, "main", p.shape).reshape(-1)[start:end].view_as(main))
            if not saved.has_state:
                inner.state.pop(main, None)
                continue
            state = inner.state.setdefault(main, {})
            for key in saved.state_keys:
                v = value(model, name, key, p.shape).reshape(-1)[start:end].view_as(main)
                if key in state:
                    state[key].copy_(v)
                else:
                    state[key] = v.to(device=main.device, dtype=main.dtype).clone()
            group = _group_of(inner, main)
            for key, v in scalars.items():
                if key == "step" and _group_step(group) is not None:  # a per-group count
                    if isinstance(group["step"], torch.Tensor):  # (capturable: a tensor, kept where it is)
                        group["step"].fill_(v.item())
                    else:
                        group["step"] = type(group["step"])(v.item())
                    continue
                # torch keeps "step" per parameter: on the device for fused/capturable, else on the CPU
                on_device = group.get("fused") or group.get("capturable")
                state[key] = v.clone().to(main.device if on_device else "cpu")
            counts["optimizer_shards"] += 1
    return counts


def _group_step(group: dict) -> float | None:
    """A fused Adam's per-group step count (apex, transformer-engine: an int, or a one-element
    tensor when capturable), or None when the group keeps none (torch counts per parameter)."""
    step = group.get("step")
    if isinstance(step, bool):
        return None
    if isinstance(step, int | float):
        return float(step)
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        return float(step.item())
    return None


def _hf_order(name: str) -> tuple[int, int, str]:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, name)


def export_checkpoint(
    run_dir: str | Any,
    out_dir: str | Any,
    step: int | None = None,
    main_weights: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Write a training checkpoint's policy as a Hugging Face folder, in one process, on any layout.

    No torch.distributed and no Megatron model: the checkpoint's files are verified (sha256) and
    memory-mapped, and each full tensor is rebuilt from the ranks' model-space records one at a
    time. ``main_weights`` writes the optimizer's fp32 main weights instead of the model's own
    (bf16 in a bf16 run). The model's config and tokenizer come from the run's
    ``model.name_or_path`` (config.yaml in the run directory). Returns what was written.
    """
    from pathlib import Path

    from megatron_recycle.config import load_config
    from megatron_recycle.model.convert import write_hf_folder
    from megatron_recycle.model.hf_loading import load_generation_config, load_hf_config, load_tokenizer
    from megatron_recycle.train.checkpoint import MANIFEST, CheckpointError, CheckpointManager

    run_dir, out = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml; pass the run directory of a `megatron-recycle train` "
                              "run (or its sft folder, RUN_DIR/sft, for the SFT checkpoints)")
    cfg = load_config(run_dir / "config.yaml", check_environment=False, command="export")  # exported anywhere, no engine
    ckpt = CheckpointManager(run_dir, config_dict=cfg.to_dict())
    if step is None:
        step = ckpt.latest()
        newer = [s for s in ckpt.interrupted_installs() if step is None or s > step]
        if newer:  # (recover() would finish it; export does not move a run's files)
            print(f"[export] note: the save of step {newer[-1]} was interrupted between its two renames "
                  f"(or is in progress); `train --resume` finishes it."
                  + (f" Exporting step {step} instead; pass --step to choose." if step is not None else ""),
                  flush=True)
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {ckpt.dir}"
                                  + ("; run `train --resume` first to finish the interrupted one" if newer else ""))
    # Check the config with the keys the checkpoint was written with (GRPO's RESUME_KEYS, SFT's
    # SFT_RESUME_KEYS); a missing or broken manifest is reported by load_all below.
    try:
        keys = json.loads((ckpt.step_dir(step) / MANIFEST).read_text()).get("config_fingerprint")
    except (OSError, ValueError):
        keys = None
    if isinstance(keys, dict) and keys:
        ckpt = CheckpointManager(run_dir, config_dict=cfg.to_dict(), resume_keys=tuple(keys))
    _, parts = ckpt.load_all(step)
    hf_config = load_hf_config(cfg.model.name_or_path, cache_dir=cfg.model.cache_dir)
    saved = SavedModelSpace([p.get("model_space") if isinstance(p, dict) else None for p in parts], hf_config)
    if main_weights and not any(rec["main"] is not None for recs in saved.by_name.values() for _, _, rec in recs):
        raise CheckpointError(f"checkpoint step {step} holds no optimizer main weights")
    get = saved.getter("main" if main_weights else "weight")
    names = sorted(saved.owner_of, key=_hf_order)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cache_dir=cfg.model.cache_dir)
    n = write_hf_folder(((name, get(name)) for name in names), hf_config, out, max_shard_bytes=max_shard_bytes,
                        tokenizer=tokenizer,
                        generation_config=load_generation_config(cfg.model.name_or_path, cache_dir=cfg.model.cache_dir))
    return {"step": step, "tensors": n, "out": str(out), "ranks": len(parts),
            "weights": "fp32 main weights" if main_weights else "model weights"}


def rng_state_for_new_layout(state: dict[str, Any], cuda_devices: int) -> dict[str, Any]:
    """An old rank's RNG state made loadable by a rank of another layout: the CUDA generator states
    are dropped when this process sees another number of devices (a resume on another machine
    shape; restore_rng_state would refuse them), and those generators keep this run's seeds."""
    out = dict(state)
    if "cuda" in out and len(out["cuda"]) != cuda_devices:
        out.pop("cuda")
        out.pop("cuda_current", None)
    return out
