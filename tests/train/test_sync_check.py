"""runtime.check_engine_sync: a rank whose engine differs from the trainer still takes part in
every collective (export, trainer forward, its vLLM group's generation) and every rank raises,
so none is left waiting in a collective until the timeout."""

from __future__ import annotations

import types

import pytest
import torch

import megatron_recycle.model.convert as convert
import megatron_recycle.model.parallel as parallel
import megatron_recycle.train.step as step
from megatron_recycle.config import Config
from megatron_recycle.engines.vllm import WeightMismatchError
from megatron_recycle.train import runtime as rtm


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return types.SimpleNamespace(input_ids=list(range(1, 7)))


class _Engine:
    def __init__(self, weights_error: bool = False, shift: float = 0.0):
        self.weights_error, self.shift, self.calls = weights_error, shift, []
        self.last_check_skipped: list[str] = []

    def check_weights(self, stream):
        self.calls.append("check_weights")
        n = sum(1 for _ in stream)
        if self.weights_error:
            raise WeightMismatchError("engine weights differ (test)")
        return {f"t{i}": 0.0 for i in range(n)}

    def sequence_logprobs(self, ids):
        self.calls.append("sequence_logprobs")
        return [-1.0 + self.shift] * (len(ids) - 1)


@pytest.fixture
def collectives(monkeypatch):
    seen = {"export": 0, "forward": 0, "agree": []}
    others = {"failed": 0}

    def export(chunks, hf_config):
        seen["export"] += 1
        yield from (("a", torch.zeros(2)), ("b", torch.zeros(2)))

    def forward(chunks, batch, micro_batch_size, pack_groups):
        seen["forward"] += 1
        return torch.full((1, batch.tokens.shape[1]), -1.0)

    def agree(value):
        seen["agree"].append(value)
        return max(value, others["failed"])

    monkeypatch.setattr(convert, "export_hf_state_dict", export)
    monkeypatch.setattr(step, "compute_logprobs", forward)
    monkeypatch.setattr(parallel, "max_over_world", agree)
    return seen, others


def _rt(engine):
    return types.SimpleNamespace(chunks=None, hf_config=None, tokenizer=_Tok(), cfg=Config(), engine=engine)


def test_a_matching_engine_passes(collectives):
    seen, _ = collectives
    rtm.check_engine_sync(_rt(_Engine()))
    assert seen == {"export": 1, "forward": 1, "agree": [0]}


def test_a_weight_mismatch_still_joins_the_forward_and_generation_then_raises(collectives):
    seen, _ = collectives
    engine = _Engine(weights_error=True)
    with pytest.raises(WeightMismatchError, match="engine weights differ"):
        rtm.check_engine_sync(_rt(engine))
    assert engine.calls == ["check_weights", "sequence_logprobs"]  # its vLLM group's peers generate too
    assert seen == {"export": 1, "forward": 1, "agree": [1]}


def test_a_log_prob_gap_raises(collectives):
    seen, _ = collectives
    with pytest.raises(WeightMismatchError, match="log-probs differ"):
        rtm.check_engine_sync(_rt(_Engine(shift=0.5)))
    assert seen["agree"] == [1]


@pytest.mark.parametrize("engine", [None, _Engine()])
def test_a_failure_on_another_rank_raises_here_too(collectives, engine):
    seen, others = collectives
    others["failed"] = 1
    with pytest.raises(WeightMismatchError, match="failed on another rank"):
        rtm.check_engine_sync(_rt(engine))
    assert seen["export"] == seen["forward"] == 1 and seen["agree"] == [0]
