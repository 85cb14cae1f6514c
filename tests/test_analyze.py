"""`analyze` on a synthetic run: a real RecyclingPool with random rewards logged through MetricsWriter."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from megatron_recycle.analyze import (
    COLUMNS,
    AnalyzeError,
    analyze,
    history_summary,
    main,
    read_metrics,
    summarize,
)
from megatron_recycle.pool import RecyclingPool
from megatron_recycle.train.metrics import MetricsWriter, write_pool_history

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """20 steps of a recycling pool over queries of fixed random difficulty; returns (dir, logged, pool)."""
    run_dir = tmp_path_factory.mktemp("run")
    pool = RecyclingPool(60, batch_size=4, oversample=2, seed=1)
    g = torch.Generator().manual_seed(1)
    difficulty = torch.rand(60, generator=g)
    logged = []
    with MetricsWriter(run_dir, tensorboard=False) as w:
        for step in range(STEPS):
            ids = pool.sample()
            rewards = (torch.rand(ids.numel(), 4, generator=g) < difficulty[ids, None]).float()
            pool.update(ids, rewards)
            m = {**pool.stats(), "reward_mean": float(rewards.mean()), "em_mean": float(rewards.mean()) / 2}
            if step % 5 == 4:
                m["eval/dev_em"] = step / 100
            w.log(step, m)
            logged.append(json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]))
    write_pool_history(run_dir, pool.history_table())
    return run_dir, logged, pool


def test_analyze_draws_every_plot_and_tables_the_logged_numbers(run):
    run_dir, logged, pool = run
    out = io.StringIO()
    res = analyze(run_dir, out=out)
    assert set(res["plots"]) == {"recycled_share", "zero_variance", "batch_fill", "reward", "transitions", "flips",
                                 "pool"}
    assert res["skipped"] == {}
    for path in res["plots"].values():
        data = open(path, "rb").read()
        assert data[:8] == PNG and len(data) > 5000, path
    assert res["steps"] == STEPS and res["bad_lines"] == [] and res["duplicate_steps"] == 0

    # The table holds exactly the logged values ("inf"/"nan" strings read back as floats; a share of
    # an empty effective batch is nan).
    table = res["table"]
    assert table["every"] == 1 and len(table["rows"]) == STEPS
    for row, rec in zip(table["rows"], logged):
        for value, (_, key, _) in zip(row, COLUMNS):
            expected = rec[key]
            expected = float(expected) if isinstance(expected, str) else expected
            assert value == expected or (math.isnan(value) and math.isnan(expected)), (rec["step"], key)
    # the summary row: counts summed, shares over the sums
    eff = sum(r["effective_batch"] for r in logged)
    s = res["summary"]
    assert s["candidates"] == sum(r["candidates"] for r in logged) == STEPS * 8
    assert s["effective_batch"] == eff
    assert s["recycled_share"] == pytest.approx(sum(r["recycled"] for r in logged) / eff)
    assert s["recovery_share"] + s["drift_share"] == pytest.approx(s["recycled_share"])
    assert s["reward_mean"] == pytest.approx(sum(r["reward_mean"] for r in logged) / STEPS)
    assert s["recycled_share"] > 0  # the run did recycle something
    # the pool's state columns: the summary row shows the state after the last step
    assert s["live_weight_mass"] == logged[-1]["live_weight_mass"] == float(pool.weights.sum())
    assert s["never_drawn"] == logged[-1]["never_drawn"]

    # transition matrix of the last step = the pool's cumulative one
    assert res["transitions"] == {"step": STEPS - 1, "matrix": pool.stats()["transitions_total"]}
    # pool history: flipped queries agree with the pool's own count
    assert res["history"]["queries_flipped"] == pool.stats()["flipped_queries"]
    assert res["history"]["queries_drawn"] == 60 - pool.stats()["never_drawn"]

    text = out.getvalue()
    lines = text.splitlines()
    assert lines[1].split() == [c for c, _, _ in COLUMNS]
    first = dict(zip([c for c, _, _ in COLUMNS], lines[3].split()))
    assert first["step"] == "0" and first["cand"] == str(logged[0]["candidates"])
    assert first["fill"] == f"{logged[0]['batch_fill']:.2f}"
    assert any(line.split()[:1] == ["all"] for line in lines)
    assert f"{pool.stats()['flipped_queries']} flipped state" in text


def test_every_nth_row_keeps_the_last_step(run):
    run_dir, logged, _ = run
    res = analyze(run_dir, every=7, plots=False, out=io.StringIO())
    assert [row[0] for row in res["table"]["rows"]] == [0, 7, 14, 19]
    assert res["plots"] == {}
    with pytest.raises(ValueError, match="every must be >= 1"):
        analyze(run_dir, every=0, plots=False, out=io.StringIO())


def test_malformed_lines_are_counted_reported_and_skipped(tmp_path):
    good = [{"step": s, "reward_mean": s / 10, "effective_batch": 0, "batch_fill": 0.0, "candidates": 4,
             "rollouts_per_effective_group": "inf"} for s in range(3)]
    lines = [json.dumps(good[0]), "{broken", json.dumps([1, 2]), json.dumps({"reward_mean": 1}),
             json.dumps(good[1]), "", json.dumps(good[2]), json.dumps({**good[2], "reward_mean": 9.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records, bad, dup = read_metrics(tmp_path / "metrics.jsonl")
    assert [n for n, _ in bad] == [2, 3, 4] and dup == 1
    out = io.StringIO()
    res = analyze(tmp_path, out=out)
    assert [b["line"] for b in res["bad_lines"]] == [2, 3, 4]
    assert "metrics.jsonl:2: skipped: not JSON" in out.getvalue()
    assert "1 line(s) logged a step's metric again with another value" in out.getvalue()
    assert "metrics.jsonl:4: skipped: no integer 'step'" in out.getvalue()
    assert res["table"]["rows"][-1][COLUMNS.index(("reward", "reward_mean", ".3f"))] == 9.0  # last line wins
    # what the records lack is skipped with a reason, not drawn empty
    assert set(res["plots"]) == {"batch_fill", "reward"}
    assert "pool" in res["skipped"]
    assert "recycled_share" in res["skipped"] and "transitions" in res["skipped"]
    assert res["summary"]["rollouts_per_effective_group"] is None  # no "rollouts" counts logged


def test_missing_or_empty_metrics_are_clear_errors(tmp_path, capsys):
    with pytest.raises(AnalyzeError, match="metrics.jsonl not found .*does not exist"):
        analyze(tmp_path / "nope")
    with pytest.raises(AnalyzeError, match="metrics.jsonl not found: pass a run directory"):
        analyze(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(AnalyzeError, match="no valid metrics line \\(1 malformed\\)"):
        analyze(tmp_path, out=io.StringIO())
    assert main([str(tmp_path / "nope")]) == 2
    assert "analyze: " in capsys.readouterr().err
    # an SFT run's folder: said so, not a table of dashes
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "lr": 1e-5}) + "\n"
                                                    for s in range(3)))
    with pytest.raises(AnalyzeError, match=r"holds no GRPO step with pool metrics \(an SFT run"):
        analyze(tmp_path, out=io.StringIO())


def test_rollouts_spent_without_an_effective_group_are_inf_per_group():
    # rollouts generated and no group with signal: infinitely many per effective group, not "no data"
    summary = summarize([{"step": 0, "candidates": 8, "effective_batch": 0, "rollouts": 32}])
    assert summary["rollouts_per_effective_group"] == math.inf
    assert summarize([{"step": 0, "candidates": 8, "effective_batch": 0}])["rollouts_per_effective_group"] is None


def test_first_flip_steps_are_the_steps_of_the_flips():
    # drawn at step 0 and 3 as hard, at step 5 with signal: it flipped at step 5, not at its first draw
    assert history_summary({7: [(0, 0, 4, 0), (3, 0, 4, 0), (5, 2, 4, 1)]})["first_flip_steps"] == [5]


def test_a_long_run_prints_about_40_rows_and_a_nan_reward_does_not_blank_the_mean(tmp_path):
    """60 steps: every 2nd step and the last (ceil(60 / 40)), not all 60 (60 // 40 = 1); one step's
    NaN reward_mean is left out of the summary's mean instead of making it NaN."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(60):
            f.write(json.dumps({"step": s, "candidates": 8, "effective_batch": 4,
                                "reward_mean": "nan" if s == 3 else 0.5}) + "\n")
    res = analyze(tmp_path, plots=False, out=io.StringIO())
    assert res["table"]["every"] == 2
    assert [row[0] for row in res["table"]["rows"]] == [*range(0, 60, 2), 59]
    assert res["summary"]["reward_mean"] == 0.5


def test_main_prints_the_table(run, capsys):
    run_dir, _, _ = run
    assert main([str(run_dir), "--no-plots", "--every", "5"]) == 0
    text = capsys.readouterr().out
    assert "20 steps (0..19), showing every 5 steps and the last" in text
    assert "# transitions up to step 19" in text


def _pool_run(run_dir, rewards_per_step, eval_apart=False):
    """A 4-query pool, B=2, k=2 (every step draws all four), logged step by step; returns the pool."""
    pool = RecyclingPool(4, batch_size=2, oversample=2, seed=0)
    with MetricsWriter(run_dir, tensorboard=False) as w:
        for step, rewards in enumerate(rewards_per_step):
            ids = pool.sample()
            pool.update(ids, torch.tensor(rewards, dtype=torch.float64))
            w.log(step, {**pool.stats(), "reward_mean": 0.5})
            if eval_apart:  # as runs before 2026-12-01 logged it: a line of its own at step + 1
                w.log(step + 1, {"eval/dev_pass@1": (step + 1) / 4})
    write_pool_history(run_dir, pool.history_table())
    return pool


def test_an_evaluation_logged_apart_is_merged_and_does_not_blank_the_pool_metrics(tmp_path):
    _pool_run(tmp_path, [[[0, 1]] * 4, [[1, 1]] * 4, [[0, 0]] * 4], eval_apart=True)
    records, bad, clashes = read_metrics(tmp_path / "metrics.jsonl")
    assert bad == [] and clashes == 0 and [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r.get("eval/dev_pass@1") for r in records] == [None, 0.25, 0.5, 0.75]  # every evaluation kept
    assert "candidates" in records[1] and "candidates" not in records[3]
    out = io.StringIO()
    res = analyze(tmp_path, out=out)
    assert "again with another value" not in out.getvalue()
    # the pool's table and plots cover the three training steps; the last evaluation only the reward plot
    assert res["steps"] == 3 and res["last_step"] == 2 and [row[0] for row in res["table"]["rows"]] == [0, 1, 2]
    assert res["final_window"]["candidates"] == 4 and res["final_window"]["batch_fill"] == 0.0
    assert "reward" in res["plots"]


def test_flips_follow_the_pools_states_with_continuous_rewards(tmp_path):
    # F1-like rewards: a spread with no success (0.2 vs 0.4) is signal for the pool, not hard
    pool = _pool_run(tmp_path, [[[0.2, 0.4]] * 4, [[0.2, 0.4]] * 4, [[0.0, 0.0]] * 4])
    assert pool.stats()["flipped_queries"] == 4  # every step draws all four (epoch resets): signal, signal, hard
    res = analyze(tmp_path, plots=False, out=io.StringIO())
    assert res["history"]["queries_flipped"] == 4
    lines = (tmp_path / "pool_history.csv").read_text().splitlines()
    assert lines[0] == "query,step,successes,k,state" and lines[1].endswith(",0,2,signal")
    # the success count alone (the old file layout) reads all three draws as hard: no flip
    old = ["query,step,successes,k"] + [line.rsplit(",", 1)[0] for line in lines[1:]]
    (tmp_path / "pool_history.csv").write_text("\n".join(old) + "\n")
    assert analyze(tmp_path, plots=False, out=io.StringIO())["history"]["queries_flipped"] == 0


def test_a_history_without_states_is_read_with_the_binary_rule(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "candidates": 2}) + "\n")
    (tmp_path / "pool_history.csv").write_text("query,step,successes,k\n0,0,0,4\n0,1,2,4\n1,0,4,4\n1,1,4,4\n")
    from megatron_recycle.analyze import read_pool_history

    draws, bad = read_pool_history(tmp_path / "pool_history.csv")
    assert bad == [] and draws == {0: [(0, 0, 4, 0), (1, 2, 4, 1)], 1: [(0, 4, 4, 2), (1, 4, 4, 2)]}
    (tmp_path / "pool_history.csv").write_text("query,step,successes,k,state\n0,0,0,4,hard\n0,1,2,4,sideways\n")
    draws, bad = read_pool_history(tmp_path / "pool_history.csv")
    assert draws == {0: [(0, 0, 4, 0)]} and "not one of" in bad[0][1]


