"""Unit and property tests of the recycling pool (METHOD.md section 2)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_recycle.pool import EASY, HARD, SIGNAL, PoolExhausted, RecyclingPool


def rewards_for(ids, pattern, k=4):
    """Binary rewards per drawn id: pattern maps id -> successes (default 2 = signal)."""
    rows = []
    for q in ids.tolist():
        s = pattern(q)
        rows.append([1.0] * s + [0.0] * (k - s))
    return torch.tensor(rows)


def test_sample_distinct_and_sized():
    pool = RecyclingPool(100, batch_size=8, oversample=2, seed=1)
    ids = pool.sample()
    assert ids.dtype == torch.long and ids.numel() == 16
    assert len(set(ids.tolist())) == 16
    assert ids.min() >= 0 and ids.max() < 100


def test_recycle_weights_and_effective_batch_in_draw_order():
    pool = RecyclingPool(50, batch_size=4, oversample=2, seed=0)
    ids = pool.sample()
    # ids at even draw positions are all-wrong, odd positions signal-bearing.
    succ = {q: (0 if i % 2 == 0 else 2) for i, q in enumerate(ids.tolist())}
    chosen = pool.update(ids, rewards_for(ids, succ.get))
    expected = [q for i, q in enumerate(ids.tolist()) if i % 2 == 1][:4]
    assert chosen.tolist() == expected
    for q in ids.tolist():
        assert pool.weights[q] == (0.0 if q in expected else 1.0)
    s = pool.stats()
    assert s["effective_batch"] == 4 and s["signal_groups"] == 4 and s["zv_all_wrong"] == 4
    assert s["zv_all_correct"] == 0 and s["recycled"] == 0
    assert s["rollouts_per_effective_group"] == pytest.approx(8 * 4 / 4)
    assert s["live_weight_mass"] == pytest.approx(46.0)


def test_signal_past_B_is_recycled_not_consumed():
    pool = RecyclingPool(30, batch_size=2, oversample=3, seed=0)
    ids = pool.sample()
    chosen = pool.update(ids, rewards_for(ids, lambda q: 1))
    assert chosen.tolist() == ids[:2].tolist()
    assert (pool.weights[ids[2:]] == 1).all() and (pool.weights[ids[:2]] == 0).all()


def test_zero_variance_never_in_effective_batch_continuous():
    pool = RecyclingPool(20, batch_size=5, oversample=2, seed=3)
    ids = pool.sample()
    r = torch.full((10, 4), 0.3)
    r[1] = torch.tensor([0.3, 0.3, 0.3, 0.3 + 1e-9])  # below eps: still zero variance
    r[4] = torch.tensor([0.1, 0.5, 0.2, 0.9])
    chosen = pool.update(ids, r)
    assert chosen.tolist() == [int(ids[4])]
    assert pool.stats()["zv_all_wrong"] == 9  # common value 0.3 < success threshold


def test_consumed_never_redrawn_until_epoch_reset():
    pool = RecyclingPool(12, batch_size=4, oversample=1, seed=5)
    seen = set()
    for _ in range(3):
        ids = pool.sample()
        assert not (set(ids.tolist()) & seen)
        seen |= set(ids.tolist())
        pool.update(ids, rewards_for(ids, lambda q: 2))
    assert seen == set(range(12)) and pool.epoch == 0
    ids = pool.sample()  # nothing live: new epoch
    assert pool.epoch == 1 and (pool.weights == 1).all()
    pool.update(ids, rewards_for(ids, lambda q: 2))
    assert pool.stats()["epoch_reset"] is True


def test_stop_when_exhausted():
    pool = RecyclingPool(8, batch_size=4, strategy="grpo", on_exhausted="stop", seed=0)
    for _ in range(2):
        ids = pool.sample()
        pool.update(ids, rewards_for(ids, lambda q: 0))
    with pytest.raises(PoolExhausted, match="positive weight"):
        pool.sample()


def test_a_dapo_step_that_runs_out_mid_step_is_closed_with_what_it_drew():
    pool = RecyclingPool(5, batch_size=2, strategy="dapo", on_exhausted="stop", max_gen_batches=3, seed=0)
    assert pool.close_step() is False  # no step open
    ids = pool.sample()
    with pytest.raises(RuntimeError, match="pending sample"):
        pool.close_step()
    pool.update(ids, rewards_for(ids, lambda q: 0))  # no signal: dapo wants another generation batch
    ids2 = pool.sample()
    pool.update(ids2, rewards_for(ids2, lambda q: 4 if q == int(ids2[0]) else 2))  # one signal group
    assert pool.needs_more
    with pytest.raises(PoolExhausted):
        pool.sample()  # 5 queries, 4 drawn and consumed: 1 live, fewer than a draw of B = 2
    with pytest.raises(RuntimeError, match="middle of a step"):
        pool.state_dict()
    assert pool.close_step() is True
    s = pool.stats()
    assert s["gen_batches"] == 2 and s["effective_batch"] == 1 and s["step"] == 0
    assert pool.step == 1
    pool.state_dict()  # between steps again: a checkpoint can be written


def test_a_dapo_step_never_crosses_an_epoch_boundary():
    """new_epoch: when the live queries cannot fill the next generation batch, the step ends there
    and the next step starts the new epoch; a reset inside the step made its consumed queries
    drawable again, so one query could enter the same step's batch twice."""
    for seed in range(60):
        pool = RecyclingPool(5, batch_size=2, strategy="dapo", max_gen_batches=3, seed=seed)
        drawn, chosen, gb = [], [], 0
        while True:
            ids = pool.sample()
            drawn += ids.tolist()
            successes = {0: (1, 0), 1: (0, 0), 2: (1, 1)}[gb]  # 1 signal group, then none, then 2
            chosen += pool.update(ids, rewards_for(ids, dict(zip(ids.tolist(), successes)).get)).tolist()
            gb += 1
            if not pool.needs_more:
                break
        assert len(set(drawn)) == len(drawn), (seed, drawn)  # no query twice in one step
        s = pool.stats()
        assert gb == 2 and s["gen_batches"] == 2 and s["effective_batch"] == 1 and pool.epoch == 0
        ids = pool.sample()  # the next step starts the new epoch
        assert pool.epoch == 1 and ids.numel() == 2
        pool.update(ids, rewards_for(ids, lambda q: 1))
        assert pool.stats()["epoch_reset"] is True


