"""Build a megatron-core GPTModel from a Hugging Face config (Llama/SmolLM2, Qwen2, Qwen3).

The model's definition lives here; how weights move in and out (with TP/PP sharding) lives in
``convert.py``. Call :func:`megatron_recycle.model.parallel.init_distributed` first: the
tensor/pipeline sizes come from megatron's parallel_state.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


# RoPE scalings whose effect is a fixed change of the inverse frequencies (no dependence on the
# sequence length, no attention scale): what the Megatron model and the native engine can take.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The RoPE settings of a config: transformers 5's ``rope_parameters``, else the older
    ``rope_scaling`` dict plus ``rope_theta``. ``rope_type`` is always set ('default' if none)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy_scaling, dict):
        params = {**legacy_scaling, **params} if params else dict(legacy_scaling)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    params["rope_type"] = rope_type
    if "rope_theta" not in params and getattr(hf_config, "rope_theta", None) is not None:
        params["rope_theta"] = hf_config.rope_theta
    return params


def _rope_theta(hf_config: Any) -> float:
    """RoPE base; refuses a RoPE scaling this code does not implement (see SUPPORTED_ROPE_TYPES)."""
    params = _rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "use a model without that rope scaling or add it to build.rope_inv_freq"
        )
    theta = params.get("rope_theta")
    if theta is None:
        raise ValueError(f"config of model_type={hf_config.model_type!r} has no rope_theta")
    return float(theta)


def rope_scaled(hf_config: Any) -> bool:
    """True when the config's RoPE frequencies are scaled (rope_type 'linear' or 'llama3')."""
    _rope_theta(hf_config)
    return _rope_parameters(hf_config)["rope_type"] != "default"


def _rope_number(params: dict[str, Any], key: str, rope_type: str) -> float:
    value = params.get(key)
    if value is None:
        raise ValueError(f"rope_type={rope_type!r} needs {key!r} in the config's rope parameters")
    value = float(value)
    if not value > 0:
        raise ValueError(f"rope parameter {key}={value} must be > 0")
    return value