def test_a_history_from_elsewhere_is_flagged(tmp_path):
    _pool_run(tmp_path, [[[0, 1]] * 4, [[1, 1]] * 4, [[0, 0]] * 4])
    other = tmp_path / "other"
    _pool_run(other, [[[0, 1]] * 4, [[0, 1]] * 4, [[0, 1]] * 4])
    (other / "pool_history.csv").replace(tmp_path / "pool_history.csv")
    out = io.StringIO()
    analyze(tmp_path, plots=False, out=out)
    assert "the history is from another point of the run" in out.getvalue()


def test_cli_analyze_passes_every_and_no_plots(run, capsys):
    from megatron_recycle.cli import main as cli_main

    run_dir, _, _ = run
    assert cli_main(["analyze", str(run_dir), "--every", "7", "--no-plots"]) == 0
    assert "20 steps (0..19), showing every 7 steps and the last" in capsys.readouterr().out


def test_the_reward_plot_draws_only_the_evaluation_scores():
    """The trainer logs every key of evaluate's ``overall`` as eval/dev_<key> (n, turns, response
    tokens, ...); only the 0-1 scores belong on the reward axes, and em only when pass@1 is absent."""
    from megatron_recycle.analyze import _eval_keys
    from megatron_recycle.evaluate import _aggregate

    row = {"em": 1.0, "f1": 0.5, "answered": True, "searches": 2, "turns": 3, "response_tokens": 40,
           "retrieval_errors": 0, "finish_reasons": ["answer"]}
    overall = _aggregate([row, {**row, "em": 0.0}])
    records = [{"step": 0, "reward_mean": 0.3, **{f"eval/dev_{k}": v for k, v in overall.items()}}]
    assert _eval_keys(records) == ["eval/dev_answer_rate", "eval/dev_f1", "eval/dev_pass@1"]
    # an older run that logged only eval/dev_em keeps its curve
    assert _eval_keys([{"step": 0, "eval/dev_em": 0.2, "eval/dev_n": 50}]) == ["eval/dev_em"]


def test_the_plots_recycled_share_is_a_ratio_of_sums_like_the_summary():
    """A step that trained one group weighs one group (the summary's rule), not a whole batch."""
    import numpy as np

    from megatron_recycle.analyze import _rolling_ratio

    recycled = np.array([2.0, 0.0, 0.0, 0.0, 3.0])
    effective = np.array([2.0, 1.0, 0.0, 0.0, 4.0])
    out = _rolling_ratio(recycled, effective, 4)
    assert out[3] == pytest.approx(2 / 3)  # not the mean of per-step shares (0.5)
    assert out[4] == pytest.approx(3 / 5)
    assert math.isnan(_rolling_ratio(np.array([0.0]), np.array([0.0]), 3)[0])
