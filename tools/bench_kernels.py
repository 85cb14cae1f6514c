"""Benchmark the RL kernels against PyTorch eager, torch.compile and liger-kernel; print a table, write CSV/JSON.

    .venv/bin/python tools/bench_kernels.py                 # sizes for the device found
    .venv/bin/python tools/bench_kernels.py --cases loss --tokens 4194304 16777216

Every case is timed for the forward and forward+backward (median of --reps after --warmup), with
achieved GB/s from a bytes-that-must-move model (inputs read, gradients written; see `bytes_*`
below) set against a measured device-to-device copy bandwidth, and peak extra memory over the
inputs (CUDA: max_memory_allocated; CPU: peak RSS through /proc/self/status VmHWM, reset with
/proc/self/clear_refs), and on CUDA the GPU activities one forward+backward launches (kernels,
copies, fills: torch.profiler; the `launches` column, empty on a CPU) with the time the device is
busy in them (`dev ms`, and `%copy dev`, the bytes over that time: what the kernels achieve without
the host's time between launches, which the event-timed columns include), the host's own time to
issue one call (`host ms`: Python, autograd and the launches, the device idle at the start; close to
the event time means host-bound), and the time of one replay from a CUDA graph (`graph ms`, `%copy
graph`: the launches without the host in between; empty where the call cannot be captured, e.g. a
host sync inside; `--no-graphs` skips it). On a machine without CUDA
only the PyTorch paths run (the Triton kernels would need the interpreter, whose timings mean
nothing) and the output says so.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import triton
except ImportError:  # pragma: no cover - the PyTorch paths still run
    triton = None
from megatron_recycle_kernels import chunked_token_logprobs, grpo_advantages, grpo_loss, token_logprobs
from megatron_recycle_kernels import logprobs as logprobs_mod
from megatron_recycle_kernels import reference as R

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(dev)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def gpu_activities(fn: Callable[[], object], dev: torch.device) -> list[tuple[str, float]]:
    """(name, device ms) of every GPU activity (kernel, memcpy, memset) that one call of fn puts on
    the CUDA device, from torch.profiler, after one unprofiled call (no compilation counted)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(dev)
    return [(e.name, e.time_range.elapsed_us() / 1e3) for e in prof.events() if is_device_activity(e)]


def is_device_activity(e: object) -> bool:
    """A profiler event that is work on the CUDA device (kernel, memcpy, memset), not a user range
    that Kineto mirrors onto the device's timeline (record_function, e.g. torch.optim's
    ``Optimizer.step#AdamW.step`` or Inductor's ranges: ``is_user_annotation``), which would count
    the time of the kernels inside it twice."""
    return e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)


def cuda_activity(fn: Callable[[], object], dev: torch.device) -> tuple[int | None, float | None]:
    """How many GPU activities one call of fn launches and the time the device is busy in them (ms).
    The count shows the launches that cost a visible share of a bandwidth-bound op at a few million
    tokens; the device time leaves out the host's time between launches (Python, autograd, Triton's
    launcher), which the event-timed columns include and a trainer hides behind the GPU work already
    queued. (None, None) off CUDA (a CPU runs no kernels) or when the profiler fails (said once; the
    row keeps its timings)."""
    if dev.type != "cuda":
        return None, None
    try:
        acts = gpu_activities(fn, dev)
    except Exception as e:  # a count is a detail: never lose the timings over it
        if not getattr(cuda_activity, "warned", False):
            print(f"(launch counts unavailable: {e!r})"[:200])
            cuda_activity.warned = True
        return None, None
    return len(acts), sum(ms for _, ms in acts)


