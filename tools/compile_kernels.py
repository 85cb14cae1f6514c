"""Compile every Triton kernel for a real GPU target (sm_90 by default) on a machine with no GPU.

The CPU tests run the kernels through the Triton interpreter, which checks what they compute
but not that they compile: the interpreter accepts code that the compiler rejects, and it says
nothing about registers, spills or load widths. This tool closes that gap without a GPU:

1. It runs the kernels' own launchers (advantages, GRPO loss forward and backward, token
   log-probs statistics and gradient, the chunked path) on CPU tensors of realistic shapes with
   `megatron_recycle_kernels.buffers.compiled` forced to True, so they choose exactly the tile
   sizes and warps they choose on CUDA, and records each launch instead of running it.
2. Each recorded launch goes through Triton's own argument binder for the target (the same
   specialization a CUDA launch gets: 16-byte-aligned pointers, integers divisible by 16) and is
   compiled by triton.compile down to a cubin with the ptxas that Triton ships.
3. From each cubin and its PTX it reads registers, local memory (spills), stack and shared memory
   (cuobjdump --dump-resource-usage) and the width of the global loads and stores.

It prints a table and writes <out>.csv and <out>.json. Nothing here runs a kernel: compiling
proves the code builds for the chip and shows its resource use, not its speed or its numbers
(tests/kernels checks those; tools/bench_kernels.py times them on a GPU).

    python tools/compile_kernels.py                       # sm_90 (H100/H200)
    python tools/compile_kernels.py --arch 80 --arch 90   # A100 as well
    python tools/compile_kernels.py --quick               # one small shape per launcher
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

import megatron_recycle_kernels as K  # noqa: E402

if K.INTERPRETED:  # TRITON_INTERPRET ("1", "true", ...): interpreter functions, not compilable
    raise SystemExit("tools/compile_kernels.py compiles the kernels: run it without TRITON_INTERPRET")
import torch  # noqa: E402
import triton  # noqa: E402
from megatron_recycle_kernels import advantages, buffers, logprobs, policy_loss  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

KERNEL_MODULES = (advantages, logprobs, policy_loss)


def all_kernels() -> dict[str, JITFunction]:
    """Every @triton.jit kernel (launchable: name ends in _kernel) defined in the kernels package."""
    found = {}
    for mod in KERNEL_MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[name] = obj
    return found


@dataclasses.dataclass
class Launch:
    scenario: str
    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` is recorded, not run."""

    def __init__(self, fn: JITFunction, sink: list[Launch], scenario: Callable[[], str]) -> None:
        self.fn, self.sink, self.scenario = fn, sink, scenario

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = tuple(grid(kwargs) if callable(grid) else grid)
            self.sink.append(Launch(self.scenario(), self.fn, g, args, dict(kwargs)))

        return launch


@contextlib.contextmanager
def record_launches() -> Iterator[tuple[list[Launch], Callable[[str], contextlib.AbstractContextManager]]]:
    """Within the block, launchers pick CUDA configurations and their launches are recorded.

    Yields (launches, scenario): wrap calls in `with scenario("name"):` to label what they record.
    Kernel outputs stay uninitialized (nothing runs), so values computed from them are garbage.
    """
    sink: list[Launch] = []
    current = ["(unnamed)"]

    @contextlib.contextmanager
    def scenario(name: str):
        current[0] = name
        try:
            yield
        finally:
            current[0] = "(unnamed)"

    saved = {}
    try:
        for mod in KERNEL_MODULES:
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                    saved[(mod, name)] = obj
                    setattr(mod, name, _Recorder(obj, sink, lambda: current[0]))
        saved[(buffers, "compiled")] = buffers.compiled
        buffers.compiled = lambda device: True
        yield sink, scenario
    finally:
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)


# --------------------------------------------------------------------------------------------------
# Workloads: the launchers on realistic shapes (CPU tensors; the kernels are recorded, not run)
# --------------------------------------------------------------------------------------------------