def test_shares_of_an_empty_effective_batch_are_nan_not_zero():
    pool = RecyclingPool(10, batch_size=2, oversample=1, seed=0)
    ids = pool.sample()
    pool.update(ids, rewards_for(ids, lambda q: 0))
    s = pool.stats()
    assert s["effective_batch"] == 0
    assert all(math.isnan(s[k]) for k in ("recycled_share", "recovery_share", "drift_share"))
    assert s["rollouts_per_effective_group"] == math.inf


def test_soft_recycling_keeps_small_weight():
    pool = RecyclingPool(10, batch_size=3, strategy="soft_recycle", seed=0)
    ids = pool.sample()
    chosen = pool.update(ids, rewards_for(ids, lambda q: 2))
    assert torch.allclose(pool.weights[chosen], torch.tensor(0.1, dtype=torch.float64))


def test_grpo_and_bounded_dapo_consume_everything():
    for strategy, k in (("grpo", 1), ("bounded_dapo", 2)):
        pool = RecyclingPool(40, batch_size=4, oversample=k, strategy=strategy, seed=0)
        ids = pool.sample()
        assert ids.numel() == 4 * k
        chosen = pool.update(ids, rewards_for(ids, lambda q: q % 3 * 2))  # 0, 2, 4 successes
        assert (pool.weights[ids] == 0).all()
        assert chosen.numel() <= 4
    with pytest.raises(ValueError, match="oversample must be 1"):
        RecyclingPool(40, batch_size=4, oversample=2, strategy="grpo")


