"""The host cost of our kernel wrappers alone: grpo_loss and token_logprobs with the Triton launches
replaced by no-ops, on CPU tensors, at the CUDA launch settings. Prints a table, writes <out>.json.

    .venv/bin/python tools/bench_host_overhead.py --out benchmarks/host_overhead

On an H200 a grpo_loss forward+backward took 0.6-0.7 ms by events while its kernels kept the
device busy for 32 us (4M tokens): host-bound. tools/bench_kernels.py's `host ms` column measures
the host's whole time to issue a call on a GPU (our Python, autograd, Triton's launcher, the
benchmark's own ops); this splits off the part that is ours (argument checks, buffers, the autograd
Function, the statistics dict), which needs no GPU: what is left of `host ms` is Triton's launcher
and PyTorch. The tensors are small (a wrapper's cost does not depend on their size, but CPU
allocations would).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import megatron_recycle_kernels as K
import torch
from megatron_recycle_kernels import buffers, logprobs, policy_loss

KERNELS = {
    policy_loss: ("_grpo_loss_fwd_kernel", "_grpo_loss_finish_kernel", "_grpo_loss_bwd_kernel"),
    logprobs: ("_logprob_stats_kernel", "_logprob_combine_kernel", "_logprob_grad_kernel"),
}


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args)`` does nothing and counts."""

    def __init__(self) -> None:
        self.calls = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1

        return launch


ROUNDS = 10  # each row's calls are timed in this many rounds, interleaved with the other rows


def median_us(fn: Callable[[], object], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(reps: int = 300, warmup: int = 30) -> list[dict]:
    """Rows (op, pass, our wrapper's median microseconds, kernel launches stubbed per call)."""
    saved = {(mod, name): getattr(mod, name) for mod, names in KERNELS.items() for name in names}
    saved_compiled = buffers.compiled
    stubs = {key: _NoLaunch() for key in saved}
    rows = []
    try:
        for (mod, name), stub in stubs.items():
            setattr(mod, name, stub)
        buffers.compiled = lambda device: True  # the CUDA launch settings' code paths

        n, t = 64, 512
        lp = torch.randn(n, t).to(torch.bfloat16).requires_grad_()
        old = torch.randn(n, t).to(torch.bfloat16)
        adv, mask = torch.randn(n), torch.rand(n, t) > 0.2
        logits = torch.randn(256, 1024).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, 1024, (256,))

        def loss_fwd():
            with torch.no_grad():
                K.grpo_loss(lp, old, adv, mask, clip_c=3.0, impl="triton")

        def loss_fb():
            loss, _ = K.grpo_loss(lp, old, adv, mask, clip_c=3.0, impl="triton")
            loss.backward()
            lp.grad = None

        def lp_fwd(validate=True):
            with torch.no_grad():
                K.token_logprobs(logits, targets, 0.9, impl="triton", validate_targets=validate)

        def lp_fb(validate=True):
            K.token_logprobs(logits, targets, 0.9, impl="triton", validate_targets=validate).sum().backward()
            logits.grad = None

        # token_logprobs as the trainer calls it: validate_targets=False (the ids checked once per
        # batch), without the target-range check and its host sync
        unchecked = "token_logprobs, unvalidated"
        cases = (("grpo_loss", "fwd", loss_fwd), ("grpo_loss", "fwd+bwd", loss_fb),
                 ("token_logprobs", "fwd", lp_fwd), ("token_logprobs", "fwd+bwd", lp_fb),
                 (unchecked, "fwd", lambda: lp_fwd(False)), (unchecked, "fwd+bwd", lambda: lp_fb(False)))
        launches = []
        for _, _, fn in cases:
            before = sum(s.calls for s in stubs.values())
            fn()
            launches.append(sum(s.calls for s in stubs.values()) - before)
        # interleaved rounds, so that a noisy neighbour on a shared machine slows every row alike
        samples: list[list[float]] = [[] for _ in cases]
        rounds = max(1, min(ROUNDS, reps))
        for _ in range(rounds):
            for i, (_, _, fn) in enumerate(cases):
                samples[i].append(median_us(fn, max(1, reps // rounds), max(1, warmup // rounds)))
        for (op, kind, _), n, us in zip(cases, launches, samples):
            rows.append(dict(op=op, kind=kind, wrapper_us=statistics.median(us), launches=n))
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
        buffers.compiled = saved_compiled
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", default="benchmarks/host_overhead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.reps, args.warmup)
    print(f"{'op':<28} {'pass':<8} {'wrapper us':>10} {'launches':>8}   (Triton launches stubbed out)")
    for r in rows:
        print(f"{r['op']:<28} {r['kind']:<8} {r['wrapper_us']:10.1f} {r['launches']:>8}")
    meta = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.processor() or platform.machine()} ({platform.python_implementation()} "
        f"{platform.python_version()})",
        torch=torch.__version__,
        command=" ".join([sys.executable, *sys.argv]),
    )
    out = Path(args.out)
    out = out if out.suffix == ".json" else out.with_name(out.name + ".json")  # a dot in the name stays
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
