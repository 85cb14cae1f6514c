"""tools/bench_packing.py runs end to end on a small group (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_packing_writes_both_mask_kinds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / "tools" / "bench_packing.py"), "--k", "3", "--prompt", "8", "--members", "16",
           "--repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_packing_layout.json").read_text())["rows"]
    assert (tmp_path / "bench_packing_layout.csv").is_file()
    dense, light = rows
    assert (dense["mask"], light["mask"]) == ("dense", "plan-only")
    assert dense["width"] == light["width"] == (8 - 1) + 3 * (16 + 1)  # the last prompt token is repeated per member
    assert dense["mask_mib"] * 2**20 == dense["width"] ** 2 and light["mask_mib"] * 2**20 == 1
    # the plan: prefix block (q, k, pos, sel: 7 positions each) + one member block of 3 x 17 queries
    # (q, pos, sel) and 3 x (7 + 17) keys, + both blocks' positions joined (7 + 3 x 17), int64
    assert dense["plan_mib"] == light["plan_mib"] == 8 * (4 * 7 + 3 * 3 * 17 + 3 * 24 + 7 + 3 * 17) / 2**20
    assert "plan-only" in proc.stdout


def test_bench_packing_attention_counts_the_pairs(tmp_path):
    """--attention: padded causal rows vs the group plan (this device's route, and one masked call
    per block); the positions and query-key pairs each computes are counted from the layout (no
    timing is asserted, only that all three were timed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / "tools" / "bench_packing.py"), "--attention", "--k", "3", "--prompt", "8",
           "--members", "16", "--repeats", "1", "--heads", "2", "--head-dim", "8", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "bench_packing_attention.json").read_text())["rows"]
    assert (tmp_path / "bench_packing_attention.csv").is_file()
    assert row["padded_positions"] == 3 * 24 and row["packed_positions"] == 7 + 3 * 17
    assert row["padded_pairs"] == 3 * 24 * 25 // 2
    assert row["plan_pairs"] == 7 * 8 // 2 + 3 * (17 * 7 + 17 * 18 // 2)  # shared prefix once; members see it
    assert row["padded_fwd_bwd_s"] > 0 and row["plan_fwd_bwd_s"] > 0 and row["plan_bool_mask_fwd_bwd_s"] > 0
    assert row["plan_route"] == "split"  # the CPU's route for the members' blocks
    assert (row["device"], row["dtype"], row["kv_heads"]) == ("cpu", "fp32", 2)
    assert row["plan_launches"] is None  # device activities are counted on CUDA only


def test_bench_packing_attention_with_grouped_query_heads(tmp_path):
    """--kv-heads: fewer key/value heads go through the model's own handling (the CPU kernels read
    them shared); a --kv-heads that does not divide --heads is refused, and so is a missing CUDA."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, str(ROOT / "tools" / "bench_packing.py"), "--attention", "--k", "2", "--prompt", "6",
            "--members", "10", "--repeats", "1", "--heads", "4", "--head-dim", "8", "--out", str(tmp_path)]
    proc = subprocess.run(base + ["--kv-heads", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "bench_packing_attention.json").read_text())["rows"]
    assert (row["heads"], row["kv_heads"]) == (4, 2) and row["plan_fwd_bwd_s"] > 0
    bad = subprocess.run(base + ["--kv-heads", "3"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "must be >= 1 and divide --heads 4" in bad.stderr
    if not __import__("torch").cuda.is_available():
        nocuda = subprocess.run(base + ["--device", "cuda"], capture_output=True, text=True, env=env, cwd=ROOT,
                                timeout=300)
        assert nocuda.returncode != 0 and "no CUDA device" in nocuda.stderr


def test_bench_packing_attention_keeps_the_other_forms_when_one_fails(monkeypatch):
    """A plan route that fails (one never run on that device before) is recorded in its row; the
    padded reference and the other forms are still timed and written."""
    import importlib.util

    from megatron_recycle.model import attention

    spec = importlib.util.spec_from_file_location("bench_packing_mod", ROOT / "tools" / "bench_packing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real = attention.group_attention

    def flaky(plan, q, k, v, scale, route=None):
        if route == "bool-mask":
            raise RuntimeError("no kernel image for this device (test)")
        return real(plan, q, k, v, scale) if route is None else real(plan, q, k, v, scale, route=route)

    monkeypatch.setattr(attention, "group_attention", flaky)
    row = mod._attention_case(2, 6, 10, 2, 8, 1, 2, "cpu", "fp32")
    assert row["plan_bool_mask_fwd_bwd_s"] is None and "plan_bool_mask: RuntimeError: no kernel image" in row["errors"]
    assert row["padded_fwd_bwd_s"] > 0 and row["plan_fwd_bwd_s"] > 0