def test_dapo_repeats_generation_batches_until_full():
    pool = RecyclingPool(100, batch_size=4, strategy="dapo", max_gen_batches=5, seed=0)
    batches, chosen_all = 0, []
    while True:
        ids = pool.sample()
        batches += 1
        # only one signal group per generation batch
        succ = {q: (2 if i == 0 else 4) for i, q in enumerate(ids.tolist())}
        chosen_all += pool.update(ids, rewards_for(ids, succ.get)).tolist()
        if not pool.needs_more:
            break
    assert batches == 4 and len(chosen_all) == 4
    s = pool.stats()
    assert s["gen_batches"] == 4 and s["candidates"] == 16 and s["effective_batch"] == 4
    assert s["zv_all_correct"] == 12 and pool.step == 1


def test_dapo_stops_at_max_gen_batches():
    pool = RecyclingPool(100, batch_size=4, strategy="dapo", max_gen_batches=2, seed=0)
    n = 0
    while True:
        ids = pool.sample()
        pool.update(ids, rewards_for(ids, lambda q: 0))
        n += 1
        if not pool.needs_more:
            break
    assert n == 2 and pool.stats()["effective_batch"] == 0


def test_recycled_recovery_and_drift_accounting():
    pool = RecyclingPool(6, batch_size=6, oversample=1, seed=0)
    ids = pool.sample()  # all 6
    pattern = {q: (0 if q < 3 else 4) for q in range(6)}  # 0-2 hard, 3-5 easy
    assert pool.update(ids, rewards_for(ids, pattern.get)).numel() == 0
    ids = pool.sample()
    pattern = {0: 2, 1: 1, 2: 0, 3: 3, 4: 4, 5: 4}
    chosen = pool.update(ids, rewards_for(ids, pattern.get))
    assert set(chosen.tolist()) == {0, 1, 3}
    s = pool.stats()
    assert s["recycled"] == 3 and s["recovery"] == 2 and s["drift"] == 1
    assert s["recycled_share"] == 1.0
    t = torch.tensor(s["transitions"])
    assert t[HARD, SIGNAL] == 2 and t[HARD, HARD] == 1 and t[EASY, SIGNAL] == 1 and t[EASY, EASY] == 2
    assert s["flipped_queries"] == 3
    assert pool.history(0) == [(0, 0, 4), (1, 2, 4)]


def test_recovery_and_drift_follow_the_last_zero_variance_state():
    """hard -> easy -> signal is drift (the last zero-variance state was easy), easy -> hard ->
    signal a recovery: the first state would give the opposite."""
    pool = RecyclingPool(2, batch_size=2, oversample=1, seed=0)
    for pattern in ({0: 0, 1: 4}, {0: 4, 1: 0}):  # query 0: hard then easy; query 1: easy then hard
        ids = pool.sample()
        assert pool.update(ids, rewards_for(ids, pattern.get)).numel() == 0
    ids = pool.sample()
    assert sorted(pool.update(ids, rewards_for(ids, lambda q: 2)).tolist()) == [0, 1]
    s = pool.stats()
    assert (s["recycled"], s["recovery"], s["drift"]) == (2, 1, 1)
    pool = RecyclingPool(2, batch_size=2, oversample=1, seed=0)
    for pattern in ({0: 0, 1: 0}, {0: 4, 1: 0}):  # query 0 ends easy, query 1 stays hard
        ids = pool.sample()
        pool.update(ids, rewards_for(ids, pattern.get))
    ids = pool.sample()
    pool.update(ids, rewards_for(ids, lambda q: 2))
    s = pool.stats()
    assert (s["recovery"], s["drift"]) == (1, 1)