def rope_inv_freq(hf_config: Any, dim: int | None = None) -> torch.Tensor:
    """RoPE inverse frequencies [dim / 2] in float64, with the config's scaling applied.

    'default': ``theta ** (-2i / dim)``. 'linear': divided by ``factor`` (positions interpolated).
    'llama3' (Llama 3.1-3.3): wavelengths shorter than ``original_max_position_embeddings /
    high_freq_factor`` unchanged, longer than ``original_max_position_embeddings /
    low_freq_factor`` divided by ``factor``, a linear blend in 1 / wavelength between the two.
    """
    theta = _rope_theta(hf_config)
    params = _rope_parameters(hf_config)
    rope_type = params["rope_type"]
    dim = int(dim or head_dim(hf_config))
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope_type == "default":
        return inv
    factor = _rope_number(params, "factor", rope_type)
    if rope_type == "linear":
        return inv / factor
    low = _rope_number(params, "low_freq_factor", rope_type)
    high = _rope_number(params, "high_freq_factor", rope_type)
    old_len = _rope_number(params, "original_max_position_embeddings", rope_type)
    if not high > low:
        raise ValueError(f"rope_type='llama3' needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    wavelen = 2 * torch.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / low, inv / factor, blended)
    return torch.where(wavelen < old_len / high, inv, out)


def _apply_rope_scaling(model: Any, hf_config: Any) -> None:
    """megatron-core's RotaryEmbedding computes plain inverse frequencies (its own llama3 option
    fixes every parameter but the factor); a scaled config's are set here, before any forward
    (its tables are cached per length)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or not rope_scaled(hf_config):
        return
    old = rope.inv_freq
    rope.inv_freq = rope_inv_freq(hf_config, 2 * old.numel()).to(dtype=old.dtype, device=old.device)


def _check_supported(hf_config: Any) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if getattr(hf_config, "use_sliding_window", False):
        raise NotImplementedError("sliding-window attention (use_sliding_window=True) is not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError("mlp_bias=True is not supported")
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False):
        # transformers then gives o_proj a bias too, which Megatron's linear_proj only has together
        # with biases on every linear layer (add_bias_linear): it would be dropped silently
        raise NotImplementedError(f"attention_bias=True is not supported for {model_type} (o_proj has a bias)")
    _rope_theta(hf_config)  # an unsupported RoPE scaling is refused here, before any process group
    return model_type


def head_dim(hf_config: Any) -> int:
    """Per-head size: ``head_dim`` when the config sets it (Qwen3), else hidden/heads."""
    hd = getattr(hf_config, "head_dim", None)
    return int(hd) if hd else hf_config.hidden_size // hf_config.num_attention_heads


def has_qkv_bias(hf_config: Any) -> bool:
    """Qwen2 always has q/k/v biases (and none on o_proj); Llama and Qwen3 with ``attention_bias=True``
    are refused by _check_supported (their o_proj has a bias too)."""
    if hf_config.model_type == "qwen2":
        return True
    return bool(getattr(hf_config, "attention_bias", False))


def has_qk_norm(hf_config: Any) -> bool:
    """Qwen3 normalizes queries and keys per head (RMSNorm over head_dim)."""
    return hf_config.model_type == "qwen3"


def te_available() -> bool:
    """True when transformer-engine is importable and CUDA is present (the TE spec can run)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_layer_spec_name(layer_spec: str = "auto") -> str:
    """'auto' -> 'te' when transformer-engine and CUDA are present, else 'local'."""
    if layer_spec == "auto":
        return "te" if te_available() else "local"
    if layer_spec not in ("local", "te"):
        raise ValueError(f"layer_spec={layer_spec!r}; use 'auto', 'local' or 'te'")
    if layer_spec == "te" and not te_available():
        raise RuntimeError(
            "layer_spec='te' needs transformer-engine and a CUDA device; "
            "install the [gpu] extra on a GPU machine or use layer_spec='local'"
        )
    return layer_spec


RECOMPUTE_MODES = ("none", "selective", "full")


def memory_options(
    recompute: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    sequence_parallel: bool = False,
) -> dict[str, Any]:
    """TransformerConfig fields for activation recomputation and sequence parallelism (the config
    keys ``model.recompute*`` and ``model.sequence_parallel``), checked.

    selective recomputes megatron's core attention only (``recompute_modules=["core_attn"]``): it
    drops the attention scores, the largest activation of the local attention. full recomputes
    whole layers, ``recompute_method`` uniform (groups of ``recompute_num_layers``) or block (the
    first ``recompute_num_layers`` of each stage). :func:`transformer_config_from_hf` checks the
    layer counts against the model's stages.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; use one of {', '.join(RECOMPUTE_MODES)}")
    out: dict[str, Any] = {"sequence_parallel": bool(sequence_parallel)}
    if recompute == "selective":
        out.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif recompute == "full":
        if recompute_method not in ("uniform", "block"):
            raise ValueError(f"recompute_method={recompute_method!r}; use 'uniform' or 'block'")
        if int(recompute_num_layers) < 1:
            raise ValueError(f"recompute_num_layers={recompute_num_layers} must be >= 1")
        out.update(recompute_granularity="full", recompute_method=recompute_method,
                   recompute_num_layers=int(recompute_num_layers))
    return out


def describe_memory_options(config: Any) -> str:
    """What a built model's TransformerConfig recomputes and whether it is sequence parallel, in
    words ("" when neither): printed by the trainer from the model itself."""
    parts = []
    granularity = getattr(config, "recompute_granularity", None)
    if granularity == "selective":
        parts.append(f"selective recomputation ({', '.join(config.recompute_modules or ['core_attn'])})")
    elif granularity == "full":
        n = config.recompute_num_layers
        layers = f"{n} layer{'s' if n != 1 else ''}"
        unit = f"{layers} per unit" if config.recompute_method == "uniform" else f"the first {layers} of each stage"
        parts.append(f"full recomputation ({config.recompute_method}, {unit})")
    if getattr(config, "sequence_parallel", False):
        parts.append("sequence parallel")
    return ", ".join(parts)


def check_memory_options(options: dict[str, Any], num_layers: int, tp: int, pp: int, vpp: int | None) -> None:
    """ValueError when :func:`memory_options`' fields do not fit the layout: sequence parallelism
    without tensor parallelism, a full-recompute layer count that exceeds (block) or does not divide
    (uniform) the layers of each (virtual) pipeline stage."""
    if options.get("sequence_parallel") and tp == 1:
        raise ValueError("sequence_parallel splits the sequence over the tensor-parallel ranks: it needs tp > 1")
    if options.get("recompute_granularity") == "full":
        per_stage = num_layers // (pp * (vpp or 1))
        n = options.get("recompute_num_layers") or 1
        if n > per_stage:
            raise ValueError(
                f"recompute_num_layers={n} exceeds the {per_stage} layers of each (virtual) pipeline stage "
                f"({num_layers} layers / (pp={pp} x vpp={vpp or 1}))"
            )
        if options.get("recompute_method") == "uniform" and per_stage % n:
            raise ValueError(
                f"recompute_method=uniform needs recompute_num_layers={n} to divide the {per_stage} layers of "
                f"each (virtual) pipeline stage; use a divisor or recompute_method=block"
            )


def transformer_config_from_hf(
    hf_config: Any,
    *,
    bf16: bool = False,
    tp: int | None = None,
    pp: int | None = None,
    vpp: int | None = None,
    **overrides: Any,
) -> Any:
    """Translate a HF Llama/Qwen2/Qwen3 config into a megatron TransformerConfig.

    Dropout is 0 (RL log-probs must be deterministic) and CPU-unsafe fusions are off. tp/pp/vpp
    default to megatron's parallel_state when it is initialized, else 1. ``overrides`` are
    passed to TransformerConfig last (e.g. :func:`memory_options`' recomputation and sequence
    parallelism fields, checked against the layout here).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    _check_supported(hf_config)
    if ps.model_parallel_is_initialized():
        tp = tp or ps.get_tensor_model_parallel_world_size()
        pp = pp or ps.get_pipeline_model_parallel_world_size()
        vpp = vpp or ps.get_virtual_pipeline_model_parallel_world_size()
    tp, pp = tp or 1, pp or 1
    from megatron_recycle.model.parallel import validate_layout

    validate_layout(tp, pp, vpp, model_config=hf_config)
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf_config),
        qk_layernorm=has_qk_norm(hf_config),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if (vpp or 1) > 1 else None,
        sequence_parallel=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not cuda,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        cross_entropy_loss_fusion=False,
    )
    if overrides.get("window_size") is not None:
        # megatron's own attention would apply it, but the attention this package swaps in
        # (model/attention.py: packed groups, SDPA) does not: the model would silently differ
        raise ValueError("window_size (sliding-window attention) is not supported by this package's attention")
    kwargs.update(overrides)
    check_memory_options(kwargs, kwargs["num_layers"], tp, pp, vpp)
    return TransformerConfig(**kwargs)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local spec under sequence parallelism (megatron's torch norm wrapper
    refuses it). Its input is this rank's part of the sequence, so each rank's weight gradient is a
    partial sum: the weight is marked ``sequence_parallel`` and megatron's finalize_model_grads sums
    it over the tensor-parallel group, as it does for transformer-engine's norms."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


class HeadRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the per-head query/key norms (Qwen3) under sequence parallelism: they see
    the whole sequence (after the QKV projection's gather); megatron sums their gradients over the
    tensor-parallel group by name (q_layernorm / k_layernorm)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(normalized_shape=hidden_size, eps=eps)


def layer_spec_for(hf_config: Any, layer_spec: str = "auto", sequence_parallel: bool = False) -> Any:
    """Megatron ModuleSpec for one transformer layer: local (CPU-safe) or transformer-engine.

    ``sequence_parallel`` with the local spec swaps megatron's torch norms for
    :class:`SequenceParallelRMSNorm` / :class:`HeadRMSNorm` (the same RMSNorm, parameters and names).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    name = resolve_layer_spec_name(layer_spec)
    if name == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=has_qk_norm(hf_config))
    from megatron_recycle.model.attention import use_sdpa_core_attention

    spec = get_gpt_layer_local_spec(qk_layernorm=has_qk_norm(hf_config), normalization="RMSNorm")
    spec = use_sdpa_core_attention(spec)
    if sequence_parallel:
        from megatron.core.transformer.identity_op import IdentityOp

        sub = spec.submodules
        sub.input_layernorm = SequenceParallelRMSNorm
        sub.pre_mlp_layernorm = SequenceParallelRMSNorm
        attn = sub.self_attention.submodules
        for field in ("q_layernorm", "k_layernorm"):
            if getattr(attn, field, IdentityOp) is not IdentityOp:
                setattr(attn, field, HeadRMSNorm)
    return spec


def _block_spec(layer: Any, config: Any, vp_stage: int | None) -> Any:
    """The decoder spec GPTModel gets. With the local spec, a TransformerBlockSubmodules whose final
    norm is the layers' own norm class (megatron's torch RMSNorm, or :class:`SequenceParallelRMSNorm`
    under sequence parallelism): given a bare layer spec, megatron takes the final norm from
    whatever fused library imports (TENorm with transformer-engine, apex's FusedLayerNorm, which
    refuses RMSNorm, with apex alone). The transformer-engine spec is passed as it is."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    norm = layer.submodules.input_layernorm
    if norm not in (WrappedTorchNorm, SequenceParallelRMSNorm):
        return layer
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm)


