"""tools/bench_kernels.py runs end to end at tiny sizes (no timing is asserted, only that every row ran)."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


@pytest.mark.parametrize("impls", [["torch", "eager"], ["triton", "triton-inplace", "liger"]])
def test_bench_script_runs(impls, tmp_path, triton_device, monkeypatch):
    from megatron_recycle_kernels import logprobs

    for knob in ("STATS_BLOCK_V", "STATS_WARPS", "STATS_STAGES", "GRAD_BLOCK_V", "GRAD_WARPS", "GRAD_STAGES",
                 "MAX_BLOCK_V"):  # the settings flags below change the module: put them back afterwards
        monkeypatch.setattr(logprobs, knob, getattr(logprobs, knob))
    if "liger" in impls and importlib.util.find_spec("liger_kernel") is None:
        impls = [i for i in impls if i != "liger"]
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
    if "triton" in impls:  # the sweep's choices, as tools/gpu_checks.sh hands them over
        argv += ["--stats-config", "64:2", "--grad-config", "8192:2:3"]
    assert bench.main(argv) == 0
    if "triton" in impls:
        meta = json.loads(Path(f"{out}_{triton_device.type}.json").read_text())["meta"]
        assert (meta["stats_kernel"], meta["grad_kernel"]) == ("64:2:None", "8192:2:3"), meta
        assert logprobs.MAX_BLOCK_V == 8192  # lifted, so that the wider gradient block applies
    rows = list(csv.DictReader(open(f"{out}_{triton_device.type}.csv")))
    assert rows and not [r for r in rows if r["error"]], rows
    if triton_device.type == "cpu":  # launch counts, host issue and graph times are CUDA's only
        assert all(r["launches"] == r["host_ms"] == r["graph_ms"] == "" for r in rows), rows
    else:
        assert all(int(r["launches"]) >= 1 and float(r["host_ms"]) > 0 for r in rows), rows
        # the fused loss has no host sync, nor has token_logprobs with validate_targets=False (the
        # benchmark's, and the trainer's, setting), so their forward+backward replay from a CUDA graph
        graphed = {("grpo_loss", "triton"), ("token_logprobs", "triton")}
        assert all(float(r["graph_ms"]) > 0 for r in rows if (r["case"], r["impl"]) in graphed), rows
    got = {(r["case"], r["impl"]) for r in rows}
    if "triton" in impls:
        assert ("grpo_loss", "triton") in got and ("chunked_logprobs", "chunked-triton") in got
        assert ("logits->grpo_loss", "triton-inplace") in got
    if "liger" in impls:
        assert ("logits->grpo_loss", "liger") in got
    if "eager" in impls:
        assert ("token_logprobs", "eager") in got
    if "triton" in impls or "torch" in impls:
        assert {c for c, _ in got if c.startswith("advantages")} == {
            "advantages-contiguous", "advantages-ragged", "advantages-ragged-sorted"}


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_device_activities_leave_out_user_ranges():
    """torch.optim's Optimizer.step record_function (and Inductor's ranges) show on the device's
    timeline as user annotations: counting them would count their kernels' time twice."""
    from types import SimpleNamespace

    import torch

    bench = _bench_module()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    assert bench.is_device_activity(SimpleNamespace(device_type=cuda, is_user_annotation=False))
    assert bench.is_device_activity(SimpleNamespace(device_type=cuda))  # a torch without the flag
    assert not bench.is_device_activity(SimpleNamespace(device_type=cuda, is_user_annotation=True))
    assert not bench.is_device_activity(SimpleNamespace(device_type=cpu, is_user_annotation=False))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_time_never_captures_a_call_with_a_host_sync():
    """A call with a host sync is found before any capture (a capture it invalidated would leave
    torch 2.11's allocator in capture mode for the rest of the process): no graph time, and the
    next call's capture and the allocator work as before."""
    import torch

    bench = _bench_module()
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev)
    assert bench.graph_ms(lambda: x.sum().item(), dev, 2, 1) is None
    assert bench.graph_ms(lambda: torch.nonzero(x > 0), dev, 2, 1) is None
    assert torch.cuda.current_stream(dev) == torch.cuda.default_stream(dev)
    before = torch.cuda.memory_reserved(dev)
    y = torch.empty(1 << 26, device=dev)
    del y
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved(dev) <= before  # empty_cache frees again
    assert bench.graph_ms(lambda: (x * 2).sum(), dev, 3, 1) > 0