def run_workloads(scenario, quick: bool = False) -> None:
    """Call every launcher path the trainer and the benchmarks use, in the dtypes they use."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    # group advantages: contiguous groups (power-of-two and odd sizes, fp32 and fp64), ragged ids
    adv_cases = (
        [(512, 8, torch.float32)]
        if quick
        else [(512, 8, torch.float32), (300, 5, torch.float32), (512, 16, torch.float64)]
    )
    for n_groups, k, dt in adv_cases:
        with scenario(f"grpo_advantages contiguous G={n_groups} K={k} {str(dt)[6:]}"):
            K.grpo_advantages(rnd(n_groups * k, dtype=dt), group_size=k, impl="triton")
    for dt in [torch.float32] if quick else [torch.float32, torch.float64]:
        with scenario(f"grpo_advantages ragged N=4096 G=512 {str(dt)[6:]}"):
            idx = torch.randint(0, 512, (4096,), generator=g)
            K.grpo_advantages(rnd(4096, dtype=dt), group_index=idx, impl="triton")
        with scenario(f"grpo_advantages ragged sorted N=4096 G=512 {str(dt)[6:]}"):
            idx = torch.randint(0, 512, (4096,), generator=g).sort().values
            K.grpo_advantages(rnd(4096, dtype=dt), group_index=idx, impl="triton")

    # fused GRPO loss forward + backward: row widths under and over one token block, with and
    # without the reference KL and the dual clip, fp32 and bf16 log-probs, every aggregation mode
    # and each way of giving the normalizer (none, a host number, a device tensor)
    # (the trainer's [n, L-1] rows have odd widths; tools/bench_kernels.py uses bf16 [n, 4096], dual clip 3)
    loss_cases = [(64, 1023, torch.float32, False, None, "token-mean", None)]
    if not quick:
        loss_cases += [
            (64, 4096, torch.bfloat16, False, 3.0, "seq-mean-token-mean", None),
            (64, 4096, torch.float32, True, 3.0, "token-mean", 1.0e6),
            (64, 1000, torch.bfloat16, True, None, "seq-mean-token-sum-norm", torch.tensor(512)),
            (64, 1000, torch.float32, False, None, "seq-mean-token-sum", 64.0),
        ]
    for rows, cols, dt, with_ref, clip_c, agg, normalizer in loss_cases:
        lp = rnd(rows, cols, dtype=dt).requires_grad_(True)
        ref = rnd(rows, cols, dtype=dt) if with_ref else None
        name = (
            f"grpo_loss fwd+bwd [{rows},{cols}] {str(dt)[6:]} ref={'yes' if with_ref else 'no'} dual={clip_c} "
            f"{agg} normalizer={'tensor' if isinstance(normalizer, torch.Tensor) else normalizer}"
        )
        with scenario(name):
            loss, _ = K.grpo_loss(
                lp,
                rnd(rows, cols, dtype=dt),
                rnd(rows),
                torch.rand(rows, cols, generator=g) > 0.3,
                ref_logprobs=ref,
                clip_c=clip_c,
                kl_beta=0.01 if with_ref else 0.0,
                agg=agg,
                normalizer=normalizer,
                max_len=cols,
                impl="triton",
            )
            loss.backward()

    # the forward's other launch settings that tools/sweep_kernels.py times on a GPU: the eight
    # sums in one joint reduction (one block per program, and 4 blocks of 1,024 with 8 warps), the
    # default's eight reductions on the same bf16 inputs with KL and dual clip, to compare, and the
    # finish kernel in wider steps with more warps
    if not quick:
        knobs = ("MAX_BLOCK_T", "LOSS_WARPS", "LOSS_FWD_TILES", "LOSS_FWD_JOINT", "FINISH_ROWS", "FINISH_WARPS")
        saved = {k: getattr(policy_loss, k) for k in knobs}
        settings = ((2048, 4, 1, False, 512, 4), (2048, 4, 1, True, 512, 4), (1024, 8, 4, True, 512, 4),
                    (2048, 4, 1, False, 1024, 8), (2048, 4, 1, False, 2048, 16))
        try:
            for setting in settings:
                for k, v in zip(knobs, setting):
                    setattr(policy_loss, k, v)
                block_t, warps, tiles, joint, finish_rows, finish_warps = setting
                lp = rnd(64, 4096, dtype=torch.bfloat16).requires_grad_(True)
                with scenario(f"grpo_loss fwd+bwd [64,4096] bf16 ref=yes dual=3.0 joint={joint} block={block_t} "
                              f"warps={warps} tiles={tiles} finish={finish_rows}x{finish_warps}"):
                    loss, _ = K.grpo_loss(lp, rnd(64, 4096, dtype=torch.bfloat16), rnd(64),
                                          torch.rand(64, 4096, generator=g) > 0.3,
                                          ref_logprobs=rnd(64, 4096, dtype=torch.bfloat16), clip_c=3.0,
                                          kl_beta=0.01, impl="triton")
                    loss.backward()
        finally:
            for k, v in saved.items():
                setattr(policy_loss, k, v)

    # token log-probs (+ entropy) forward and backward at the two vocabularies of the targets,
    # a tensor-parallel shard of the larger one (an odd width), bf16 and fp32 logits
    lp_cases = [(16, 49_152, torch.bfloat16, False)]
    if not quick:
        lp_cases += [
            (16, 151_936, torch.bfloat16, True),
            (16, 151_936 // 2, torch.bfloat16, True),
            (16, 49_152, torch.float32, True),
        ]
    for rows, vocab, dt, entropy in lp_cases:
        logits = rnd(rows, vocab, dtype=dt).requires_grad_(True)
        tgt = torch.randint(0, vocab, (rows,), generator=g)
        with scenario(f"token_logprobs fwd+bwd [{rows},{vocab}] {str(dt)[6:]} entropy={entropy}"):
            out = K.token_logprobs(logits, tgt, return_entropy=entropy, impl="triton")
            loss = (out[0].sum() + out[1].sum()) if entropy else out.sum()
            loss.backward()

    # masked rows skipped (row_mask: the logits -> loss benchmark's setting, as liger skips them)
    if not quick:
        logits = rnd(16, 151_936, dtype=torch.bfloat16).requires_grad_(True)
        tgt = torch.randint(0, 151_936, (16,), generator=g)
        with scenario("token_logprobs fwd+bwd [16,151936] bfloat16 row_mask"):
            K.token_logprobs(logits, tgt, impl="triton", row_mask=torch.rand(16, generator=g) < 0.9).sum().backward()

    # a vocab-parallel rank's pass (TP 2: its statistics, FINAL=False; one rank merges its rows in
    # the same launch), then the merge of the ranks' statistics after the all_gather
    if not quick:
        for entropy in (False, True):
            shard, tgt = rnd(16, 151_936 // 2, dtype=torch.bfloat16), torch.randint(0, 151_936, (16,), generator=g)
            with scenario(f"token_logprobs statistics of a TP-2 shard [16,{151_936 // 2}] bf16 entropy={entropy}"):
                logprobs._stats_triton(shard, tgt, 151_936 // 2, 1.0, entropy, 151_936)
        with scenario("token_logprobs combine of 2 ranks' statistics [2, 4, 16]"):
            logprobs._combine_triton(rnd(2, 4, 16), True, torch.float32)
        with scenario("token_logprobs combine of 2 ranks' statistics [2, 4, 16] row_mask"):
            logprobs._combine_triton(rnd(2, 4, 16), False, torch.float32, torch.rand(16, generator=g) < 0.9)

    # chunked log-probs from hidden states: the same kernels on each chunk's logits
    if not quick:
        hidden = rnd(40, 64, dtype=torch.bfloat16).requires_grad_(True)
        weight = rnd(151_936, 64, dtype=torch.bfloat16).requires_grad_(True)
        tgt = torch.randint(0, 151_936, (40,), generator=g)
        with scenario("chunked_token_logprobs fwd+bwd hidden [40,64] V=151936 bf16 chunk=16"):
            K.chunked_token_logprobs(hidden, weight, tgt, chunk_size=16, impl="triton").sum().backward()


# --------------------------------------------------------------------------------------------------
# Compiling the recorded launches
# --------------------------------------------------------------------------------------------------


def _specialize(launch: Launch, backend) -> tuple[dict, dict, dict, Any]:
    """Triton's own binder for `backend`: (signature, constexprs, attrs, options) as a launch gets them."""
    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    # what JITFunction.run adds before binding (the knobs it reads differ between Triton versions)
    kwargs.setdefault("debug", fn.debug or triton.knobs.runtime.debug)
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(triton.knobs.compilation, knob):
            kwargs.setdefault(knob, getattr(triton.knobs.compilation, knob))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump (or one on PATH)."""
    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(here) if here.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, read with cuobjdump."""
    tool = cuobjdump_path()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    m = _RES.search(out.stdout)
    if m is None:
        raise RuntimeError(f"could not read the resource usage from cuobjdump's output:\n{out.stdout}")
    return dict(zip(("regs", "stack_bytes", "static_shared_bytes", "local_bytes"), map(int, m.groups())))


