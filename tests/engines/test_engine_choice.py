"""rollout.engine: auto resolves to the native engine when the model is whole in each process."""

from __future__ import annotations

import pytest

from megatron_recycle.config import ConfigError, load_config
from megatron_recycle.train.runtime import engine_kind


def test_auto_picks_native_only_without_model_parallelism():
    assert load_config(None).rollout.engine == "auto"
    assert engine_kind(load_config(None)) == "native"
    assert engine_kind(load_config(None, ["model.tp=2"])) == "hf"
    assert engine_kind(load_config(None, ["model.pp=2"])) == "hf"
    assert engine_kind(load_config(None, ["rollout.engine=hf"])) == "hf"
    assert engine_kind(load_config(None, ["rollout.engine=native"])) == "native"


def test_native_with_model_parallelism_is_a_config_error():
    with pytest.raises(ConfigError, match="native engine decodes with the trainer's whole model"):
        load_config(None, ["rollout.engine=native", "model.tp=2"])


def test_embedded_recipe_uses_native_and_group_packing():
    cfg = load_config("recipes/embedded_cpu.yaml")
    assert engine_kind(cfg) == "native" and cfg.optim.pack_groups