def test_targets_are_judged_from_the_rows():
    bench = _bench_module()
    size4m, size1m = f"tokens={1 << 22}", f"tokens={1 << 20}"
    lg = "tokens=4096,V=151936"
    ch = "tokens=4096,V=151936,H=2048,chunk=4096"
    rows = [
        dict(case="grpo_loss", size=size4m, impl="triton", fwd_bwd_ms=1.0, pct_of_copy=85.0),
        dict(case="grpo_loss", size=size4m, impl="eager", fwd_bwd_ms=4.0, pct_of_copy=20.0),  # only 4x
        dict(case="grpo_loss", size=size1m, impl="triton", fwd_bwd_ms=0.3, pct_of_copy=50.0),  # < 4M: no target
        dict(case="logits->grpo_loss", size=lg, impl="triton", fwd_bwd_ms=2.0, peak_extra_mib=100.0),
        dict(case="logits->grpo_loss", size=lg, impl="liger", fwd_bwd_ms=2.5, peak_extra_mib=150.0),
        dict(case="logits->grpo_loss", size=lg, impl="triton-inplace", fwd_bwd_ms=2.6, peak_extra_mib=10.0),
        dict(case="chunked_logprobs", size=ch, impl="chunked-triton", peak_extra_mib=300.0),
        dict(case="chunked_logprobs", size=ch, impl="naive", peak_extra_mib=1000.0),  # 300 > 250
        dict(case="token_logprobs", size=lg, impl="triton", error="RuntimeError()"),
    ]
    got = {t["target"].split(":")[0]: t["met"] for t in bench.check_targets(rows)}
    assert got == {
        f"grpo_loss fwd+bwd {size4m}": False,
        f"logits->loss {lg}": True,
        f"logits->loss {lg} (in place)": False,  # less memory, but slower
        f"chunked log-probs {ch}": False,
    }
    loss_target = next(t for t in bench.check_targets(rows) if t["target"].startswith("grpo_loss"))
    assert "graph" not in loss_target["measured"]
    rows[0].update(pct_of_copy_device=40.0, pct_of_copy_graph=30.0)
    loss_target = next(t for t in bench.check_targets(rows) if t["target"].startswith("grpo_loss"))
    assert loss_target["measured"] == ("85.0% of copy (40.0% over the device's busy time alone; "
                                       "30.0% replayed from a CUDA graph), 4.0x eager")
    assert loss_target["met"] is False  # judged on the event time and the speed-up, as before
    rows[1]["fwd_bwd_ms"] = 5.0
    rows[5]["fwd_bwd_ms"] = 2.4
    rows[7]["peak_extra_mib"] = 1300.0
    assert all(t["met"] for t in bench.check_targets(rows))
    assert bench.check_targets([r for r in rows if r["impl"] != "eager"])[0]["met"] is None  # no eager row


def test_time_budget_stops_before_the_next_case_and_keeps_the_files(tmp_path):
    bench = _bench_module()
    out = tmp_path / "k"
    argv = ["--device", "cpu", "--impls", "torch", "--cases", "advantages", "loss", "--tokens", "4096",
            "--rollouts", "64", "--reps", "1", "--warmup", "0", "--max-seconds", "0", "--out", str(out)]
    assert bench.main(argv) == 0

    data = json.loads(Path(f"{out}_cpu.json").read_text())
    assert data["rows"] == [] and len(data["meta"]["not_run"]) == 4  # 3 advantages layouts + 1 loss size