def barrier_count(ptx: str) -> int:
    """Block-wide barriers in the PTX (bar.sync / barrier.sync): a reduction across warps passes
    shared memory between two of them, so this counts a kernel's cross-warp exchanges."""
    return len(re.findall(r"\b(?:bar|barrier)(?:\.cta)?\.sync\b", ptx))


def memory_ops(ptx: str) -> dict[str, str]:
    """Global loads and stores in the PTX by access width, e.g. {'ld': 'v4.b32 x6, b16 x2', ...}."""
    out = {}
    for op in ("ld", "st"):
        counts: dict[str, int] = {}
        for m in re.finditer(rf"\b{op}\.global((?:\.[a-z0-9]+)*)", ptx):
            quals = [
                q
                for q in m.group(1).split(".")
                if q
                and q
                not in (
                    "L1",
                    "L2",
                    "nc",
                    "cs",
                    "ca",
                    "cg",
                    "lu",
                    "cv",
                    "wb",
                    "wt",
                    "relaxed",
                    "gpu",
                    "sys",
                    "cta",
                )
            ]
            key = ".".join(q for q in quals if not q.startswith("L2::"))
            counts[key] = counts.get(key, 0) + 1
        out[op] = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return out


@dataclasses.dataclass
class Compiled:
    arch: int
    kernel: str
    scenarios: list[str]
    grid: str
    constexprs: str
    signature: str
    aligned_args: str
    num_warps: int
    num_stages: int
    regs: int | None
    local_bytes: int | None
    stack_bytes: int | None
    static_shared_bytes: int | None
    shared_bytes: int
    global_loads: str
    global_stores: str
    barriers: int
    compile_s: float


