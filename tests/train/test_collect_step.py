"""grpo.collect_step and balance_groups on one process (DP=1, no torch.distributed): which groups
are trained, with which trajectories and advantages, how generation batches are counted and
numbered, and how groups are spread over DP ranks (mutants of these survived the loop tests)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_recycle.agent.types import Trajectory
from megatron_recycle.config import Config
from megatron_recycle.pool import PoolClient, RecyclingPool
from megatron_recycle.train import grpo


def _rt(cfg, dp_rank=0, dp=1):
    return SimpleNamespace(cfg=cfg, layout=SimpleNamespace(dp_rank=dp_rank, dp=dp), is_rank0=True,
                           is_mp_leader=True, engine=None, retriever=None)


def _patch(monkeypatch, reward_of):
    calls = []

    def fake_share(rt, examples, ids, step, gen_batch):
        k = rt.cfg.rollout.group_size
        calls.append((ids.tolist(), step, gen_batch))
        out = []
        for q in ids.tolist():
            for j in range(k):
                # token ids carry (query, sample) so the test can find each trajectory
                out.append(Trajectory(query_id=q, sample_index=j, token_ids=[1, 100 + q, 200 + j],
                                      loss_mask=[0, 1, 1], prompt_len=1, reward=reward_of(q, j)))
        return out

    monkeypatch.setattr(grpo, "rollout_share", fake_share)
    monkeypatch.setattr(grpo, "gather_rows", lambda local, dst=0, group=None: local)
    monkeypatch.setattr(grpo, "_dp_group", lambda: None)
    monkeypatch.setattr(grpo, "_gather_records", lambda records, reused: (records, reused))
    monkeypatch.setattr(grpo, "_gather_groups", lambda local: local)
    return calls


def _cfg(strategy="recycle", b=2, oversample=2, k=4):
    cfg = Config()
    cfg.rollout.group_size = k
    cfg.pool.strategy, cfg.pool.batch_size, cfg.pool.oversample = strategy, b, oversample
    return cfg


def test_collect_step_trains_exactly_the_chosen_groups_with_their_own_advantages(monkeypatch):
    # queries with an even id: mixed rewards (signal); odd ids: all wrong (no signal)
    def reward_of(q, j):
        return float(j % 2) if q % 2 == 0 else 0.0

    _patch(monkeypatch, reward_of)
    cfg = _cfg()
    pool = RecyclingPool(20, batch_size=2, oversample=2, strategy="recycle", seed=2)
    groups, info = grpo.collect_step(_rt(cfg), PoolClient(pool), examples=None, step=0)
    chosen = info["decisions"][0]["chosen"]
    assert info["decisions"][0]["sampled"] != sorted(info["decisions"][0]["sampled"])  # draw order, not id order
    assert sorted(g[0]["query_id"] for g in groups) == sorted(chosen)
    assert all(q % 2 == 0 for q in chosen)
    assert info["rollouts"] == 2 * 2 * 4 and info["effective"] == len(chosen)
    for g in groups:
        q = g[0]["query_id"]
        assert [t["token_ids"] for t in g] == [[1, 100 + q, 200 + j] for j in range(4)]
        r = torch.tensor([reward_of(q, j) for j in range(4)])
        want = (r - r.mean()) / (r.std() + 1e-6)
        assert [t["advantage"] for t in g] == pytest.approx(want.tolist(), rel=1e-5)
    sampled = info["decisions"][0]["sampled"]
    all_r = torch.tensor([[reward_of(q, j) for j in range(4)] for q in sampled])
    assert info["reward_mean"] == pytest.approx(float(all_r.mean()))


def test_dapo_generation_batches_are_counted_and_numbered(monkeypatch):
    calls = _patch(monkeypatch, lambda q, j: float(j == 0) if q < 3 else 0.0)
    cfg = _cfg("dapo", b=2, oversample=1)
    pool = RecyclingPool(20, batch_size=2, oversample=1, strategy="dapo", seed=0, max_gen_batches=3)
    groups, info = grpo.collect_step(_rt(cfg), PoolClient(pool), examples=None, step=7)
    n_batches = len(info["decisions"])
    assert [c[2] for c in calls] == list(range(n_batches)) and all(c[1] == 7 for c in calls)
    assert info["rollouts"] == n_batches * 2 * 4
    assert n_batches > 1  # the case the test is for: several generation batches in one step
    chosen = [q for d in info["decisions"] for q in d["chosen"]]
    assert info["effective"] == len(chosen) and sorted(g[0]["query_id"] for g in groups) == sorted(chosen)


def test_balance_groups_spreads_tokens_evenly():
    def group(n_tokens, tag):
        return [{"token_ids": [tag] * n_tokens}]
    groups = [group(n, i) for i, n in enumerate([10, 9, 8, 7, 6, 5, 4, 3])]
    parts = grpo.balance_groups(groups, 2)
    loads = [sum(len(t["token_ids"]) for g in p for t in g) for p in parts]
    assert sorted(loads) == [26, 26]
    parts = grpo.balance_groups(groups, 3)
    loads = [sum(len(t["token_ids"]) for g in p for t in g) for p in parts]
    assert max(loads) <= 19 and sum(loads) == 52  # optimum 18, greedy LPT 19
    # every group exactly once, and the same assignment from the same list
    flat = sorted(g[0]["token_ids"][0] for p in parts for g in p)
    assert flat == list(range(8)) and grpo.balance_groups(groups, 3) == parts
    # fewer groups than ranks: each group on its own rank
    assert [len(p) for p in grpo.balance_groups(groups[:2], 4)] == [1, 1, 0, 0]