def test_the_sweep_runs_every_configuration_and_checks_it(tmp_path, triton_device):
    """tools/sweep_kernels.py at tiny sizes: every statistics-kernel configuration runs and its
    log-sum-exp, entropy and target logit agree with the fp32 PyTorch computation; every gradient
    kernel configuration agrees with the fp32 gradient to a bf16 rounding step, and the sweep puts
    the module's settings back (MAX_BLOCK_V too, which it lifts for a width above it)."""
    import sys

    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("sweep_kernels", BENCH.parent / "sweep_kernels.py")
        sweep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sweep)
    finally:
        sys.path.remove(str(BENCH.parent))
    from megatron_recycle_kernels import logprobs

    grad_block, max_block = logprobs.GRAD_BLOCK_V, logprobs.MAX_BLOCK_V
    out = tmp_path / "s"
    argv = ["--device", triton_device.type, "--tokens", "5", "--vocab", "300", "--loss-tokens", "512",
            "--configs", "64:4", "128:1:2", "--grad-configs", "64:2", "8192:8", "--loss-configs", "2048:4:1", "16:1:3", "16:2:2:1", "16:1:1:0:16:2",
            "--reps", "1", "--warmup", "0", "--out", str(out)]
    assert sweep.main(argv) == 0
    data = json.loads(Path(f"{out}_{triton_device.type}.json").read_text())
    assert [(r["block_v"], r["warps"], r["stages"], r["entropy"]) for r in data["stats"]] == [
        (64, 4, None, False), (64, 4, None, True), (128, 1, 2, False), (128, 1, 2, True)]
    for r in data["stats"]:
        assert "error" not in r, r
        assert max(r["err_lse"], r["err_target"]) < 1e-4, r
        assert (r["err_entropy"] < 1e-4) if r["entropy"] else r["err_entropy"] is None, r
    assert [(r["block_v"], r["warps"], r["stages"]) for r in data["grad"]] == [(64, 2, None), (8192, 8, None)]
    for r in data["grad"]:
        assert "error" not in r and r["err_grad"] < 1e-2, r
    assert (logprobs.GRAD_BLOCK_V, logprobs.MAX_BLOCK_V) == (grad_block, max_block)
    assert [(r["block_t"], r["tiles"], r["joint"], r["finish_rows"]) for r in data["loss"]] == [
        (2048, 1, 0, 512), (16, 3, 0, 512), (16, 2, 1, 512), (16, 1, 0, 16)]
    for r in data["loss"]:
        assert "error" not in r and r["tokens"] == 512, r
        assert r["err_loss"] < 1e-5 and r["err_grad"] < 2e-2, r  # bf16 gradient: about one ulp
    with pytest.raises(SystemExit):
        sweep.main(["--configs", "wide:4"])
    with pytest.raises(SystemExit):
        sweep.main(["--configs", "100:4"])  # not a power of two
    with pytest.raises(SystemExit):
        sweep.main(["--grad-configs", "2048"])
    # too short, joint not 0/1, not a power of two, finish warps missing, finish rows not a power of two
    for bad in ("2048:4", "2048:4:1:2", "1000:4:1", "2048:4:1:0:512", "2048:4:1:0:500:4"):
        with pytest.raises(SystemExit):
            sweep.main(["--loss-configs", bad])
    with pytest.raises(SystemExit):  # the benchmark takes the sweep's settings in the same form
        _bench_module().main(["--stats-config", "2048"])
    with pytest.raises(SystemExit):
        _bench_module().main(["--grad-config", "3000:4"])


def test_host_overhead_tool_stubs_the_launches_and_restores_them(tmp_path):
    """tools/bench_host_overhead.py times our wrappers with every Triton launch replaced by a no-op
    (counted: 3 per forward+backward of grpo_loss, 2 of token_logprobs on one rank, whose forward
    merges its statistics in the same launch), and puts the kernels back afterwards."""

    from megatron_recycle_kernels import buffers, policy_loss

    spec = importlib.util.spec_from_file_location("bench_host_overhead", BENCH.parent / "bench_host_overhead.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    kernel, compiled = policy_loss._grpo_loss_fwd_kernel, buffers.compiled
    assert tool.main(["--reps", "3", "--warmup", "1", "--out", str(tmp_path / "h")]) == 0
    rows = json.loads((tmp_path / "h.json").read_text())["rows"]
    assert [(r["op"], r["kind"], r["launches"]) for r in rows] == [
        ("grpo_loss", "fwd", 2), ("grpo_loss", "fwd+bwd", 3), ("token_logprobs", "fwd", 1),
        ("token_logprobs", "fwd+bwd", 2), ("token_logprobs, unvalidated", "fwd", 1),
        ("token_logprobs, unvalidated", "fwd+bwd", 2)]
    assert all(r["wrapper_us"] > 0 for r in rows)
    assert policy_loss._grpo_loss_fwd_kernel is kernel and buffers.compiled is compiled