def host_issue_ms(fn: Callable[[], object], dev: torch.device, reps: int) -> float | None:
    """Median host time to issue one call of fn on CUDA, the device idle at the start of each and
    not waited for at the end: the Python, autograd and kernel-launch cost that the event-timed
    columns include. Where it is close to the event time, the op is host-bound at that size.
    None off CUDA (there the wall time is all host time)."""
    if dev.type != "cuda":
        return None
    times = []
    for _ in range(max(1, reps)):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(dev)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int) -> float | None:
    """Median time of one replay of fn captured in a CUDA graph (the launches replayed without the
    host's Python, autograd and launcher in between): what a trainer that graphs its step would see.
    None off CUDA, and when fn cannot be captured: a call with a host sync (a ragged group count, a
    target-range check, PyTorch's nonzero) is found in one more warm-up call under
    ``torch.cuda.set_sync_debug_mode("error")`` and never captured, since a capture that a sync
    invalidates leaves torch 2.11's caching allocator in capture mode for the rest of the process
    (pytorch#180395: ``empty_cache`` then frees nothing); said once per reason, the row keeps its
    other timings."""
    if dev.type != "cuda":
        return None
    prev = torch.cuda.current_stream(dev)
    try:
        side = torch.cuda.Stream(dev)
        side.wait_stream(prev)
        with torch.cuda.stream(side):  # warm up outside the capture (compilation, allocator)
            for _ in range(3):
                fn()
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()  # raises at a host sync, outside any capture
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        prev.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_fn(graph.replay, dev, reps, warmup)
    except Exception as e:  # a graph time is a detail: never lose the row over it
        reason = type(e).__name__
        warned = graph_ms.__dict__.setdefault("warned", set())
        if reason not in warned:
            print(f"(no CUDA graph time: {e!r})"[:200])
            warned.add(reason)
        torch.cuda.synchronize(dev)
        return None
    finally:
        torch.cuda.set_stream(prev)


def peak_extra_mib(fn: Callable[[], object], dev: torch.device) -> float:
    """Peak memory above what was allocated before the call, in MiB (results are dropped inside)."""
    gc.collect()
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    try:  # hand cached free memory back first, so that reused pages count as new peak
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        return float("nan")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def copy_bandwidth_gbs(dev: torch.device, mib: int) -> float:
    """Measured device-to-device copy: (read + write bytes) / time, in GB/s."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), dev, reps=10, warmup=3)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# cases: each builds the inputs for ONE size and returns Runs (impl, fwd, fwd_bwd, bytes_fwd, bytes_fwd_bwd)
# --------------------------------------------------------------------------------------------------

Run = tuple[str, Callable[[], object], Callable[[], object] | None, int, int | None]


def _maybe_compile(fn: Callable, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover - depends on the toolchain
        print(f"  torch.compile unavailable: {e!r}", file=sys.stderr)
        return None


def _liger_grpo() -> Callable | None:
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception:
        return None
    return triton_grpo_loss


def _fwd_and_fb(f: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...]) -> tuple[Callable, Callable]:
    """fwd: f() under no_grad; fwd_bwd: f().sum().backward(), then drop the leaves' gradients."""

    def fwd():
        with torch.no_grad():
            return f()

    def fwd_bwd():
        f().sum().backward()
        for t in leaves:
            t.grad = None

    return fwd, fwd_bwd


