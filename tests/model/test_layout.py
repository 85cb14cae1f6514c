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


def test_rope_scaling_is_refused(tiny):
    from megatron_recycle.model.build import _rope_theta

    cfg = tiny.tiny_config("llama", tied=True)
    assert _rope_theta(cfg) == 5000.0
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(NotImplementedError, match=r"rope_type='yarn'"):
        _rope_theta(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_layer_spec_choice_on_cpu():
    assert resolve_layer_spec_name("auto") == "local"
    assert resolve_layer_spec_name("local") == "local"
    with pytest.raises(RuntimeError, match="transformer-engine and a CUDA device"):
        resolve_layer_spec_name("te")
    with pytest.raises(ValueError, match="layer_spec='fast'"):
        resolve_layer_spec_name("fast")
