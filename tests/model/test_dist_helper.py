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
