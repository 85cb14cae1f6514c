"""Layout validation, config translation and layer-spec choice (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from megatron_recycle.model.build import (
    head_dim,
    resolve_layer_spec_name,
    transformer_config_from_hf,
)
from megatron_recycle.model.parallel import validate_layout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tp=3), r"num_attention_heads=4 is not divisible by tp=3"),
        (dict(tp=4), r"num_key_value_heads \(query groups\)=2 is not divisible by tp=4"),
        (dict(pp=3), r"num_layers=2 is not divisible by pp\*vpp = 3\*1 = 3"),
        (dict(pp=2, vpp=2), r"num_layers=2 is not divisible by pp\*vpp = 2\*2 = 4"),
        (dict(pp=1, vpp=2), r"need pp >= 2"),
        (dict(tp=2, pp=2, world_size=6), r"world size 6 is not divisible by tp\*pp = 2\*2 = 4"),
        (dict(tp=0), r"tp=0 must be a positive integer"),
    ],
)
def test_bad_layout_names_the_problem(tiny, kwargs, match):
    cfg = tiny.tiny_config("qwen3", tied=True, layers=2)
    with pytest.raises(ValueError, match=match):
        validate_layout(model_config=cfg, **kwargs)


def test_good_layouts_pass(tiny):
    cfg = tiny.tiny_config("qwen3", tied=True, layers=4)
    for tp, pp, vpp, world in [(1, 1, None, 1), (2, 1, None, 2), (2, 2, None, 8), (1, 2, 2, 2), (2, 2, 2, 4)]:
        validate_layout(tp, pp, vpp, world, cfg)


def test_vocab_and_ffn_must_divide_tp(tiny):
    cfg = tiny.tiny_config("llama", tied=True)
    cfg.vocab_size = 129
    with pytest.raises(ValueError, match=r"vocab_size=129 is not divisible by tp=2"):
        validate_layout(tp=2, model_config=cfg)
    cfg = tiny.tiny_config("llama", tied=True)
    cfg.intermediate_size = 95
    with pytest.raises(ValueError, match=r"FFN\) size 95 is not divisible by tp=2"):
        validate_layout(tp=2, model_config=cfg)


def test_transformer_config_per_family(tiny):
    q3 = transformer_config_from_hf(tiny.tiny_config("qwen3", tied=False), tp=1, pp=1)
    assert q3.qk_layernorm and not q3.add_qkv_bias
    assert q3.kv_channels == 24 and q3.num_query_groups == 2 and q3.num_attention_heads == 4
    q2 = transformer_config_from_hf(tiny.tiny_config("qwen2", tied=False), tp=1, pp=1)
    assert q2.add_qkv_bias and not q2.qk_layernorm
    ll = transformer_config_from_hf(tiny.tiny_config("llama", tied=True), tp=1, pp=1, bf16=True)
    assert ll.kv_channels == head_dim(tiny.tiny_config("llama", tied=True)) == 16
    assert ll.bf16 and ll.params_dtype == torch.bfloat16
    assert ll.normalization == "RMSNorm" and ll.gated_linear_unit and not ll.add_bias_linear
    assert ll.hidden_dropout == 0.0 and ll.attention_dropout == 0.0
    assert ll.layernorm_epsilon == pytest.approx(1e-5)


def test_unsupported_models_fail_clearly(tiny):
    import transformers

    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported"):
        transformer_config_from_hf(transformers.GPT2Config(), tp=1, pp=1)
    cfg = tiny.tiny_config("llama", tied=True)
    cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
        transformer_config_from_hf(cfg, tp=1, pp=1)
    # Llama / Qwen3 with attention_bias: o_proj has a bias Megatron's linear_proj cannot hold alone
    for kind in ("llama", "qwen3"):
        cfg = tiny.tiny_config(kind, tied=True)
        cfg.attention_bias = True
        with pytest.raises(NotImplementedError, match=rf"attention_bias=True is not supported for {kind}"):
            transformer_config_from_hf(cfg, tp=1, pp=1)
    qwen2 = tiny.tiny_config("qwen2", tied=True)  # q/k/v biases only: supported
    transformer_config_from_hf(qwen2, tp=1, pp=1)


def test_unsupported_rope_scalings_are_refused(tiny):
    from megatron_recycle.model.build import _rope_theta

    cfg = tiny.tiny_config("llama", tied=True)
    assert _rope_theta(cfg) == 5000.0
    for rope_type in ("yarn", "dynamic", "longrope"):
        cfg.rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
        with pytest.raises(NotImplementedError, match=rf"rope_type='{rope_type}' is not supported"):
            transformer_config_from_hf(cfg, tp=1, pp=1)


def test_a_sliding_window_override_is_refused(tiny):
    """megatron's attention would apply it; the package's packed/SDPA attention would not."""
    with pytest.raises(ValueError, match="window_size .* is not supported"):
        transformer_config_from_hf(tiny.tiny_config("llama", tied=True), tp=1, pp=1, window_size=(4, 0))


@pytest.mark.parametrize("kind", ["llama", "llama3_rope", "llama_linear_rope", "qwen3"])
def test_rope_inv_freq_matches_transformers(tiny, kind):
    """Our float64 inverse frequencies against transformers' own (float32) for each RoPE type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_recycle.model.build import head_dim, rope_inv_freq, rope_scaled

    cfg = tiny.tiny_config(kind, tied=True)
    got = rope_inv_freq(cfg)
    assert got.dtype == torch.float64 and got.shape == (head_dim(cfg) // 2,)
    plain = 1.0 / (5000.0 ** (torch.arange(0, head_dim(cfg), 2, dtype=torch.float64) / head_dim(cfg)))
    if kind in ("llama", "qwen3"):
        assert not rope_scaled(cfg) and torch.equal(got, plain)
        return
    want, attention_scale = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")
    assert attention_scale == 1.0  # what makes these types a change of frequencies only
    assert rope_scaled(cfg)
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)
    if kind == "llama3_rope":  # the three regimes all occur in the tiny model (see _tiny.py)
        ratio = plain / got
        assert ratio[0] == 1.0 and 1.0 < ratio[1] < 4.0 and torch.allclose(ratio[2:], torch.tensor(4.0, dtype=torch.float64))
    else:
        assert torch.allclose(plain / got, torch.tensor(2.5, dtype=torch.float64))


