"""The megatron-core model layer: GPTModel from a Hugging Face config, weight conversion both ways
with TP/PP sharding, distributed set-up and the CPU/gloo compatibility patches.

Modules: ``build`` (what the model is), ``convert`` (HF <-> Megatron weights), ``parallel``
(torch.distributed + parallel_state), ``compat`` (CPU patches), ``hf_loading`` (offline HF
models, the packaged SmolLM2). megatron-core itself is imported lazily, inside the functions.
"""

from megatron_recycle.model.build import (
    build_gpt_model,
    build_model_chunks,
    transformer_config_from_hf,
    unwrap_model,
)
from megatron_recycle.model.compat import apply_cpu_compat
from megatron_recycle.model.convert import (
    export_hf_state_dict,
    load_hf_weights,
    save_hf_checkpoint,
)
from megatron_recycle.model.hf_loading import (
    load_hf_config,
    load_hf_model,
    load_tokenizer,
    smollm2_gguf_path,
)
from megatron_recycle.model.parallel import (
    ParallelLayout,
    destroy_distributed,
    init_distributed,
    validate_layout,
)

__all__ = [
    "ParallelLayout",
    "apply_cpu_compat",
    "build_gpt_model",
    "build_model_chunks",
    "destroy_distributed",
    "export_hf_state_dict",
    "init_distributed",
    "load_hf_config",
    "load_hf_model",
    "load_hf_weights",
    "load_tokenizer",
    "save_hf_checkpoint",
    "smollm2_gguf_path",
    "transformer_config_from_hf",
    "unwrap_model",
    "validate_layout",
]