def compile_launches(
    launches: list[Launch], arch: int, progress: Callable[[str], None] = print
) -> list[Compiled]:
    """Compile each distinct specialization among `launches` for sm_<arch>; one row per compile."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    rows: dict[str, Compiled] = {}
    for launch in launches:
        signature, constexprs, attrs, options = _specialize(launch, backend)
        names = launch.kernel.arg_names
        const_txt = ", ".join(f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items()))
        sig_txt = ", ".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr")
        aligned = ", ".join(names[k[0]] for k in sorted(attrs) if attrs[k])
        key = f"{launch.kernel.__name__}|{sig_txt}|{const_txt}|{aligned}|{options.num_warps}|{options.num_stages}"
        if key in rows:
            if launch.scenario not in rows[key].scenarios:
                rows[key].scenarios.append(launch.scenario)
            continue
        progress(f"  sm_{arch} {launch.kernel.__name__} ({const_txt}) ...")
        t0 = time.perf_counter()
        try:
            ck = triton.compile(
                ASTSource(launch.kernel, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
        except Exception as exc:  # a compile error is the finding: say which launch hit it
            raise RuntimeError(
                f"{launch.kernel.__name__} failed to compile for sm_{arch} (scenario {launch.scenario!r}, "
                f"constexprs {const_txt}): {exc}"
            ) from exc
        secs = time.perf_counter() - t0
        res = resource_usage(ck.asm["cubin"])
        mem = memory_ops(ck.asm["ptx"])
        rows[key] = Compiled(
            arch=arch,
            kernel=launch.kernel.__name__,
            scenarios=[launch.scenario],
            grid="x".join(map(str, launch.grid)),
            constexprs=const_txt,
            signature=sig_txt,
            aligned_args=aligned,
            num_warps=options.num_warps,
            num_stages=options.num_stages,
            regs=res.get("regs"),
            local_bytes=res.get("local_bytes"),
            stack_bytes=res.get("stack_bytes"),
            static_shared_bytes=res.get("static_shared_bytes"),
            shared_bytes=int(ck.metadata.shared),
            global_loads=mem["ld"],
            global_stores=mem["st"],
            barriers=barrier_count(ck.asm["ptx"]),
            compile_s=round(secs, 2),
        )
    return list(rows.values())


def record(quick: bool = False) -> list[Launch]:
    """The launches the workloads make on CUDA, recorded on this machine."""
    with record_launches() as (launches, scenario):
        run_workloads(scenario, quick=quick)
    return launches


def print_table(rows: list[Compiled]) -> None:
    hdr = f"{'arch':>5} {'kernel':<24} {'warps':>5} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>6} {'compile s':>9}  constexprs / memory ops"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        local = "-" if r.local_bytes is None else str(r.local_bytes)
        stack = "-" if r.stack_bytes is None else str(r.stack_bytes)
        regs = "-" if r.regs is None else str(r.regs)
        print(
            f"sm_{r.arch:<2} {r.kernel:<24} {r.num_warps:>5} {regs:>4} {stack:>5} {local:>5} {r.shared_bytes:>6} "
            f"{r.compile_s:>9.2f}  {r.constexprs}"
        )
        pad = " " * 75
        print(f"{pad}ld: {r.global_loads}; st: {r.global_stores}; barriers: {r.barriers}")
        print(f"{pad}16-divisible args: {r.aligned_args or '-'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--arch", type=int, action="append", help="compute capability x10 (90 = H100/H200; repeatable)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="one small shape per launcher (what the test compiles)"
    )
    ap.add_argument(
        "--out", default="benchmarks/kernels_compile", help="output stem: writes <out>.csv and <out>.json"
    )
    ap.add_argument(
        "--keep-cache",
        action="store_true",
        help="use Triton's usual cache (default: a fresh one, so that every compile really runs and is timed)",
    )
    args = ap.parse_args(argv)
    arches = args.arch or [90]
    if not args.keep_cache:
        tmp_cache = tempfile.TemporaryDirectory(prefix="triton-aot-")
        os.environ["TRITON_CACHE_DIR"] = tmp_cache.name
    t0 = time.perf_counter()
    launches = record(quick=args.quick)
    print(
        f"recorded {len(launches)} launches of {len({id(x.kernel) for x in launches})} kernels; compiling for "
        + ", ".join(f"sm_{a}" for a in arches),
        flush=True,
    )
    rows: list[Compiled] = []
    for arch in arches:
        rows += compile_launches(launches, arch, progress=lambda s: print(s, flush=True))
    missing = sorted(set(all_kernels()) - {r.kernel for r in rows})
    print()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "what": "Triton kernels compiled (not run) for the targets below, at the launch configurations the "
        "launchers choose on CUDA; resources read from the cubins",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "host_has_gpu": torch.cuda.is_available(),
        "kernels_not_compiled": missing,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with open(out.with_name(out.name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    with open(out.with_name(out.name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Compiled)])
        w.writeheader()
        for r in rows:
            w.writerow({**dataclasses.asdict(r), "scenarios": " | ".join(r.scenarios)})
    print(f"\nwrote {out.with_name(out.name + '.csv')} and {out.with_name(out.name + '.json')} ({meta['seconds']} s)")
    if missing:
        print(f"NOT COMPILED (no workload launches them): {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
