"""grpo.group_advantages: the signal flags the pool consumes and the advantages the step trains
on come from one rule, so a group marked signal-bearing (and used up) never trains with zero
advantages, whatever loss.unbiased_std and loss.norm_adv_by_std say."""

from __future__ import annotations

import pytest
import torch

from megatron_recycle.config import Config
from megatron_recycle.train.grpo import group_advantages


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("norm", [True, False])
def test_signal_flags_and_advantages_agree(unbiased, norm):
    cfg = Config()
    cfg.loss.unbiased_std, cfg.loss.norm_adv_by_std = unbiased, norm
    # spreads around the estimators' thresholds (continuous rewards such as F1), then clear ones
    spreads = [0.0, 1e-7, 1e-6, 1.5e-6, 2e-6, 2.2e-6, 2.5e-6, 3e-6, 5e-6, 1e-5, 0.5, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 0.0, s] for s in spreads])
    adv, signal = group_advantages(rewards, cfg)
    assert adv.shape == rewards.shape and signal.shape == (len(spreads),)
    assert signal.tolist() == (adv != 0).any(dim=1).tolist()
    assert not signal[0] and signal[-1]


def test_the_std_estimator_moves_the_threshold():
    """The case that used to differ: flags by the unbiased std, advantages by the biased one."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.2e-6]])
    biased, unbiased = Config(), Config()
    biased.loss.unbiased_std = False
    assert group_advantages(rewards, biased)[1].tolist() != group_advantages(rewards, unbiased)[1].tolist()


def test_rollout_seeds_are_distinct_over_steps_batches_and_replicas():
    """A linear mix (step*1009 + gen_batch*31 + dp_rank) gave two replicas the same seed once DP
    reached 32 with dapo's extra generation batches; the seed is also a pure function of its inputs."""
    from megatron_recycle.train.grpo import rollout_seed

    seeds = {(st, gb, r): rollout_seed(0, st, gb, r) for st in range(40) for gb in range(3) for r in range(64)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds.values())
    assert rollout_seed(0, 5, 1, 7) == seeds[(5, 1, 7)] and rollout_seed(1, 5, 1, 7) != seeds[(5, 1, 7)]


def test_retriever_counters_are_logged_once_per_search(monkeypatch):
    """Each step logs the retriever's counters of that step's searches: the model-parallel
    leaders' (hf engine) or the first rank's of each vLLM TP block (whose ranks send the same
    requests); the counters restart each step, so an evaluation's searches are not counted."""
    from types import SimpleNamespace

    from megatron_recycle.agent.retrievers import RetrieverStats, _StatsMixin
    from megatron_recycle.train.grpo import _retriever_counts

    class Counting(_StatsMixin):
        def __init__(self):
            self._init_stats()

        def search(self, queries):
            self._count(calls=1, queries=len(queries), timeouts=1)

    def runtime(engine, leader, vllm_tp=1):
        cfg = Config()
        cfg.rollout.engine, cfg.rollout.vllm_tp = engine, vllm_tp
        return SimpleNamespace(cfg=cfg, retriever=Counting(), is_mp_leader=leader, is_rank0=True)

    rt = runtime("hf", True)
    rt.retriever.search(["an evaluation's query"])
    assert _retriever_counts(rt, reset_only=True) == {}
    rt.retriever.search(["a", "b"])
    counts = _retriever_counts(rt)
    assert counts == {**RetrieverStats().as_dict(), "calls": 1, "queries": 2, "timeouts": 1}
    assert _retriever_counts(rt)["queries"] == 0  # restarted
    follower = runtime("hf", False)
    follower.retriever.search(["a"])
    assert _retriever_counts(follower) == {}
    for rank, counted in (("2", True), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        block = runtime("vllm", rank == "2", vllm_tp=2)
        block.retriever.search(["a"])
        assert bool(_retriever_counts(block)) is counted
