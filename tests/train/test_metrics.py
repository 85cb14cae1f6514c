"""MetricsWriter (jsonl + TensorBoard, crash safety, resume), the summary line, Timer and the pool history CSV."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from megatron_recycle.pool import RecyclingPool
from megatron_recycle.train import metrics as M
from megatron_recycle.train.metrics import (
    MetricsWriter,
    Timer,
    format_step_line,
    read_float,
    write_pool_history,
)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _pool_after(steps: int, seed: int = 0) -> RecyclingPool:
    pool = RecyclingPool(30, batch_size=4, oversample=2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = pool.sample()
        pool.update(ids, torch.randint(0, 2, (ids.numel(), 4), generator=g).float())
    return pool


def test_log_writes_one_strict_json_line_per_step(tmp_path):
    pool = _pool_after(2)
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(0, {**pool.stats(), "reward_mean": torch.tensor(0.25), "em_mean": np.float64(0.5),
                  "loss": {"clip_frac": 0.1, "kl": float("nan")}, "bad": float("-inf")})
        # flushed at once: readable while the writer is still open
        assert len(_lines(tmp_path / "metrics.jsonl")) == 1
        w.log(1, {"rollouts_per_effective_group": float("inf"), "flag": True})
    rows = _lines(tmp_path / "metrics.jsonl")  # json.loads with strict JSON: no NaN tokens
    assert [r["step"] for r in rows] == [0, 1]
    r0 = rows[0]
    assert r0["reward_mean"] == 0.25 and r0["em_mean"] == 0.5
    assert r0["transitions_total"] == pool.stats()["transitions_total"]  # nested lists kept
    assert r0["loss"] == {"clip_frac": 0.1, "kl": "nan"} and r0["bad"] == "-inf"
    assert r0["metrics_step"] == pool.stats()["step"] != 0  # the pool's own counter is kept apart
    assert rows[1]["rollouts_per_effective_group"] == "inf" and rows[1]["flag"] is True
    assert read_float(rows[1]["rollouts_per_effective_group"]) == math.inf
    assert math.isnan(read_float(r0["loss"]["kl"]))
    assert read_float("hello") is None and read_float([1]) is None
    with pytest.raises(RuntimeError, match="closed"):
        w.log(2, {})


def test_log_rejects_bad_input(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="integer >= 0, got -3"):
            w.log(-3, {})
        with pytest.raises(TypeError, match="metric value .* of type object"):
            w.log(0, {"x": object()})


def _log_then_die(run_dir: str) -> None:
    w = MetricsWriter(run_dir, tensorboard=False)
    for step in range(3):
        w.log(step, {"reward_mean": step / 10})
    os.kill(os.getpid(), signal.SIGKILL)


def test_sigkill_loses_nothing_already_logged(tmp_path):
    proc = mp.get_context("fork").Process(target=_log_then_die, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    assert [r["reward_mean"] for r in _lines(tmp_path / "metrics.jsonl")] == [0.0, 0.1, 0.2]


def test_resume_drops_steps_at_and_after_the_resume_step_and_torn_lines(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(6):
            w.log(step, {"reward_mean": float(step)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 6, "reward_me')  # a line torn by a crash, no newline
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=4)
    assert w.dropped_on_resume == 2 and w.malformed_on_resume == [7]
    w.log(4, {"reward_mean": 40.0})
    w.close()
    rows = _lines(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["reward_mean"] == 40.0


def test_fresh_run_moves_an_old_file_aside_and_disabled_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(0, {"a": 1})
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(0, {"a": 2})
    assert _lines(tmp_path / "metrics.jsonl")[0]["a"] == 2
    assert _lines(tmp_path / "metrics.jsonl.old")[0]["a"] == 1
    # the earlier run's pool history goes aside with its metrics (an SFT writer leaves it alone)
    (tmp_path / "pool_history.csv").write_text("query,step,successes,k,state\n0,0,0,4,hard\n")
    with MetricsWriter(tmp_path, tensorboard=False, filename="sft_metrics.jsonl"):
        pass
    assert (tmp_path / "pool_history.csv").exists()
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=1):
        pass
    assert (tmp_path / "pool_history.csv").exists()
    with MetricsWriter(tmp_path, tensorboard=False):
        pass
    assert not (tmp_path / "pool_history.csv").exists()
    assert (tmp_path / "pool_history.csv.old").read_text().endswith("0,0,0,4,hard\n")
    other = tmp_path / "rank1"
    with MetricsWriter(other, enabled=False) as w:
        w.log(0, {"a": 1})
    assert not other.exists()


def test_tensorboard_scalars_under_section_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pool = _pool_after(1)
    timer = Timer()
    with timer("rollout"):
        pass
    with MetricsWriter(tmp_path) as w:
        for step in (0, 1):
            w.log(step, {**pool.stats(), "reward_mean": 0.5 + step, "eval/em": 0.3, **timer.metrics(),
                         "loss": {"kl": 0.01}, "note": "text is not a scalar"})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"pool/recycled_share", "pool/zv_all_wrong", "train/reward_mean", "eval/em", "time/rollout",
            "loss/kl"} <= tags
    assert not any("transitions" in t or "note" in t for t in tags)  # matrices and strings stay in the JSON
    assert [e.value for e in acc.Scalars("train/reward_mean")] == [0.5, 1.5]
    assert [e.step for e in acc.Scalars("train/reward_mean")] == [0, 1]
    assert acc.Scalars("pool/effective_batch")[0].value == pool.stats()["effective_batch"]


def test_format_step_line_full_and_partial():
    m = {"step": 12, "reward_mean": 0.4123, "em_mean": 0.375, "effective_batch": 6, "batch_fill": 0.75,
         "recycled_share": 0.5, "recovery": 2, "drift": 1, "zv_all_correct": 3, "zv_all_wrong": 5,
         "time/rollout": 12.34, "time/logprob": 1.2, "time/train": 4.5, "time/sync": 0.8}
    assert format_step_line(m) == (
        "step 12 | reward 0.412 | EM 0.375 | eff 6/8 | recycled 50% (recovery 2, drift 1) | "
        "zero-var 3 all-correct / 5 all-wrong | s: rollout 12.3 logprob 1.2 train 4.5 sync 0.8"
    )
    assert format_step_line({"step": 3, "effective_batch": 0, "batch_fill": 0.0, "time": {"train": 2.0}}) == \
        "step 3 | eff 0 | s: train 2.0"
    assert format_step_line({"effective_batch": 2, "batch_size": 4, "reward_mean": "nan"}) == "reward nan | eff 2/4"
    assert format_step_line({}) == "(no metrics)"
    # an empty effective batch: its recycled share is nan (not shown); a nan fill has no batch size
    assert format_step_line({"step": 4, "effective_batch": 0, "batch_size": 4, "recycled_share": "nan",
                             "recovery": 0, "drift": 0}) == "step 4 | eff 0/4"
    assert format_step_line({"step": 2, "effective_batch": 3, "batch_fill": "nan"}) == "step 2 | eff 3"
    # failed searches are named (they reached the policy as error observations)
    assert format_step_line({"step": 5, "retriever/failed_queries": 3, "retriever/queries": 40,
                             "retriever/timeouts": 2}) == "step 5 | retrieval failed 3/40 queries (2 timeouts)"
    assert format_step_line({"step": 5, "retriever/failed_queries": 0, "retriever/queries": 40}) == "step 5"


def test_timer_accumulates_per_phase(monkeypatch):
    ticks = iter([10.0, 11.5, 20.0, 20.25, 30.0, 32.0])
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(ticks))
    t = Timer()
    with t("rollout"):
        pass
    with t("rollout"):
        pass
    with pytest.raises(KeyError):
        with t("train"):
            raise KeyError("boom")  # a failing phase still counts its time
    assert t.metrics() == {"time/rollout": 1.75, "time/train": 2.0}
    t.reset()
    assert t.metrics() == {}


def test_write_pool_history_matches_the_pool(tmp_path):
    pool = _pool_after(5)
    table = pool.history_table()
    path = write_pool_history(tmp_path, table)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 8
    for c in ("query", "step", "successes", "k"):
        assert [int(r[c]) for r in rows] == table[c].tolist()
    assert [("hard", "signal", "easy").index(r["state"]) for r in rows] == table["state"].tolist()
    q = int(table["query"][0])
    assert [(int(r["step"]), int(r["successes"]), int(r["k"])) for r in rows if int(r["query"]) == q] == pool.history(q)
    with pytest.raises(ValueError, match=r"lacks columns \['k', 'state'\]"):
        write_pool_history(tmp_path, {"query": [1], "step": [0], "successes": [1]})
    with pytest.raises(ValueError, match="differ in length"):
        write_pool_history(tmp_path, {"query": [1, 2], "step": [0], "successes": [1], "k": [4], "state": [1]})
    with pytest.raises(ValueError, match=r"states must be 0..2 \(hard, signal, easy\), got \[3\]"):
        write_pool_history(tmp_path, {"query": [1], "step": [0], "successes": [1], "k": [4], "state": [3]})


def test_memory_metrics_are_plausible():
    # In a fresh interpreter: inside pytest, earlier tests leave freed heap that a new tensor can
    # reuse without the resident set growing.
    code = (
        "import json, torch\n"
        "from megatron_recycle.train import metrics as M\n"
        "m = M.memory_metrics()\n"
        "ballast = torch.ones(64 * 2**20, dtype=torch.uint8)\n"
        "ballast.add_(1)\n"
        "print(json.dumps([m, M.memory_metrics()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    m, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["memory/rss_gib"] > 0.01 and m["memory/max_rss_gib"] > 0.01  # statm and rusage count slightly differently
    assert after["memory/max_rss_gib"] >= m["memory/max_rss_gib"]
    assert after["memory/rss_gib"] > m["memory/rss_gib"] + 0.04  # the 64 MiB show up


def test_a_second_phase_gets_its_own_file_and_tensorboard_run(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.log(0, {"reward_mean": 0.5})
    with MetricsWriter(tmp_path, filename="sft_metrics.jsonl") as w:
        w.log(0, {"loss": 2.0})
    assert _lines(tmp_path / "metrics.jsonl")[0]["reward_mean"] == 0.5
    assert _lines(tmp_path / "sft_metrics.jsonl")[0]["loss"] == 2.0
    assert not (tmp_path / "metrics.jsonl.old").exists()
    assert any((tmp_path / "tensorboard" / "sft_metrics").glob("events.out.tfevents.*"))
