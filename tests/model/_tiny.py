"""Tiny random Hugging Face models of each supported family, identical in every process."""

from __future__ import annotations

from typing import Any

import torch
import transformers

VOCAB = 128


def tiny_config(kind: str, tied: bool, layers: int = 2) -> Any:
    """A small config: GQA (4 heads, 2 KV groups), so TP=2 splits heads and groups evenly."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    )
    if kind == "qwen3":
        return transformers.Qwen3Config(head_dim=24, **common)  # head_dim != hidden/heads on purpose
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "llama3_rope":
        # Llama 3.x RoPE scaling, its thresholds moved into the tiny model's range: with head_dim
        # 16 and theta 5000 the wavelengths are 6.3, 18.7, 56, ... so one frequency is kept, one
        # blended (between 32/4 and 32/1) and six divided by the factor.
        scaling = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=32)
        return transformers.LlamaConfig(rope_scaling=scaling, **common)
    if kind == "llama_linear_rope":
        return transformers.LlamaConfig(rope_scaling=dict(rope_type="linear", factor=2.5), **common)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_hf_model(kind: str, tied: bool, layers: int = 2, seed: int = 0) -> Any:
    """Random weights; norms and biases perturbed away from 1/0 so a mix-up would show."""
    cfg = tiny_config(kind, tied, layers)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def tiny_inputs(batch: int = 2, seq: int = 12, seed: int = 0, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [b, s], position ids [b, s]), drawn on the CPU (the same ids everywhere) and
    placed on ``device`` (the Megatron model's: the GPU when there is one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    pos = torch.arange(seq)[None].expand(batch, seq)
    return ids.to(device), pos.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a Megatron model chunk's weights live (build_model_chunks puts them on the GPU when
    there is one; the Hugging Face reference models of these tests stay on the CPU)."""
    return next(model.parameters()).device
