"""tools/bench_cpu_gemm.py on a tiny model shape: it checks results, prints, writes its files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_cpu_gemm", Path(__file__).parent.parent / "tools" / "bench_cpu_gemm.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_tiny_run_writes_table_and_files(tmp_path, capsys):
    rc = bench.main(["--threads", "1", "--rows", "3", "9", "--repeats", "1", "--hidden", "16", "--intermediate", "24",
                     "--qkv", "32", "--vocab", "50", "--layers", "2", "--out", str(tmp_path), "--stem", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    impls = {(r["rows"], r["impl"]) for r in res["rows"]}
    assert {(3, "w @ x.T"), (9, "F.linear")} <= impls
    if res["skinny_available"]:
        assert (9, "skinny") in impls
    assert (tmp_path / "t.csv").read_text().startswith("rows,impl,ms_per_step")
    assert "GB/s" in capsys.readouterr().out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "0"])
    assert "must be >= 1" in capsys.readouterr().err