def test_bad_rope_parameters_are_clear_errors(tiny):
    from megatron_recycle.model.build import rope_inv_freq

    cfg = tiny.tiny_config("llama3_rope", tied=True)
    params = dict(cfg.rope_parameters)
    cfg.rope_parameters = {k: v for k, v in params.items() if k != "original_max_position_embeddings"}
    with pytest.raises(ValueError, match=r"rope_type='llama3' needs 'original_max_position_embeddings'"):
        rope_inv_freq(cfg)
    cfg.rope_parameters = {**params, "high_freq_factor": 1.0}
    with pytest.raises(ValueError, match=r"high_freq_factor > low_freq_factor"):
        rope_inv_freq(cfg)
    cfg.rope_parameters = {**params, "factor": 0.0}
    with pytest.raises(ValueError, match=r"factor=0.0 must be > 0"):
        rope_inv_freq(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_layer_spec_choice_on_cpu():
    assert resolve_layer_spec_name("auto") == "local"
    assert resolve_layer_spec_name("local") == "local"
    with pytest.raises(RuntimeError, match="transformer-engine and a CUDA device"):
        resolve_layer_spec_name("te")
    with pytest.raises(ValueError, match="layer_spec='fast'"):
        resolve_layer_spec_name("fast")


def test_llama3p2_preset_rope_matches_transformers():
    """tools/bench_step.py's Llama-3.2-3B shape (the published RoPE scaling: factor 32 over 8,192
    positions, theta 5e5, head_dim 128): frequencies as transformers computes them, and its layout
    (24 heads, 8 groups) splits over the llama3p2_3b recipe's TP 2."""
    import importlib.util
    from pathlib import Path

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_recycle.model.build import rope_inv_freq

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_step.py"
    spec = importlib.util.spec_from_file_location("bench_step_presets", path)
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    cfg = bench_step.model_config("llama3.2-3b")
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(cfg)
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)
    ratio = (1.0 / (5e5 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))) / got
    kept, divided = ratio == 1.0, torch.isclose(ratio, torch.tensor(32.0, dtype=torch.float64))
    assert kept.sum() > 0 and divided.sum() > 0 and (~kept & ~divided).sum() > 0  # all three regimes
    tc = transformer_config_from_hf(cfg, tp=2, pp=1)
    assert tc.num_attention_heads == 24 and tc.num_query_groups == 8 and tc.kv_channels == 128


def test_restarts_with_the_shared_agent_store_are_recognised(monkeypatch):
    from megatron_recycle.model.parallel import elastic_restart_count, restarts_share_the_agent_store

    for key in ("TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert not restarts_share_the_agent_store() and elastic_restart_count() == 0
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert restarts_share_the_agent_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert not restarts_share_the_agent_store()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert elastic_restart_count() == 3