def case_advantages(dev, n: int, impls: list[str], layout: str) -> list[Run]:
    """layout: "contiguous" (groups of 8), "ragged" (ids of groups of 8 in shuffled order) or
    "ragged-sorted" (groups of 1 to 15 rollouts side by side, ids never decreasing)."""
    k = 8
    r = torch.randint(0, 2, (n,), device=dev).float()
    if layout == "contiguous":
        kw = dict(group_size=k)
    elif layout == "ragged":
        kw = dict(group_index=torch.randperm(n, device=dev) // k)
    else:
        sizes = torch.randint(1, 2 * k, (n,), generator=torch.Generator().manual_seed(0))
        ids = torch.repeat_interleave(torch.arange(n), sizes)[:n]
        kw = dict(group_index=ids.to(dev))
    ragged = layout != "contiguous"
    nbytes = n * 4 * 2 + (n * 8 if ragged else 0)
    runs: list[Run] = []
    for impl in impls:
        if impl in ("triton", "torch"):
            fn = lambda impl=impl: grpo_advantages(r, impl=impl, **kw)  # noqa: E731
        elif impl == "eager":
            fn = lambda: R.grpo_advantages_reference(r, **kw)  # noqa: E731
        else:
            continue
        runs.append((impl, fn, None, nbytes, None))
    return runs


def case_loss(dev, dtype, tokens: int, impls: list[str], compiled: Callable | None) -> list[Run]:
    es = torch.tensor([], dtype=dtype).element_size()
    t = 4096
    n = max(1, tokens // t)
    lp = (-torch.rand(n, t, device=dev) * 2).to(dtype)
    old = (lp.float() + 0.3 * torch.randn(n, t, device=dev)).to(dtype)
    adv = torch.randn(n, device=dev)
    mask = torch.rand(n, t, device=dev) < 0.8
    x = lp.clone().requires_grad_()
    reads = n * t * (2 * es + 1) + n * 4
    runs: list[Run] = []
    for impl in impls:
        if impl in ("triton", "torch"):
            f = lambda impl=impl: grpo_loss(x, old, adv, mask, clip_c=3.0, impl=impl)[0]  # noqa: E731
        elif impl == "eager":
            f = lambda: R.grpo_loss_reference(x, old, adv, mask, clip_c=3.0)[0]  # noqa: E731
        elif impl == "compile" and compiled is not None:
            f = lambda: compiled(x, old, adv, mask, clip_c=3.0)[0]  # noqa: E731
        else:
            continue
        runs.append((impl, *_fwd_and_fb(f, (x,)), reads, 2 * reads + n * t * es))
    return runs


def case_logprobs(
    dev, dtype, tokens: int, vocab: int, impls: list[str], compiled: Callable | None
) -> list[Run]:
    es = torch.tensor([], dtype=dtype).element_size()
    logits = torch.randn(tokens, vocab, device=dev).to(dtype).requires_grad_()
    tg = torch.randint(0, vocab, (tokens,), device=dev)
    nbytes = tokens * vocab * es
    runs: list[Run] = []
    for impl in impls:
        if impl in ("triton", "torch"):
            # the ids are checked once here, as the trainer does (validate_targets=False: no host
            # sync per call, so the call can be captured in a CUDA graph, like the references)
            f = lambda impl=impl: token_logprobs(logits, tg, impl=impl, validate_targets=False)  # noqa: E731
        elif impl == "eager":
            f = lambda: R.token_logprobs_reference(logits, tg)  # noqa: E731
        elif impl == "compile" and compiled is not None:
            f = lambda: compiled(logits, tg)  # noqa: E731
        else:
            continue
        runs.append((impl, *_fwd_and_fb(f, (logits,)), nbytes, 3 * nbytes))
    return runs


def case_loss_from_logits(dev, dtype, tokens: int, vocab: int, impls: list[str]) -> list[Run]:
    """logits -> log-probs -> GRPO loss with KL: ours (token_logprobs + grpo_loss) vs liger's fused loss."""
    es = torch.tensor([], dtype=dtype).element_size()
    b = max(1, tokens // 1024)
    length = tokens // b
    logits = torch.randn(b, length + 1, vocab, device=dev).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (b, length), device=dev)
    old = -torch.rand(b, length, device=dev) * 5
    ref = old + 0.1 * torch.randn(b, length, device=dev)
    adv = torch.randn(b, device=dev)
    mask = torch.rand(b, length, device=dev) < 0.9
    nbytes = b * length * vocab * es
    liger = _liger_grpo() if "liger" in impls else None

    # As the trainer scores them (train/step.py target_logprobs): every position of the [b, L+1, V]
    # logits through a free view, the last one against a dummy target and dropped afterwards; slicing
    # the last position off first would copy the logits (and their gradient).
    every = torch.cat([ids, ids[:, :1]], dim=1).reshape(-1)
    # the positions without loss (10% here, and each row's dummy last one) skipped by row_mask, as
    # liger's kernel skips the rows its completion mask zeroes (the trainer goes further: it never
    # computes logits there, train/step.py LogitSelection)
    rows = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).reshape(-1)

    # "triton-inplace": the trainer's setting, the logits' gradient written over the logits
    # (token_logprobs(inplace_backward=True)); over the repetitions the logits then hold the last
    # gradient instead of random values, which changes no element's work.
    def ours(impl: str) -> torch.Tensor:
        x = logits.view(-1, vocab)
        if impl == "eager":
            lp = R.token_logprobs_reference(x, every, 0.9).view(b, length + 1)[:, :-1]
            return R.grpo_loss_reference(lp, old, adv, mask, ref, kl_beta=0.04)[0]
        inplace = impl == "triton-inplace"
        impl = "triton" if inplace else impl
        lp = token_logprobs(x, every, 0.9, impl=impl, inplace_backward=inplace,  # the trainer's settings
                            validate_targets=False, row_mask=rows).view(b, length + 1)[:, :-1]
        return grpo_loss(lp, old, adv, mask, ref, kl_beta=0.04, impl=impl)[0]

    runs: list[Run] = []
    for impl in impls:
        if impl in ("triton", "triton-inplace", "torch", "eager"):
            f = lambda impl=impl: ours(impl)  # noqa: E731
        elif impl == "liger" and liger is not None:
            f = lambda: liger(  # noqa: E731
                logits,
                old,
                ref,
                ids,
                adv,
                mask.float(),
                temperature=0.9,
                beta=0.04,
                eps_low=0.2,
                eps_high=0.28,
                inplace=False,
                loss_type="bnpo",
                reduce=True,
            )[0]
        else:
            continue
        runs.append((impl, *_fwd_and_fb(f, (logits,)), nbytes, 3 * nbytes))
    return runs


def case_chunked(dev, dtype, tokens: int, vocab: int, hidden: int, chunk: int, impls: list[str]) -> list[Run]:
    es = torch.tensor([], dtype=dtype).element_size()
    h = (torch.randn(tokens, hidden, device=dev) * 0.1).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=dev) * 0.02).to(dtype).requires_grad_()
    tg = torch.randint(0, vocab, (tokens,), device=dev)
    nbytes = (tokens + vocab) * hidden * es
    fns: dict[str, Callable] = {
        "naive": lambda: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, tg[:, None]).squeeze(-1),
    }
    for impl in impls:
        if impl in ("triton", "torch"):
            fns[f"chunked-{impl}"] = lambda impl=impl: chunked_token_logprobs(
                h, w, tg, chunk_size=chunk, impl=impl, validate_targets=False
            )
            fns[f"unchunked-{impl}"] = lambda impl=impl: token_logprobs(h @ w.t(), tg, impl=impl, validate_targets=False)
    return [(name, *_fwd_and_fb(f, (h, w)), nbytes, 3 * nbytes) for name, f in fns.items()]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_stats_config(text: str) -> tuple[int, int, int | None]:
    """A launch setting of token_logprobs' statistics kernel, "block_v:warps" or "block_v:warps:stages",
    as (block_v, warps, stages or None); ValueError unless block_v is a power of two >= 16 and the
    others are >= 1."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(text)
    block_v, warps = int(parts[0]), int(parts[1])
    stages = int(parts[2]) if len(parts) == 3 else None
    if block_v < 16 or block_v & (block_v - 1) or warps < 1 or (stages is not None and stages < 1):
        raise ValueError(text)
    return block_v, warps, stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument(
        "--cases", nargs="+", default=["advantages", "loss", "logprobs", "loss_from_logits", "chunked"]
    )
    p.add_argument("--tokens", nargs="+", type=int, help="grpo_loss sizes in tokens")
    p.add_argument("--logit-tokens", nargs="+", type=int, help="token counts for the logits cases")
    p.add_argument("--vocab", nargs="+", type=int, help="vocab sizes (49152 151936 on GPU; 49152 on CPU)")
    p.add_argument("--rollouts", nargs="+", type=int, help="grpo_advantages sizes")
    p.add_argument("--hidden", type=int, help="hidden size for the chunked case (2048 GPU, 576 CPU)")
    p.add_argument("--chunk", type=int, help="rows per chunk for chunked_token_logprobs (1024 GPU, 128 CPU)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="include torch.compile"
    )
    p.add_argument("--out", default="benchmarks/kernels")
    p.add_argument(
        "--graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, also time each forward+backward replayed from a CUDA graph ('graph ms'; "
        "--no-graphs skips the capture)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        help="start no new case after this many seconds (results so far are written after every case)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        help="override the implementations (triton triton-inplace torch eager compile liger); "
        "with TRITON_INTERPRET=1 this smoke-tests the GPU code paths on CPU at tiny sizes (timings meaningless)",
    )
    p.add_argument(
        "--stats-config",
        help="block_v:warps[:stages] of token_logprobs' forward statistics kernel on a GPU, e.g. 2048:1:2"
        " (default: kernels/logprobs.py's; tools/sweep_kernels.py compares them)",
    )
    p.add_argument(
        "--grad-config",
        help="block_v:warps[:stages] of token_logprobs' gradient kernel on a GPU, e.g. 4096:8"
        " (default: kernels/logprobs.py's GRAD_*; tools/sweep_kernels.py compares them)",
    )
    args = p.parse_args(argv)
    if args.grad_config:
        try:
            block_v, warps, stages = parse_stats_config(args.grad_config)
        except ValueError:
            p.error("--grad-config takes block_v:warps[:stages] (block_v a power of two >= 16), e.g. 4096:8")
        logprobs_mod.GRAD_BLOCK_V, logprobs_mod.GRAD_WARPS, logprobs_mod.GRAD_STAGES = block_v, warps, stages
        logprobs_mod.MAX_BLOCK_V = max(logprobs_mod.MAX_BLOCK_V, block_v)
    if args.stats_config:
        try:
            cfg = parse_stats_config(args.stats_config)
        except ValueError:
            p.error("--stats-config takes block_v:warps[:stages] (block_v a power of two >= 16), e.g. 2048:1:2")
        logprobs_mod.STATS_BLOCK_V, logprobs_mod.STATS_WARPS, logprobs_mod.STATS_STAGES = cfg
        logprobs_mod.MAX_BLOCK_V = max(logprobs_mod.MAX_BLOCK_V, cfg[0])  # a wider block runs as named

    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    gpu = dev.type == "cuda"
    if not gpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    compile_on = gpu if args.compile is None else args.compile
    if not gpu and not args.impls:
        timed = "eager reference, the lean torch path" + (" and torch.compile" if compile_on else "")
        skipped = "the Triton kernels and liger-kernel are" if compile_on else \
            "the Triton kernels, torch.compile and liger-kernel are"
        print(f"NOTE: no CUDA device - timing the PyTorch paths only ({timed});")
        print(f"      {skipped} GPU comparisons and are skipped here.")
    impls = ["triton", "triton-inplace", "torch", "eager"] + (["compile"] if compile_on else []) + (["liger"] if gpu else [])
    if not gpu:
        impls = ["torch", "eager"] + (["compile"] if compile_on else [])
    if args.impls:
        impls = args.impls
        compile_on = "compile" in impls
    tokens = args.tokens or ([1 << 20, 1 << 22, 1 << 24] if gpu else [1 << 18, 1 << 20])
    logit_tokens = args.logit_tokens or ([4096, 16384] if gpu else [512])
    chunk = args.chunk or (1024 if gpu else 128)
    args.vocab = args.vocab or ([49152, 151936] if gpu else [49152])
    args.hidden = args.hidden or (2048 if gpu else 576)
    rollouts = args.rollouts or ([4096, 65536] if gpu else [4096])
    device_name = (
        torch.cuda.get_device_name(dev)
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    bw = copy_bandwidth_gbs(dev, 1024 if gpu else 256)
    print(f"device: {device_name}; dtype {args.dtype}; measured copy bandwidth {bw:.1f} GB/s")

    plan: list[tuple[str, str, Callable[[], list[Run]]]] = []
    base = [i for i in impls if i in ("triton", "torch", "eager")]
    if "advantages" in args.cases:
        for n in rollouts:
            for layout in ("contiguous", "ragged", "ragged-sorted"):
                plan.append(
                    (f"advantages-{layout}", f"N={n},K=8" if layout != "ragged-sorted" else f"N={n},K=1..15",
                     lambda n=n, layout=layout: case_advantages(dev, n, base, layout))
                )
    if "loss" in args.cases:
        compiled = _maybe_compile(R.grpo_loss_reference, compile_on)
        for t in tokens:
            plan.append(
                ("grpo_loss", f"tokens={t}", lambda t=t, c=compiled: case_loss(dev, dtype, t, impls, c))
            )
    for t in logit_tokens:
        for v in args.vocab:
            size = f"tokens={t},V={v}"
            if "logprobs" in args.cases:
                compiled = _maybe_compile(R.token_logprobs_reference, compile_on)
                plan.append(
                    (
                        "token_logprobs",
                        size,
                        lambda t=t, v=v, c=compiled: case_logprobs(dev, dtype, t, v, impls, c),
                    )
                )
            if "loss_from_logits" in args.cases:
                plan.append(
                    (
                        "logits->grpo_loss",
                        size,
                        lambda t=t, v=v: case_loss_from_logits(dev, dtype, t, v, impls),
                    )
                )
            if "chunked" in args.cases:
                size_c = f"{size},H={args.hidden},chunk={chunk}"
                plan.append(
                    (
                        "chunked_logprobs",
                        size_c,
                        lambda t=t, v=v: case_chunked(dev, dtype, t, v, args.hidden, chunk, impls),
                    )
                )

    meta = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=device_name,
        dtype=args.dtype,
        copy_bandwidth_gbs=bw,
        torch=torch.__version__,
        triton=getattr(triton, "__version__", None),
        command=" ".join([sys.executable, *sys.argv]),
        stats_kernel=f"{logprobs_mod.STATS_BLOCK_V}:{logprobs_mod.STATS_WARPS}:{logprobs_mod.STATS_STAGES}",
        grad_kernel=f"{logprobs_mod.GRAD_BLOCK_V}:{logprobs_mod.GRAD_WARPS}:{logprobs_mod.GRAD_STAGES}",
        note=None if gpu else ("CPU only: PyTorch paths timed"
                               + ("; Triton and liger skipped" if "compile" in impls else
                                  "; Triton, torch.compile and liger skipped")),
    )
    out = Path(args.out + ("_" + dev.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    header = (
        f"{'case':<20} {'size':<40} {'impl':<16} {'fwd ms':>9} {'fwd GB/s':>9} {'f+b ms':>9} {'f+b GB/s':>9}"
        f" {'%copy':>6} {'peak MiB':>9} {'launches':>8} {'dev ms':>8} {'%copy dev':>9} {'host ms':>8}"
        f" {'graph ms':>8} {'%copy graph':>11}"
    )
    print(header)
    print("-" * len(header))
    for i, (case, size, build) in enumerate(plan):
        if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
            left = [f"{c} {sz}" for c, sz, _ in plan[i:]]
            print(f"--max-seconds {args.max_seconds:g} reached: {len(left)} case(s) not run: {'; '.join(left)}")
            meta["not_run"] = left
            break
        runs = build()
        for impl, fwd, fb, b_f, b_fb in runs:
            try:
                t_f = time_fn(fwd, dev, args.reps, args.warmup)
                t_fb = time_fn(fb, dev, args.reps, args.warmup) if fb is not None else float("nan")
                peak = peak_extra_mib(fb if fb is not None else fwd, dev)
                launches, dev_ms = cuda_activity(fb if fb is not None else fwd, dev)
                host_ms = host_issue_ms(fb if fb is not None else fwd, dev, args.reps)
                g_ms = graph_ms(fb if fb is not None else fwd, dev, args.reps, args.warmup) if args.graphs else None
            except Exception as e:  # keep the table going; record why a row is missing
                print(f"{case:<20} {size:<40} {impl:<16} failed: {e!r}"[:200])
                rows.append(dict(case=case, size=size, impl=impl, error=repr(e)[:300]))
                continue
            gbs_f = b_f / (t_f * 1e-3) / 1e9
            gbs_fb = b_fb / (t_fb * 1e-3) / 1e9 if b_fb else float("nan")
            pct = 100 * (gbs_fb if b_fb else gbs_f) / bw
            # the same bytes over the device's own busy time (no host time between launches)
            pct_dev = 100 * (b_fb if b_fb else b_f) / (dev_ms * 1e-3) / 1e9 / bw if dev_ms else None
            pct_graph = 100 * (b_fb if b_fb else b_f) / (g_ms * 1e-3) / 1e9 / bw if g_ms else None
            print(
                f"{case:<20} {size:<40} {impl:<16} {t_f:9.3f} {gbs_f:9.1f} {t_fb:9.3f} {gbs_fb:9.1f} {pct:6.1f} {peak:9.1f}"
                f" {'-' if launches is None else launches:>8}"
                f" {_cell(dev_ms, 3):>8} {_cell(pct_dev, 1):>9} {_cell(host_ms, 3):>8}"
                f" {_cell(g_ms, 3):>8} {_cell(pct_graph, 1):>11}",
                flush=True,
            )
            rows.append(
                dict(
                    case=case,
                    size=size,
                    impl=impl,
                    fwd_ms=t_f,
                    fwd_gbs=gbs_f,
                    fwd_bwd_ms=t_fb,
                    fwd_bwd_gbs=gbs_fb,
                    pct_of_copy=pct,
                    peak_extra_mib=peak,
                    launches=launches,
                    device_ms=dev_ms,
                    pct_of_copy_device=pct_dev,
                    host_ms=host_ms,
                    graph_ms=g_ms,
                    pct_of_copy_graph=pct_graph,
                )
            )
        del runs
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        write_results(out, meta, rows)  # after every case: a run cut short keeps what it measured

    meta["targets"] = check_targets(rows)
    write_results(out, meta, rows)
    if meta["targets"]:
        print("\nissue #3 targets (benchmarks, not tests):")
        for t in meta["targets"]:
            print(f"  {'met    ' if t['met'] else 'NOT met' if t['met'] is False else 'n/a    '}  {t['target']}: {t['measured']}")
    print(f"wrote {out.with_name(out.name + '.csv')} and {out.with_name(out.name + '.json')}")
    return 0


def _cell(value: float | None, digits: int) -> str:
    """A table cell: the number, or '-' where there is none (off CUDA, or not measured)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _size_value(size: str, key: str) -> int | None:
    for part in size.split(","):
        k, _, v = part.partition("=")
        if k == key:
            return int(v)
    return None


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue #3's benchmark targets, evaluated on the rows that measure them (absent rows: no entry).

    - grpo_loss forward+backward at >= 4M tokens: >= 80% of the measured copy bandwidth, and >= 5x
      faster than PyTorch eager;
    - logits -> log-probs -> loss (our token_logprobs + grpo_loss vs liger's fused GRPO loss on the
      same logits): at least as fast, with less peak memory;
    - chunked log-probs at V = 151,936: peak extra memory under a quarter of the naive log_softmax.
    """
    ok = {(r["case"], r["size"], r["impl"]): r for r in rows if "error" not in r}
    out = []
    for (case, size, impl), r in ok.items():
        if case == "grpo_loss" and impl == "triton" and (_size_value(size, "tokens") or 0) >= 1 << 22:
            eager = ok.get((case, size, "eager"))
            speedup = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"] if eager else float("nan")
            dev_pct, graph_pct = r.get("pct_of_copy_device"), r.get("pct_of_copy_graph")
            dev_note = f" ({dev_pct:.1f}% over the device's busy time alone" if dev_pct else ""
            if graph_pct:
                dev_note += f"{'; ' if dev_note else ' ('}{graph_pct:.1f}% replayed from a CUDA graph"
            dev_note += ")" if dev_note else ""
            out.append(
                dict(
                    target=f"grpo_loss fwd+bwd {size}: >= 80% of copy bandwidth and >= 5x eager",
                    measured=f"{r['pct_of_copy']:.1f}% of copy{dev_note}, {speedup:.1f}x eager",
                    met=bool(r["pct_of_copy"] >= 80.0 and speedup >= 5.0) if eager else None,
                )
            )
        if case == "logits->grpo_loss" and impl in ("triton", "triton-inplace") and (case, size, "liger") in ok:
            lg = ok[(case, size, "liger")]
            out.append(
                dict(
                    target=f"logits->loss {size}{' (in place)' if impl != 'triton' else ''}: "
                    "ours at least as fast as liger, less peak memory",
                    measured=f"{r['fwd_bwd_ms']:.3f} vs {lg['fwd_bwd_ms']:.3f} ms, "
                    f"{r['peak_extra_mib']:.0f} vs {lg['peak_extra_mib']:.0f} MiB",
                    met=bool(r["fwd_bwd_ms"] <= lg["fwd_bwd_ms"] and r["peak_extra_mib"] < lg["peak_extra_mib"]),
                )
            )
        if case == "chunked_logprobs" and impl == "chunked-triton" and _size_value(size, "V") == 151_936:
            naive = ok.get((case, size, "naive"))
            if naive:
                out.append(
                    dict(
                        target=f"chunked log-probs {size}: peak extra memory < 1/4 of the naive log_softmax",
                        measured=f"{r['peak_extra_mib']:.0f} vs {naive['peak_extra_mib']:.0f} MiB",
                        met=bool(r["peak_extra_mib"] < 0.25 * naive["peak_extra_mib"]),
                    )
                )
    return out


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    """<out>.csv and <out>.json with every row so far (rewritten whole each time)."""
    with open(out.with_name(out.name + ".csv"), "w", newline="") as f:
        keys = [
            "case",
            "size",
            "impl",
            "fwd_ms",
            "fwd_gbs",
            "fwd_bwd_ms",
            "fwd_bwd_gbs",
            "pct_of_copy",
            "peak_extra_mib",
            "launches",
            "device_ms",
            "pct_of_copy_device",
            "host_ms",
            "graph_ms",
            "pct_of_copy_graph",
            "error",
        ]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    with open(out.with_name(out.name + ".json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
