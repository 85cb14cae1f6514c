"""`analyze` on a synthetic run: a real RecyclingPool with random rewards logged through MetricsWriter."""

from __future__ import annotations

import io
import json

import pytest
import torch

from megatron_recycle.analyze import COLUMNS, AnalyzeError, analyze, main, read_metrics
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
    assert set(res["plots"]) == {"recycled_share", "zero_variance", "batch_fill", "reward", "transitions", "flips"}
    assert res["skipped"] == {}
    for path in res["plots"].values():
        data = open(path, "rb").read()
        assert data[:8] == PNG and len(data) > 5000, path
    assert res["steps"] == STEPS and res["bad_lines"] == [] and res["duplicate_steps"] == 0

    # The table holds exactly the logged values ("inf" strings read back as float inf).
    table = res["table"]
    assert table["every"] == 1 and len(table["rows"]) == STEPS
    for row, rec in zip(table["rows"], logged):
        for value, (_, key, _) in zip(row, COLUMNS):
            expected = rec[key]
            expected = float(expected) if isinstance(expected, str) else expected
            assert value == expected, (rec["step"], key)
    # the summary row: counts summed, shares over the sums
    eff = sum(r["effective_batch"] for r in logged)
    s = res["summary"]
    assert s["candidates"] == sum(r["candidates"] for r in logged) == STEPS * 8
    assert s["effective_batch"] == eff
    assert s["recycled_share"] == pytest.approx(sum(r["recycled"] for r in logged) / eff)
    assert s["recovery_share"] + s["drift_share"] == pytest.approx(s["recycled_share"])
    assert s["reward_mean"] == pytest.approx(sum(r["reward_mean"] for r in logged) / STEPS)
    assert s["recycled_share"] > 0  # the run did recycle something

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
    assert "metrics.jsonl:4: skipped: no integer 'step'" in out.getvalue()
    assert res["table"]["rows"][-1][COLUMNS.index(("reward", "reward_mean", ".3f"))] == 9.0  # last line wins
    # what the records lack is skipped with a reason, not drawn empty
    assert set(res["plots"]) == {"batch_fill", "reward"}
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


def test_main_prints_the_table(run, capsys):
    run_dir, _, _ = run
    assert main([str(run_dir), "--no-plots", "--every", "5"]) == 0
    text = capsys.readouterr().out
    assert "20 steps (0..19), showing every 5 steps and the last" in text
    assert "# transitions up to step 19" in text
