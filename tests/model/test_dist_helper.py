"""tests/model/_dist.run_workers: a failing rank fails the call at once, with its output."""

import time
from pathlib import Path

import pytest

from ._dist import run_workers

PROBE = Path(__file__).with_name("_dist_probe.py")


def test_a_failing_rank_stops_its_peers(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 gives up"):
        run_workers(f"{PROBE}:rank1_fails", 2, tmp_path, timeout=100)
    assert time.monotonic() - t0 < 60  # not the peer's 120 s, not the 100 s timeout


def test_every_rank_returns_its_result(tmp_path):
    assert run_workers(f"{PROBE}:all_ok", 2, tmp_path) == [{"rank": r, "world": 2, "env_rank": r} for r in range(2)]


def test_a_hang_is_reported_with_every_ranks_output(tmp_path, monkeypatch):
    # MR_DIST_TIMEOUT_S caps the launcher's wait (tools/gpu_checks.sh sets it below its step limit)
    monkeypatch.setenv("MR_DIST_TIMEOUT_S", "3")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 0 got this far.*rank 1 got this far"):
        run_workers(f"{PROBE}:print_then_hang", 2, tmp_path / "a", timeout=100)
    assert time.monotonic() - t0 < 30


def test_an_interrupted_wait_still_reports_the_ranks_output(tmp_path, monkeypatch):
    # what pytest-timeout's exception does to the wait: the ranks are stopped and their output is
    # in the report, instead of a bare "Timeout"
    from tests.train import _dist as train_dist

    class Interrupted(BaseException):
        pass

    def wait_then_interrupt(procs, timeout):
        time.sleep(2)
        raise Interrupted("Timeout (>90s)")

    monkeypatch.setattr(train_dist, "wait_for_ranks", wait_then_interrupt)
    with pytest.raises(AssertionError, match=r"(?s)interrupted \(Interrupted: Timeout.*rank 0 got this far") as e:
        run_workers(f"{PROBE}:print_then_hang", 2, tmp_path / "b", timeout=100)
    assert isinstance(e.value.__cause__, Interrupted)