def test_dapo_drops_the_surplus_of_a_later_generation_batch():
    """B = 2: one signal group in the first batch, two in the second; only one more fits."""
    pool = RecyclingPool(20, batch_size=2, strategy="dapo", max_gen_batches=3, seed=0)
    ids = pool.sample()
    first = pool.update(ids, rewards_for(ids, {int(ids[0]): 2, int(ids[1]): 0}.get))
    assert first.tolist() == [int(ids[0])] and pool.needs_more
    ids = pool.sample()
    second = pool.update(ids, rewards_for(ids, lambda q: 2))
    assert second.tolist() == [int(ids[0])]  # the first in draw order, the surplus dropped
    s = pool.stats()
    assert s["effective_batch"] == 2 and s["signal_groups"] == 3 and not pool.needs_more
    assert (pool.weights[ids] == 0).all()  # dapo consumes what it drew, surplus included


def test_the_pool_uses_the_signal_flags_it_is_given():
    """The trainer passes grpo_advantages' flags (its std rule); the pool's own rule (population std
    against signal_eps) can disagree near eps, and the given flags must win."""
    pool = RecyclingPool(10, batch_size=2, oversample=1, seed=0)
    ids = pool.sample()
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.2e-6], [0.0, 0.0, 0.0, 0.0]])
    assert pool.is_signal(rewards).tolist() == [False, False]
    chosen = pool.update(ids, rewards, signal=torch.tensor([True, False]))
    assert chosen.tolist() == [int(ids[0])]
    ids = pool.sample()
    assert pool.update(ids, torch.tensor([[0.0, 1.0, 0.0, 1.0]] * 2), signal=torch.tensor([False, False])).numel() == 0


def test_update_validates_input():
    pool = RecyclingPool(10, batch_size=2, seed=0)
    ids = pool.sample()
    with pytest.raises(ValueError, match="shape"):
        pool.update(ids, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="differ"):
        pool.update(ids.flip(0), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        pool.update(ids, torch.tensor([[0.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(RuntimeError, match="twice"):
        pool.sample()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(oversample=0), "oversample"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=8, oversample=2), "only 10 queries"),
        (dict(strategy="magic"), "strategy"),
        (dict(consumed_weight=1.5), "consumed_weight"),
        (dict(on_exhausted="loop"), "on_exhausted"),
    ],
)
def test_invalid_config(kwargs, match):
    args = dict(batch_size=2) | kwargs
    with pytest.raises(ValueError, match=match):
        RecyclingPool(10, **args)


def test_sampling_frequency_proportional_to_weights():
    pool = RecyclingPool(4, batch_size=1, seed=0)
    pool.weights = torch.tensor([1.0, 0.5, 0.25, 0.25], dtype=torch.float64)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        ids = pool.sample()
        counts[ids] += 1
        pool._pending = None  # draw repeatedly from the same weights
    expected = torch.tensor([0.5, 0.25, 0.125, 0.125]) * n
    # chi-square with 3 dof: 16.3 is the 0.999 quantile
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts, chi2)


