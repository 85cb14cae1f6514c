"""tools/bench_step.py runs end to end under torchrun on a tiny model (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bench_step_under_torchrun_writes_its_phases(tmp_path):
    # --sequences, not --n: under torchrun, torchrun's own parser rejects "--n" as an ambiguous prefix
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(ROOT / "tools" / "bench_step.py"), "--model", "tiny", "--sequences", "4", "--seq-len", "32",
           "--mbs", "2", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--tag", "t.1",
           "--recompute", "full", "--recompute-method", "block", "--recompute-num-layers", "2",
           "--overlap-grad-reduce", "--bucket-size", "20000", "--min-len-frac", "0.5",
           "--group-size", "2", "--no-pack", "--profile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_step_tiny_4x32_t.1.json").read_text())  # a dot in the name (qwen3-1.7b) stays
    # --profile: one more step under torch.profiler; on a CPU the aten ops it dispatched, the costliest first
    prof = result["profile"]
    assert prof["wall_s"] > 0 and prof["aten_ops"] > 100 and "device_activities" not in prof
    assert len(prof["top"]) == 12 and all(name.startswith("aten::") and count >= 1 for name, count, _ in prof["top"])
    assert prof["top"][0][2] >= prof["top"][-1][2]
    assert f"{prof['aten_ops']} aten ops dispatched" in proc.stdout
    assert (tmp_path / "bench_step_tiny_4x32_t.1.csv").is_file()
    assert result["n"] == 4 and result["seq_len"] == 32 and result["dp"] == 1
    # the step's host preparation (micro-batches, packed layouts) is a phase of its own, in the total
    assert set(result["time_s"]) == {"old_logprobs", "prepare", "forward_backward", "optimizer"}
    assert all(t > 0 for t in result["time_s"].values())
    assert result["step_time_s"] == sum(result["time_s"].values())
    assert re.search(r"^prepare +\d+\.\d+ +-$", proc.stdout, re.M), proc.stdout[-2000:]
    assert math.isfinite(result["loss_last"]) and result["grad_norm_last"] > 0
    assert "GRPO step: tiny" in proc.stdout
    options = result["memory_options"]
    assert re.fullmatch(r"full recomputation \(block, the first 2 layers of each stage\), "
                        r"overlapped grad reduction \((\d+) buckets\)", options), options
    assert result["overlap_grad_reduce"] is True and result["bucket_size"] == 20000
    assert options in proc.stdout
    # ragged rows: 16 to 32 tokens, the first one full length
    assert result["min_len_frac"] == 0.5 and result["length_grouping"] is True
    assert result["old_logprobs_positions"] == "loss"
    assert result["group_size"] == 2 and result["group_packing"] is False and result["packed_saved_tokens"] == 0
    assert "in groups of 2 (padded rows)" in proc.stdout
    assert 4 * 16 < result["real_tokens"] < 4 * 32 and "real tokens of 128" in proc.stdout


def test_bench_step_packs_groups_on_virtual_pipeline_stages(tmp_path):
    """PP 2 x VPP 2 (one layer of the tiny model per chunk): the packed micro-batches share one shape."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGATRON_RECYCLE_PACKED_ATTENTION")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tools" / "bench_step.py"), "--model", "tiny", "--sequences", "4", "--seq-len", "32",
           "--mbs", "2", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path),
           "--pp", "2", "--vpp", "2", "--group-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("bench_step_tiny_4x32_*_pp2vpp2_k2.json")
    result = json.loads(path.read_text())
    assert result["pp"] == 2 and result["vpp"] == 2 and result["dp"] == 1 and result["group_packing"] is True
    assert result["packed_saved_tokens"] > 0  # the groups' shared prompts were computed once
    route = "causal-bias" if torch.cuda.is_available() else "split"  # the device's default (the variable unset)
    assert math.isfinite(result["loss_last"]) and f"in groups of 2 (packed, attention route {route})" in proc.stdout
    assert result["packed_attention_route"] == route


def test_bench_step_measures_the_activations_of_the_layout_it_times(tmp_path):
    """--no-pack: the activation line is the padded rows', not the packed layout's (it was the
    packed one's for both, seen on the H200: 10.296 GiB twice)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGATRON_RECYCLE_PACKED_ATTENTION")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    got = {}
    for tag, extra in (("packed", []), ("padded", ["--no-pack"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(ROOT / "tools" / "bench_step.py"), "--model", "tiny", "--sequences", "4", "--seq-len", "64",
               "--mbs", "4", "--steps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path),
               "--tag", tag, "--group-size", "4", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        got[tag] = json.loads((tmp_path / f"bench_step_tiny_4x64_{tag}.json").read_text())
    assert got["packed"]["group_packing"] is True and got["padded"]["group_packing"] is False
    packed, padded = (got[t]["saved_activations_gib_per_microbatch"] for t in ("packed", "padded"))
    assert 0 < packed < padded  # the shared prompt kept once per group, not once per row
