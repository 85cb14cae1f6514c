"""tools/bench_kernels.py runs end to end at tiny sizes (no timing is asserted, only that every row ran)."""

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


@pytest.mark.parametrize("impls", [["torch", "eager"], ["triton", "liger"]])
def test_bench_script_runs(impls, tmp_path, triton_device):
    if "liger" in impls and importlib.util.find_spec("liger_kernel") is None:
        impls = ["triton"]
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "k"
    argv = [
        "--device",
        triton_device.type,
        "--impls",
        *impls,
        "--tokens",
        "4096",
        "--logit-tokens",
        "32",
        "--vocab",
        "256",
        "--hidden",
        "16",
        "--chunk",
        "8",
        "--rollouts",
        "64",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    rows = list(csv.DictReader(open(f"{out}_{triton_device.type}.csv")))
    assert rows and not [r for r in rows if r["error"]], rows
    got = {(r["case"], r["impl"]) for r in rows}
    if "triton" in impls:
        assert ("grpo_loss", "triton") in got and ("chunked_logprobs", "chunked-triton") in got
    if "liger" in impls:
        assert ("logits->grpo_loss", "liger") in got
    if "eager" in impls:
        assert ("token_logprobs", "eager") in got