def build_gpt_model(
    hf_config: Any,
    *,
    pre_process: bool,
    post_process: bool,
    bf16: bool = False,
    layer_spec: str = "auto",
    vp_stage: int | None = None,
    config: Any | None = None,
) -> Any:
    """One GPTModel chunk (this rank's pipeline stage, or virtual stage ``vp_stage``).

    Parameters are fp32 unless bf16 (then wrap with Float16Module, see
    :func:`build_model_chunks`). Vocabulary logits stay TP-sharded (``parallel_output=True``).
    """
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config_from_hf(hf_config, bf16=bf16)
    layer = layer_spec_for(hf_config, layer_spec, sequence_parallel=config.sequence_parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_block_spec(layer, config, vp_stage),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=_rope_theta(hf_config),
        vp_stage=vp_stage,
    )
    _apply_rope_scaling(model, hf_config)
    return model


def build_model_chunks(
    hf_config: Any,
    *,
    bf16: bool = False,
    layer_spec: str = "auto",
    wrap_float16: bool = True,
    **config_overrides: Any,
) -> list[Any]:
    """All model chunks this rank owns (one per virtual pipeline stage), like megatron's get_model.

    With ``bf16`` and ``wrap_float16`` each chunk is wrapped in megatron's Float16Module
    (bf16 parameters, fp32 outputs); the optimizer keeps fp32 main weights. Not wrapped in DDP:
    the trainer does that with its own DistributedDataParallelConfig.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    config = transformer_config_from_hf(hf_config, bf16=bf16, **config_overrides)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else None
    pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if "variable_seq_lengths" not in config_overrides:
        # Pipeline stages exchange micro-batches of different shapes (the step's length-grouped
        # micro-batches): each send is preceded by its shape. Not with virtual stages, whose
        # interleaved schedule keeps one fixed shape (its p2p pattern on gloo is PLATFORM.md's).
        config.variable_seq_lengths = pp > 1 and not vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        vs = vp_stage if vpp else None
        chunk = build_gpt_model(
            hf_config,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vs),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vs),
            bf16=bf16,
            layer_spec=layer_spec,
            vp_stage=vs,
            config=config,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if bf16 and wrap_float16:
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    return chunks


def unwrap_model(module: Any) -> Any:
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``) down to the GPTModel."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module
