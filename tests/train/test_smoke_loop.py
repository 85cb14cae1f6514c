"""tools/smoke_loop.py: the GRPO loop end to end at toy scale, what a lent GPU runs as its step "loop".

Here it runs on the CPU (fp32; the varlen route as its emulation). Its pass criteria are checked
against broken runs too, so that a smoke run that trains nothing or fails to resume cannot pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("mr_smoke_loop", ROOT / "tools" / "smoke_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_smoke_loop_runs_the_loop_resumes_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGATRON_RECYCLE_PACKED_ATTENTION")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "tools" / "smoke_loop.py"), "--out", str(out), "--varlen",
           "--json", str(tmp_path / "loop.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout
    res = json.loads((tmp_path / "loop.json").read_text())
    assert res["passed"] and res["problems"] == [] and res["cuda"] is False and res["bf16"] is False
    assert [c["name"] for c in res["commands"]] == ["run", "resume", "resume_varlen"]
    assert all(c["rc"] == 0 and c["seconds"] > 0 for c in res["commands"])
    assert [r["step"] for r in res["metrics"]] == [0, 1, 2, 3]
    assert set(res["test_pass@1"]) == {"untrained", "after_sft", "after_grpo"}
    logs = {p.stem: p.read_text() for p in (out / "logs").glob("*.log")}
    assert set(logs) == {"run", "resume", "resume_varlen"}
    assert "packed groups, attention varlen (MEGATRON_RECYCLE_PACKED_ATTENTION)" in logs["resume_varlen"]
    assert "attention varlen" not in logs["run"] + logs["resume"]


def test_smoke_loop_deadline_stops_in_time_and_keeps_what_ran(tmp_path):
    # a GPU step's limit must never find the results missing: the deadline stops the command that
    # runs out of it, the log holds what it printed, and loop.json says what happened
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGATRON_RECYCLE_PACKED_ATTENTION")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "work"
    # the model written first, outside the deadline (as GPU_CHECKS.md does): on a loaded 2-core
    # machine writing it took most of the 12 s, and the run got 1-2 s, too few to print anything
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(ROOT / "tools" / "smoke_loop.py"), "--write-model", str(model)],
                   capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True)
    cmd = [sys.executable, str(ROOT / "tools" / "smoke_loop.py"), "--out", str(out), "--deadline", "12",
           "--model", str(model), "--json", str(tmp_path / "loop.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "loop.json").read_text())
    assert [(c["name"], c["rc"]) for c in res["commands"]][0] == ("run", 124) and not res["passed"]
    assert all(c["seconds"] < 20 for c in res["commands"])
    # the stopped command's log: what it printed while it ran (streamed), then the stop
    log = (out / "logs" / "run.log").read_text()
    assert "resolved config" in log and "[smoke] run: stopped after" in log


def test_smoke_loop_refuses_to_empty_a_folder_it_did_not_make(tmp_path, capsys):
    keep = tmp_path / "mine.txt"
    keep.write_text("user data")
    assert _tool().main(["--out", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert keep.read_text() == "user data"
    assert "not a smoke-loop work folder" in capsys.readouterr().err


def _record(name: str, rc: int = 0, output: str = "", resumed_at: int | None = None) -> dict:
    c = {"name": name, "rc": rc, "output": output, "seconds": 1.0, "args": []}
    if resumed_at is not None:
        c["resumed_at"] = resumed_at
    return c


def test_smoke_loop_check_finds_every_kind_of_failure(tmp_path):
    tool = _tool()
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    good_rows = [{"step": s, "train/loss": 0.1, "train/grad_norm": 1.0, "effective_batch": 2} for s in range(3)]
    (run_dir / "report.json").write_text(json.dumps({"test_pass@1": {"untrained": 0.0, "after_sft": 0.25,
                                                                      "after_grpo": 0.5}}))
    resumed = f"[train] resumed from {run_dir / 'checkpoints'} step 2\n"
    ok = [_record("run"), _record("resume", output=resumed, resumed_at=2)]

    def problems(rows, commands=ok):
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tool.check(commands, run_dir, 3)

    assert problems(good_rows) == []
    assert problems(good_rows, [_record("run", rc=1), ok[1]]) == ["run: exit 1"]
    assert problems(good_rows[:2]) == ["metrics.jsonl steps [0, 1], expected [0, 1, 2]"]
    assert problems([good_rows[0], good_rows[2], good_rows[1]])[0].startswith("metrics.jsonl steps [0, 2, 1]")
    nan = [dict(good_rows[0], **{"train/loss": float("nan")}), *good_rows[1:]]
    assert problems(nan) == ["step 0: train/loss = nan"]
    assert problems([*good_rows[:2], dict(good_rows[2], effective_batch=0)]) == [
        "step 2: empty effective batch (nothing trained)"]
    assert problems(good_rows, [ok[0], _record("resume", output="[train] started afresh", resumed_at=2)]) == [
        "resume: no '[train] resumed from ... step 2' in its output"]
    varlen = _record("resume_varlen", output=resumed.replace("step 2", "step 3") + "packed groups, attention split",
                     resumed_at=3)
    assert problems(good_rows, [*ok, varlen]) == [
        "resume_varlen: its start line does not say 'packed groups, attention varlen'"]
    (run_dir / "report.json").unlink()
    assert problems(good_rows) == ["no report.json"]


def test_the_final_table_prints_a_step_without_an_effective_batch():
    # an empty effective batch logs recycled_share "nan" (a string in metrics.jsonl): the table is
    # what a GPU run's failure is diagnosed from, so it must print, not raise
    tool = _tool()
    line = tool.step_row({"step": 1, "effective_batch": 0, "recycled_share": "nan", "train/loss": 0.5})
    assert line.split() == ["1", "0", "nan", "0.5", "nan", "nan"]
    assert tool.step_row({"step": 0}).split() == ["0", "?", "nan", "nan", "nan", "nan"]
