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


def _rope_theta(hf_config: Any) -> float:
    """RoPE base from either transformers 5 ``rope_parameters`` or the older ``rope_theta``."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy_scaling, dict):
        rope_type = legacy_scaling.get("rope_type", legacy_scaling.get("type", rope_type))
    if rope_type not in (None, "default"):
        raise NotImplementedError(
            f"rope_type={rope_type!r} is not supported (only plain RoPE); "
            "use a model without rope scaling or add the scaling to build.py"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"config of model_type={hf_config.model_type!r} has no rope_theta")
    return float(theta)


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
    return model_type


def head_dim(hf_config: Any) -> int:
    """Per-head size: ``head_dim`` when the config sets it (Qwen3), else hidden/heads."""
    hd = getattr(hf_config, "head_dim", None)
    return int(hd) if hd else hf_config.hidden_size // hf_config.num_attention_heads


def has_qkv_bias(hf_config: Any) -> bool:
    """Qwen2 always has q/k/v biases; Llama and Qwen3 only with ``attention_bias=True``."""
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
    passed to TransformerConfig last (e.g. ``recompute_granularity``).
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
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec_for(hf_config: Any, layer_spec: str = "auto") -> Any:
    """Megatron ModuleSpec for one transformer layer: local (CPU-safe) or transformer-engine."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    name = resolve_layer_spec_name(layer_spec)
    if name == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=has_qk_norm(hf_config))
    from megatron_recycle.model.attention import use_sdpa_core_attention

    spec = get_gpt_layer_local_spec(qk_layernorm=has_qk_norm(hf_config), normalization="RMSNorm")
    return use_sdpa_core_attention(spec)


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
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec_for(hf_config, layer_spec),
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
