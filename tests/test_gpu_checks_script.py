"""tools/gpu_checks.sh, the prepared one-call check of a GPU session, as far as a CPU can run it:
its set-up (the packages importable from its site folder) and its step selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_checks.sh"


def _run(tmp_path: Path, budget: int = 300, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "out"
    wheels = tmp_path / "no_wheels"
    wheels.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECKS_")}
    full_env.update(
        OUT=str(out),
        PYTHON=sys.executable,
        GPU_CHECKS_WHEELS=str(wheels),
        GPU_CHECKS_SITE=str(tmp_path / "site"),
        **env,
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(budget)], capture_output=True, text=True, env=full_env, timeout=240
    )
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return proc, summary


def test_unknown_step_is_refused(tmp_path):
    proc, summary = _run(tmp_path, GPU_CHECKS_STEPS="tests_model bench_everything")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown step 'bench_everything'" in summary
    assert "START" not in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU the script stops after its set-up")
def test_dry_run_without_a_gpu_sets_up_and_runs_nothing(tmp_path):
    proc, summary = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device visible" in summary
    assert "START" not in summary
    assert "SKIP  bench_recompute" not in summary  # the dry run stops before the steps
    # our two import packages come from the site folder's links (never from the checkout's root)
    assert "megatron_recycle_kernels: ok" in summary and "megatron_recycle: 0.1.0" in summary, summary
    site = tmp_path / "site"
    assert (site / "megatron_recycle").resolve() == ROOT / "megatron_recycle"
    assert (site / "megatron_recycle_kernels").resolve() == ROOT / "kernels"


def test_steps_not_selected_are_skipped(tmp_path):
    # GPU_CHECKS_ON_CPU=1 runs the steps on the CPU; a budget under the 30 s a step needs lets the
    # selected step go for lack of time, so that nothing runs, and each step says why it did not
    proc, summary = _run(tmp_path, budget=20, GPU_CHECKS_ON_CPU="1", GPU_CHECKS_STEPS="tests_kernels")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("bench_kernels", "bench_step", "bench_recompute", "bench_packed", "tests_model"):
        assert summary.count(f"SKIP  {name}: not in GPU_CHECKS_STEPS") == 1  # said once, bench_packed's two runs too
    assert "SKIP  tests_kernels: " in summary and "of the budget left" in summary
    assert "START" not in summary


@pytest.mark.parametrize("name", ["bench_recompute", "bench_packed"])
def test_optional_step_runs_only_when_named(tmp_path, name):
    proc, summary = _run(tmp_path, budget=20, GPU_CHECKS_ON_CPU="1", GPU_CHECKS_STEPS=name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unknown step" not in summary
    assert f"SKIP  {name}: " in summary and "of the budget left" in summary
    assert "SKIP  bench_step: not in GPU_CHECKS_STEPS" in summary


def test_failures_can_be_reported_the_moment_they_happen(monkeypatch):
    """tests/conftest.py writes a failure's report to stderr at once when MR_REPORT_FAILURES_AT_ONCE=1
    (gpu_checks.sh sets it), and only in the controller under pytest-xdist."""
    import io
    import sys
    from types import SimpleNamespace

    from tests import conftest

    rep = SimpleNamespace(failed=True, when="call", nodeid="tests/x.py::test_y", longreprtext="E  boom")
    for env, worker, expect in [("1", None, True), ("1", "gw0", False), (None, None, False)]:
        err = io.StringIO()
        monkeypatch.setattr(sys, "__stderr__", err)
        for k, v in (("MR_REPORT_FAILURES_AT_ONCE", env), ("PYTEST_XDIST_WORKER", worker)):
            monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
        conftest.pytest_runtest_logreport(rep)
        assert ("FAILED (call) tests/x.py::test_y" in err.getvalue() and "E  boom" in err.getvalue()) == expect
    monkeypatch.setenv("MR_REPORT_FAILURES_AT_ONCE", "1")
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    err = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", err)
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, when="call", nodeid="t", longreprtext=""))
    assert err.getvalue() == ""