def test_without_replacement_first_and_second_draw_order():
    """Second draw position follows successive sampling: P(j second | i first) = w_j / (W - w_i)."""
    pool = RecyclingPool(3, batch_size=2, seed=1)
    pool.weights = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    n, firsts, pairs = 20000, torch.zeros(3), {}
    for _ in range(n):
        ids = pool.sample().tolist()
        pool._pending = None
        firsts[ids[0]] += 1
        pairs[tuple(ids)] = pairs.get(tuple(ids), 0) + 1
    assert torch.allclose(firsts / n, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    p01 = pairs.get((0, 1), 0) / n
    assert math.isclose(p01, 0.6 * 0.3 / 0.4, abs_tol=0.015)


def test_state_round_trip_continues_identically():
    def run(pool, steps):
        out = []
        for _ in range(steps):
            ids = pool.sample()
            g = torch.Generator().manual_seed(int(ids.sum()))
            r = torch.randint(0, 2, (ids.numel(), 4), generator=g).float()
            out.append((ids.tolist(), pool.update(ids, r).tolist()))
        return out

    a = RecyclingPool(64, batch_size=4, oversample=2, seed=7)
    run(a, 5)
    sd = a.state_dict()
    b = RecyclingPool(64, batch_size=4, oversample=2, seed=123)  # seed comes from the state
    b.load_state_dict(sd)
    assert run(a, 6) == run(b, 6)
    assert a.stats() == b.stats()
    assert torch.equal(a.weights, b.weights)
    # across epoch resets too: a small grpo pool resets every 3 steps
    a = RecyclingPool(12, batch_size=4, strategy="grpo", seed=7)
    run(a, 7)
    assert a.epoch == 2
    b = RecyclingPool(12, batch_size=4, strategy="grpo", seed=1)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 2 and b.stats() == a.stats()
    assert run(a, 5) == run(b, 5) and a.stats() == b.stats()


def test_history_keeps_the_pools_state_per_draw_and_older_checkpoints_load():
    pool = RecyclingPool(4, batch_size=2, oversample=2, seed=0)
    for rewards in ([[0.2, 0.4]] * 4, [[1.0, 1.0]] * 4):  # continuous spread (signal), then all correct
        ids = pool.sample()
        pool.update(ids, torch.tensor(rewards))
    table = pool.history_table()
    assert table["state"].tolist() == [SIGNAL] * 4 + [EASY] * 4
    sd = pool.state_dict()
    del sd["history"]["state"]  # a checkpoint written before the history kept states
    old = RecyclingPool(4, batch_size=2, oversample=2)
    old.load_state_dict(sd)
    # the success count is all it has: the continuous spread with no success reads as hard
    assert old.history_table()["state"].tolist() == [HARD] * 4 + [EASY] * 4
    assert torch.equal(old.history_table()["successes"], table["successes"])


def test_load_state_rejects_mismatch():
    sd = RecyclingPool(64, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="64 queries"):
        RecyclingPool(65, batch_size=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="strategy"):
        RecyclingPool(64, batch_size=4, strategy="grpo").load_state_dict(sd)


def test_state_dict_refused_mid_step():
    pool = RecyclingPool(10, batch_size=2)
    pool.sample()
    with pytest.raises(RuntimeError, match="middle of a step"):
        pool.state_dict()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(8, 60),
    b=st.integers(1, 4),
    k=st.integers(1, 2),
    strategy=st.sampled_from(["recycle", "soft_recycle", "bounded_dapo"]),
    seed=st.integers(0, 1000),
    steps=st.integers(1, 12),
)
def test_properties(n, b, k, strategy, seed, steps):
    if b * k > n:
        return
    pool = RecyclingPool(n, batch_size=b, oversample=k, strategy=strategy, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        before = pool.weights.clone()
        epoch = pool.epoch
        ids = pool.sample()
        if pool.epoch != epoch:
            before = torch.ones_like(before)
        assert len(set(ids.tolist())) == ids.numel() == b * k
        assert (before[ids] > 0).all()  # zero-weight queries are never drawn
        r = torch.randint(0, 2, (ids.numel(), 4), generator=g).float()
        chosen = pool.update(ids, r)
        sig = r.std(1) > 0
        # effective batch: the first min(B, #signal) signal-bearing ids in draw order
        assert chosen.tolist() == ids[sig][:b].tolist()
        cw = pool.consumed_weight
        for q in ids.tolist():
            if strategy == "bounded_dapo" or q in chosen.tolist():
                assert pool.weights[q] == cw
            else:
                assert pool.weights[q] == before[q]
        s = pool.stats()
        assert s["signal_groups"] + s["zero_variance"] == ids.numel()
        assert s["recovery"] + s["drift"] <= s["recycled"] <= s["effective_batch"]
