"""Weight conversion between Hugging Face (Llama/Qwen2/Qwen3 names) and megatron GPTModel shards.

HF -> Megatron (:func:`load_hf_weights`): every rank fills only its own TP/PP shard, reading one
HF tensor at a time (from a transformers model, a state dict, a safetensors file or folder, a
.gguf file or the "smollm2-135m" alias), so a 7B checkpoint never sits in memory twice.

Megatron -> HF (:func:`export_hf_state_dict`): a generator of ``(hf_name, full_tensor)`` that
gathers TP shards and collects PP stages tensor by tensor. It is collective: EVERY rank of the
job must iterate it to the end in lockstep, and every rank receives every full tensor (that is
what colocated rollout engines need). The same export serves engine weight sync, HF
checkpoints and the parity tests.

Megatron layouts handled here: ``linear_qkv`` rows are grouped per query group as
[q heads of the group, k, v]; ``linear_fc1`` on each TP rank is [gate shard; up shard]; row-
parallel ``linear_proj``/``linear_fc2`` split the input dim; embeddings/output split the vocab.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_recycle.model.build import head_dim, unwrap_model

logger = logging.getLogger(__name__)

TensorGetter = Callable[[str], torch.Tensor]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron per-layer parameter suffix -> HF suffix under "model.layers.{i}." (simple 1:1 ones).
# TE-spec names (fused layer norms) map to the same HF tensors as the local-spec ones.
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# How a megatron tensor is split over TP ranks: None = replicated, else the split dim.
_TP_DIM = {
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc2.weight": 1,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "mlp.linear_fc1.weight": 0,
}


# ---------------------------------------------------------------- weight sources (HF side)
def _safetensors_getter(folder_or_file: Path) -> TensorGetter:
    """Lazy getter over one safetensors file or a folder of shards (reads one tensor per call)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    index = folder_or_file / "model.safetensors.index.json"
    if folder_or_file.is_dir() and index.is_file():
        # a sharded checkpoint: its index names the file of every tensor; stray *.safetensors files
        # in the folder (an older save, a partial download) are not read
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            where = {str(k): folder_or_file / str(v) for k, v in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a readable safetensors index ({type(e).__name__}: {e})") from e
        missing = sorted({str(f.name) for f in where.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are not in the folder: {missing}")
        return _getter(where)
    if folder_or_file.is_file():
        files = [folder_or_file]
    else:
        files = sorted(folder_or_file.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {folder_or_file}")
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k in where:
                    raise ValueError(
                        f"tensor {k!r} is in both {where[k].name} and {f.name} in {folder_or_file} and no "
                        "model.safetensors.index.json says which to use; remove the stale file")
                where[k] = f
    return _getter(where)


def _getter(where: dict[str, Path]) -> TensorGetter:
    from safetensors import safe_open

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(name)
        with safe_open(str(where[name]), framework="pt") as h:
            return h.get_tensor(name)

    get.keys = lambda: list(where)  # type: ignore[attr-defined]
    return get


def _mapping_getter(mapping: Mapping) -> TensorGetter:
    """A getter over a state dict, with ``keys()`` like the safetensors getter's."""

    def get(name: str) -> torch.Tensor:
        return mapping[name]

    get.keys = lambda: list(mapping)  # type: ignore[attr-defined]
    return get


def hf_weight_source(source: Any, hf_config: Any | None = None) -> tuple[TensorGetter, Any]:
    """(getter, hf_config) for a transformers model, a state dict, or a path / alias.

    Paths: a safetensors file (then pass hf_config), a HF folder, a .gguf file, "smollm2-135m".
    """
    if isinstance(source, torch.nn.Module):
        return _mapping_getter(source.state_dict()), hf_config or source.config
    if isinstance(source, Mapping):
        if hf_config is None:
            raise ValueError("a state-dict source needs hf_config= (the transformers config of the weights)")
        return _mapping_getter(source), hf_config
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_file() and path.suffix == ".safetensors":
            if hf_config is None:
                cfg_path = path.parent / "config.json"
                if not cfg_path.is_file():
                    raise ValueError(f"{path} has no config.json beside it; pass hf_config=")
                hf_config = _config_from_folder(path.parent)
            return _safetensors_getter(path), hf_config
        from megatron_recycle.model.hf_loading import resolve_model_folder

        folder = resolve_model_folder(source)
        return _safetensors_getter(folder), hf_config or _config_from_folder(folder)
    raise TypeError(
        f"unsupported weight source of type {type(source).__name__}; pass a transformers model, "
        "a state dict (with hf_config=), a safetensors file/folder, a .gguf path or 'smollm2-135m'"
    )


def _config_from_folder(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


# ------------------------------------------------------------------- layout helpers
def _tp() -> tuple[int, int, Any]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel_state is not initialized; call init_distributed() first")
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_group(),
    )


def _qkv_dims(cfg: Any) -> tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    nh = cfg.num_attention_heads
    ng = getattr(cfg, "num_key_value_heads", None) or nh
    return ng, nh // ng, head_dim(cfg)


def _qkv_to_megatron(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Any, tp: int, r: int
) -> torch.Tensor:
    """Interleave HF q/k/v (weights or biases) per query group and keep TP rank r's groups."""
    ng, hpg, hd = _qkv_dims(cfg)
    tail = q.shape[1:]
    qkv = torch.cat(
        [q.reshape(ng, hpg * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)], dim=1
    )
    per = ng // tp
    return qkv[r * per : (r + 1) * per].reshape(-1, *tail)


def _qkv_from_megatron(qkv: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a full (TP-gathered) megatron qkv tensor back into HF q, k, v."""
    ng, hpg, hd = _qkv_dims(cfg)
    tail = qkv.shape[1:]
    g = qkv.reshape(ng, (hpg + 2) * hd, *tail)
    q, k, v = torch.split(g, [hpg * hd, hd, hd], dim=1)
    return (
        q.reshape(ng * hpg * hd, *tail).contiguous(),
        k.reshape(ng * hd, *tail).contiguous(),
        v.reshape(ng * hd, *tail).contiguous(),
    )


def _shard(t: torch.Tensor, dim: int, tp: int, r: int) -> torch.Tensor:
    if t.shape[dim] % tp != 0:
        raise ValueError(f"tensor of shape {tuple(t.shape)} cannot be split in {tp} along dim {dim}")
    return t.chunk(tp, dim=dim)[r]


def _global_layer_index(model: Any, local: int) -> int:
    return int(model.decoder.layers[local].layer_number) - 1


def _megatron_to_hf_value(
    model: Any, name: str, get: TensorGetter, cfg: Any, tp: int, r: int
) -> torch.Tensor:
    """This rank's value for megatron parameter ``name``, built from HF tensors."""
    if name == "embedding.word_embeddings.weight":
        return _shard(get("model.embed_tokens.weight"), 0, tp, r)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    if name == "output_layer.weight":
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        return _shard(get("model.embed_tokens.weight" if tied else "lm_head.weight"), 0, tp, r)
    m = _LAYER_RE.match(name)
    if m is None:
        raise KeyError(f"no Hugging Face mapping for megatron parameter {name!r}")
    i = _global_layer_index(model, int(m.group(1)))
    suffix = m.group(2)
    pre = f"model.layers.{i}."
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return _qkv_to_megatron(
            get(pre + f"self_attn.q_proj.{kind}"),
            get(pre + f"self_attn.k_proj.{kind}"),
            get(pre + f"self_attn.v_proj.{kind}"),
            cfg,
            tp,
            r,
        )
    if suffix == "mlp.linear_fc1.weight":
        gate = _shard(get(pre + "mlp.gate_proj.weight"), 0, tp, r)
        up = _shard(get(pre + "mlp.up_proj.weight"), 0, tp, r)
        return torch.cat([gate, up], dim=0)
    if suffix in _LAYER_SIMPLE:
        t = get(pre + _LAYER_SIMPLE[suffix])
        dim = _TP_DIM.get(suffix)
        return t if dim is None else _shard(t, dim, tp, r)
    raise KeyError(f"no Hugging Face mapping for megatron parameter {name!r}")


@torch.no_grad()
def load_hf_weights(model_chunks: Any | Sequence[Any], source: Any, hf_config: Any | None = None) -> int:
    """Copy HF weights into this rank's TP/PP shard of the model chunks; returns tensors loaded.

    Reads one HF tensor at a time. Raises KeyError naming a missing HF tensor and ValueError on
    a shape mismatch (usually a config that does not belong to the weights).
    """
    get, cfg = hf_weight_source(source, hf_config)
    _check_layer_count(get.keys(), cfg)
    tp, r, _ = _tp()
    chunks = model_chunks if isinstance(model_chunks, list | tuple) else [model_chunks]
    _check_model_matches(chunks, cfg)
    _check_no_leftovers(get.keys(), chunks, cfg)
    n = 0
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            try:
                value = _megatron_to_hf_value(model, name, get, cfg, tp, r)
            except KeyError as e:
                raise KeyError(f"loading megatron parameter {name!r}: missing HF tensor {e}") from None
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"shape mismatch for {name}: megatron shard {tuple(param.shape)} vs converted HF "
                    f"{tuple(value.shape)} (tp={tp}); is hf_config the config of these weights?"
                )
            param.copy_(value.to(dtype=param.dtype, device=param.device))
            n += 1
    return n


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _check_layer_count(names: Iterable[str], cfg: Any) -> None:
    """Refuse weights with more decoder layers than the config (they would be dropped silently:
    each rank reads only the layers its model has). Fewer layers fail on the first missing one."""
    layers = [int(m.group(1)) for n in names if (m := _LAYER_KEY.match(str(n)))]
    want = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    if layers and want and max(layers) >= want:
        raise ValueError(
            f"the weights hold {max(layers) + 1} decoder layers but the config has num_hidden_layers={want}; "
            "is hf_config the config of these weights?"
        )


def _check_model_matches(chunks: Sequence[Any], cfg: Any) -> None:
    """The model being filled must be the config's: as many layers, tied or not as it says (else a
    2-layer model takes 3 layers' weights, or a tied one an untied model's, without a word)."""
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers = getattr(getattr(model, "config", None), "num_layers", None)
        want = getattr(cfg, "num_hidden_layers", None)
        if layers is not None and want is not None and int(layers) != int(want):
            raise ValueError(f"the model has {layers} decoder layers but the weights' config has "
                             f"num_hidden_layers={want}; build the model from the config of these weights")
        shared = getattr(model, "share_embeddings_and_output_weights", None)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        if shared is not None and bool(shared) != tied:
            raise ValueError(f"the model {'ties' if shared else 'does not tie'} its embedding and output layer "
                             f"but the weights' config says tie_word_embeddings={tied}; build the model from "
                             "the config of these weights")


def _check_no_leftovers(names: Iterable[str], chunks: Sequence[Any], cfg: Any) -> None:
    """Refuse source tensors the model has no place for (Qwen3's q/k norms or Qwen2's q/k/v biases
    under a Llama config would be dropped silently). What a layer holds is read from this rank's
    layers (every pipeline stage has some); a tied checkpoint may still store lm_head.weight, and
    rotary inverse frequencies are recomputed, not loaded."""
    suffixes: set[str] = set()
    for chunk in chunks:
        for name, _ in unwrap_model(chunk).named_parameters():
            if m := _LAYER_RE.match(name):
                suffixes.update(n[len("model.layers.0."):] for n in hf_names_of(f"decoder.layers.0.{m.group(2)}", cfg))
    if not suffixes:
        return
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    left = []
    for n in map(str, names):
        if n in expected or n.endswith("rotary_emb.inv_freq"):
            continue
        m = _LAYER_KEY.match(n)
        if m is None or n[m.end():] not in suffixes:
            left.append(n)
    if left:
        raise ValueError(f"the weights hold {len(left)} tensor(s) this model has no place for, e.g. {sorted(left)[:4]}; "
                         "is the config (model_type, biases, norms) the one of these weights?")


# ------------------------------------------------------------------- Megatron -> HF
def _tp_gather(t: torch.Tensor, dim: int | None, tp: int, group: Any) -> list[torch.Tensor]:
    """TP shards of ``t`` from every TP rank (just [t] when replicated or tp == 1)."""
    if dim is None or tp == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(out, t, group=group)
    return out


def _hf_tensors_for(name: str, param: torch.Tensor, layer: int | None, cfg: Any, tp: int, group: Any):
    """Yield (hf_name, full tensor) for one megatron parameter, gathering TP shards."""
    yield from hf_tensors_from_shards(name, layer, cfg, lambda dim: _tp_gather(param, dim, tp, group))


def hf_tensors_from_shards(
    name: str, layer: int | None, cfg: Any, shards: Callable[[int | None], list[torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for one megatron parameter given its TP shards.

    ``shards(dim)`` returns the parameter's TP shards in TP-rank order (dim: the split dimension,
    None for a replicated tensor, for which one shard is enough). The export passes a collective
    gather; a checkpoint being resharded passes the shards it read from disk.
    """
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", torch.cat(shards(0), 0)
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", shards(None)[0]
        return
    if name == "output_layer.weight":
        yield "lm_head.weight", torch.cat(shards(0), 0)
        return
    suffix = _LAYER_RE.match(name).group(2)
    pre = f"model.layers.{layer}."
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = _qkv_from_megatron(torch.cat(shards(0), 0), cfg)
        yield pre + f"self_attn.q_proj.{kind}", q
        yield pre + f"self_attn.k_proj.{kind}", k
        yield pre + f"self_attn.v_proj.{kind}", v
        return
    if suffix == "mlp.linear_fc1.weight":
        halves = [s.chunk(2, dim=0) for s in shards(0)]
        yield pre + "mlp.gate_proj.weight", torch.cat([g for g, _ in halves], 0)
        yield pre + "mlp.up_proj.weight", torch.cat([u for _, u in halves], 0)
        return
    if suffix in _LAYER_SIMPLE:
        dim = _TP_DIM.get(suffix)
        parts = shards(dim)
        yield pre + _LAYER_SIMPLE[suffix], parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        return
    raise KeyError(f"no Hugging Face mapping for megatron parameter {name!r}")


def hf_names_of(name: str, cfg: Any) -> list[str]:
    """The Hugging Face tensors a global megatron parameter name (layers numbered in the whole
    model) holds, in the order :func:`hf_tensors_from_shards` yields them; a tied output layer
    holds none of its own."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    if name == "output_layer.weight":
        return [] if getattr(cfg, "tie_word_embeddings", False) else ["lm_head.weight"]
    m = _LAYER_RE.match(name)
    if m is None:
        raise KeyError(f"no Hugging Face mapping for megatron parameter {name!r}")
    pre, suffix = f"model.layers.{m.group(1)}.", m.group(2)
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return [pre + f"self_attn.{x}_proj.{kind}" for x in "qkv"]
    if suffix == "mlp.linear_fc1.weight":
        return [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"]
    if suffix in _LAYER_SIMPLE:
        return [pre + _LAYER_SIMPLE[suffix]]
    raise KeyError(f"no Hugging Face mapping for megatron parameter {name!r}")


def _local_items(chunks: Sequence[Any]) -> list[tuple[tuple[int, int, str], str, torch.Tensor, int | None]]:
    """(sort key, megatron name, param, global layer) for this PP rank's parameters, in HF order."""
    items = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            m = _LAYER_RE.match(name)
            if m:
                layer = _global_layer_index(model, int(m.group(1)))
                items.append(((1, layer, m.group(2)), name, param, layer))
            elif name.startswith("embedding."):
                items.append(((0, 0, name), name, param, None))
            elif name.startswith("decoder.final_layernorm"):
                items.append(((2, 0, name), name, param, None))
            elif name.startswith("output_layer."):
                items.append(((3, 0, name), name, param, None))
            else:
                raise KeyError(f"no Hugging Face mapping for megatron parameter {name!r}")
    items.sort(key=lambda it: it[0])
    return items


def export_hf_state_dict(
    model_chunks: Any | Sequence[Any],
    hf_config: Any,
    *,
    dtype: torch.dtype | None = None,
    include_tied_lm_head: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the full HF state dict, tensor by tensor, on EVERY rank (collective; see module doc).

    Peak extra memory is about one full tensor (plus its TP shards). Tensors stay on the model's
    device; ``dtype`` casts them (e.g. torch.bfloat16 for an engine). A yielded tensor may be the
    live parameter itself (replicated tensors such as norms, and at TP 1 the row-parallel weights
    too), also with a ``dtype`` equal to the model's own, since such a cast copies nothing: it
    changes at the next optimizer step, so copy what you keep. Abandoning the generator early
    on one rank deadlocks the others. With tied embeddings ``lm_head.weight`` is omitted
    unless ``include_tied_lm_head``.
    """
    from megatron.core import parallel_state as ps

    tp, _, tp_group = _tp()
    chunks = model_chunks if isinstance(model_chunks, list | tuple) else [model_chunks]
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    items = _local_items(chunks)
    if tied:  # a tied output layer on the last PP stage duplicates the embedding
        items = [it for it in items if it[1] != "output_layer.weight"]
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_group = ps.get_pipeline_model_parallel_group()
    keys = [it[0] for it in items]
    if pp > 1:
        all_keys: list[list] = [None] * pp  # type: ignore[list-item]
        dist.all_gather_object(all_keys, keys, group=pp_group)
    else:
        all_keys = [keys]
    order = sorted((k, owner) for owner, ks in enumerate(all_keys) for k in ks)
    mine = {it[0]: it for it in items}
    my_pp = ps.get_pipeline_model_parallel_rank() if pp > 1 else 0
    device = items[0][2].device if items else torch.device("cpu")

    def _stream() -> Iterator[tuple[str, torch.Tensor]]:
        for key, owner in order:
            if owner == my_pp:
                _, name, param, layer = mine[key]
                for hf_name, t in _hf_tensors_for(name, param.detach(), layer, hf_config, tp, tp_group):
                    if pp > 1:
                        meta = [(hf_name, tuple(t.shape), t.dtype)]
                        dist.broadcast_object_list(meta, group=pp_group, group_src=owner)
                        dist.broadcast(t.contiguous(), group=pp_group, group_src=owner)
                    yield hf_name, t
            else:
                for _ in range(_n_hf_tensors(key)):
                    meta = [None]
                    dist.broadcast_object_list(meta, group=pp_group, group_src=owner)
                    hf_name, shape, tdtype = meta[0]
                    t = torch.empty(shape, dtype=tdtype, device=device)
                    dist.broadcast(t, group=pp_group, group_src=owner)
                    yield hf_name, t

    embed = None
    for hf_name, t in _stream():
        t = t.detach() if dtype is None else t.detach().to(dtype)
        if tied and include_tied_lm_head and hf_name == "model.embed_tokens.weight":
            embed = t
        yield hf_name, t
    if tied and include_tied_lm_head and embed is not None:
        yield "lm_head.weight", embed


def _n_hf_tensors(key: tuple[int, int, str]) -> int:
    """How many HF tensors one megatron parameter expands to (qkv -> 3, fc1 -> 2, else 1)."""
    if (
        key[0] == 1
        and key[2].startswith("self_attention.linear_qkv.")
        and not key[2].endswith("layer_norm_weight")
    ):
        return 3
    if key[0] == 1 and key[2] == "mlp.linear_fc1.weight":
        return 2
    return 1


def export_hf_state_dict_to_cpu(
    model_chunks: Any | Sequence[Any], hf_config: Any, **kw: Any
) -> dict[str, torch.Tensor]:
    """The whole exported state dict as CPU tensors (small models and tests only: one full copy)."""
    return {k: v.cpu().clone() for k, v in export_hf_state_dict(model_chunks, hf_config, **kw)}


def save_hf_checkpoint(
    model_chunks: Any | Sequence[Any],
    hf_config: Any,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
    tokenizer: Any | None = None,
    generation_config: Any | None = None,
) -> None:
    """Write a Hugging Face folder (config.json + sharded safetensors + index, and the tokenizer and
    generation config when given) from rank 0, atomically (:func:`write_hf_folder`).

    Collective like :func:`export_hf_state_dict`; buffers at most ``max_shard_bytes`` of tensors.
    """
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    write_hf_folder(export_hf_state_dict(model_chunks, hf_config, dtype=dtype), hf_config, out_dir,
                    max_shard_bytes=max_shard_bytes, write=rank0, tokenizer=tokenizer,
                    generation_config=generation_config)


def _fsync_folder(folder: Path) -> None:
    """fsync every file of ``folder`` (one level) and the folder itself."""
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_hf_folder(final: Path) -> None:
    """Before writing ``final``: a crash between write_hf_folder's two renames left no ``final``
    but its previous copy as ``.NAME.old-*``, which is put back; folders of writes that never
    finished (``.NAME.tmp-*``) are removed."""
    import shutil

    parent = final.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{glob.escape(final.name)}.old-*"))  # a name may hold [ ] or *
    if olds and not final.exists() and (olds[-1] / "config.json").is_file():
        os.replace(olds[-1], final)
        logger.warning("restored %s from %s, left by an interrupted write", final, olds[-1].name)
        olds = olds[:-1]
    for debris in [*olds, *parent.glob(f".{glob.escape(final.name)}.tmp-*")]:
        shutil.rmtree(debris, ignore_errors=True)


def hf_output_refusal(out_dir: str | os.PathLike) -> str | None:
    """Why :func:`write_hf_folder` would refuse ``out_dir`` (a file, or a folder that is not empty and
    holds no config.json, which it never replaces), or None; for checking an output before the work
    that produces it."""
    final = Path(out_dir)
    if final.is_file() or (final.is_dir() and any(final.iterdir()) and not (final / "config.json").is_file()):
        return f"{final} exists and is not a model folder (no config.json): choose another folder"
    return None


def write_hf_folder(
    tensors: Iterable[tuple[str, torch.Tensor]],
    hf_config: Any,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    write: bool = True,
    tokenizer: Any | None = None,
    generation_config: Any | None = None,
) -> int:
    """Write ``(hf_name, tensor)`` pairs as a Hugging Face folder: config.json, safetensors files of
    at most ``max_shard_bytes`` each (the most this buffers), their index, and the tokenizer and
    generation_config.json (the source model's stop ids, hf_loading.load_generation_config) when
    given. ``write=False`` consumes the stream without writing (the other ranks of a collective
    export). Returns the number of tensors.

    Atomic: everything goes to a hidden sibling folder first, which then replaces ``out_dir``, so a
    crash leaves the previous folder or the new one, never a mix (a `run --resume` reuses an SFT
    folder that has a config.json). An existing ``out_dir`` that is not empty and holds no
    config.json is refused rather than replaced.
    """
    import shutil
    import uuid

    from safetensors.torch import save_file

    final = Path(out_dir)
    if write:
        _recover_hf_folder(final)
    out = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    refused = None
    if write and (why := hf_output_refusal(final)):
        # raised after the stream is consumed: in a collective export the other ranks are in it too
        refused = FileExistsError(why)
        write = False
    umask = os.umask(0)
    os.umask(umask)
    if write:
        out.mkdir(parents=True)
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    weight_map: dict[str, str] = {}
    files: list[str] = []
    n = 0
    written_dtype: torch.dtype | None = None

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        fname = f"model-{len(files) + 1:05d}.safetensors"
        if write:
            save_file(bucket, str(out / fname), metadata={"format": "pt"})
            os.chmod(out / fname, 0o666 & ~umask)  # safetensors creates its files 0600
        for k in bucket:
            weight_map[k] = fname
        files.append(fname)
        bucket, size = {}, 0

    try:
        for name, t in tensors:
            n += 1
            if not write:
                continue
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > max_shard_bytes:
                flush()
            bucket[name] = t.cpu().contiguous().clone()
            size += nbytes
            if written_dtype is None and t.is_floating_point():
                written_dtype = t.dtype
        flush()
        if refused is None and write:
            config = hf_config
            if written_dtype is not None and getattr(hf_config, "dtype", None) != written_dtype:
                # config.json names the dtype the weights are in ("auto" loaders, vLLM, follow it):
                # fp32 weights of a bf16 source must not be read back rounded to bf16
                config = copy.deepcopy(hf_config)
                config.dtype = written_dtype
            config.save_pretrained(out)
            total = sum(os.path.getsize(out / f) for f in files)
            with open(out / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out))
            if generation_config is not None:
                generation_config.save_pretrained(str(out))
            _fsync_folder(out)  # on disk before the folder takes the final name
    except BaseException:
        if write:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if refused is not None:
        raise refused
    if write:
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(out, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return n
