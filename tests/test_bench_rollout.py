"""tools/bench_rollout.py: argument checks (the measurement itself needs a trained policy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).parent.parent / "tools" / "bench_rollout.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_missing_policy_folder_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", str(tmp_path / "nope")])
    assert "run the README's main job first" in capsys.readouterr().err


def test_bad_counts_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", str(tmp_path), "--repeats", "0"])
    assert "--queries and --repeats must be >= 1" in capsys.readouterr().err
    a = bench.parse_args(["--model", str(tmp_path)])
    assert a.repeats == 3 and a.warmup == 1 and a.engines == "native"


def test_schedule_warms_up_untimed_and_alternates_the_order():
    got = bench.schedule(["store", "no store"], repeats=3, warmup=1)
    assert got == [(-1, "store", False), (-1, "no store", False),
                   (0, "no store", True), (0, "store", True),
                   (1, "store", True), (1, "no store", True),
                   (2, "no store", True), (2, "store", True)]
    assert [t for t in bench.schedule(["a"], repeats=2, warmup=0)] == [(0, "a", True), (1, "a", True)]
