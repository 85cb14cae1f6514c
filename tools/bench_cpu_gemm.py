"""The decode GEMM on a CPU: the skinny AVX2 kernel (engines/cpu_gemm.py) against PyTorch's BLAS.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_cpu_gemm.py --threads 2

One "decode step" multiplies every weight matrix of a model by the M rows being decoded. This
script times that for the weight shapes of a Llama-family model (default: SmolLM2-135M's, 30
layers of qkv [960 x 576], proj [576 x 576], fc1 [3072 x 576], fc2 [576 x 1536], and the tied
output layer [49152 x 576]; random fp32 weights, 538 MB in all) for several M, with:
- ``w @ x.T``   (PyTorch's mm in the shape the engine used before, the faster of the two BLAS shapes);
- ``F.linear``  (x @ w.T, what a transformers model runs);
- ``skinny``    (cpu_gemm.skinny_mm: the kernel the NativeEngine uses for 5-64 rows).
It reports the best of ``--repeats`` passes over all matrices, as milliseconds per step and GB/s of
weights streamed, next to the machine's read bandwidth (a ``sum`` over a buffer of the same size),
checks every result against a float64 reference, and writes benchmarks/cpu_gemm.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_recycle.engines import cpu_gemm  # noqa: E402


def shapes(hidden: int, inter: int, qkv: int, vocab: int, layers: int) -> list[tuple[int, int]]:
    per_layer = [(qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    return per_layer * layers + [(vocab, hidden)]


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dims = shapes(a.hidden, a.intermediate, a.qkv, a.vocab, a.layers)
    weights = [torch.randn(n, k) for n, k in dims]
    total = sum(w.numel() * 4 for w in weights)
    read_gbs = total / best_of(torch.randn(total // 4).sum, a.repeats) / 1e9
    if not cpu_gemm.available():
        print(f"skinny kernel unavailable ({cpu_gemm.unavailable_reason()}); timing PyTorch only")
    rows = []
    for m in a.rows:
        xs = {k: torch.randn(m, k) for k in {k for _, k in dims}}
        impls = {
            "w @ x.T": lambda w, xs=xs: (w @ xs[w.shape[1]].t()).t(),  # a view: [M, N] like the others
            "F.linear": lambda w, xs=xs: F.linear(xs[w.shape[1]], w),
        }
        if cpu_gemm.available() and m <= cpu_gemm.MAX_ROWS:
            impls["skinny"] = lambda w, xs=xs: cpu_gemm.skinny_mm(xs[w.shape[1]], w)
        for name, f in impls.items():
            for w in weights[:4] + weights[-1:]:  # one of each shape, against float64
                ref = xs[w.shape[1]].double() @ w.double().t()
                got = f(w)
                err = (got.double() - ref).abs().max().item()
                if err > 1e-3 * w.shape[1] ** 0.5:
                    raise SystemExit(f"{name} at M={m} is wrong: max error {err}")
            t = best_of(lambda f=f: [f(w) for w in weights], a.repeats)
            rows.append({"rows": m, "impl": name, "ms_per_step": t * 1e3, "weights_gb_s": total / t / 1e9,
                         "gflops": 2 * m * total / 4 / t / 1e9})
            print(f"M={m:3d} {name:9s} {t * 1e3:8.1f} ms  {total / t / 1e9:6.1f} GB/s  {rows[-1]['gflops']:6.1f} GFLOPS",
                  flush=True)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": a.threads, "weight_mb": total / 1e6, "read_bandwidth_gb_s": read_gbs,
            "skinny_available": cpu_gemm.available(), "rows": rows}


def print_table(res: dict) -> None:
    print(f"\nweights {res['weight_mb']:.0f} MB per step; read bandwidth (sum) {res['read_bandwidth_gb_s']:.1f} GB/s; "
          f"{res['threads']} threads, {res['cpu_capability']}")
    impls = list(dict.fromkeys(r["impl"] for r in res["rows"]))
    print(f"{'rows':>5} " + " ".join(f"{i + ' ms':>14} {'GB/s':>6}" for i in impls))
    for m in dict.fromkeys(r["rows"] for r in res["rows"]):
        cells = []
        for i in impls:
            r = next((r for r in res["rows"] if r["rows"] == m and r["impl"] == i), None)
            cells.append(f"{r['ms_per_step']:14.1f} {r['weights_gb_s']:6.1f}" if r else f"{'-':>14} {'-':>6}")
        print(f"{m:5d} " + " ".join(cells))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[4, 8, 12, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--qkv", type=int, default=960, help="rows of the fused q/k/v weight")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    p.add_argument("--stem", default="cpu_gemm")
    a = p.parse_args(argv)
    if a.threads < 1 or a.repeats < 1 or a.layers < 1 or min(a.rows) < 1:
        p.error("--threads, --repeats, --layers and every --rows must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    res = run(a)
    print_table(res)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.stem}.json").write_text(json.dumps(res, indent=1))
    with open(a.out / f"{a.stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(res["rows"][0]))
        w.writeheader()
        w.writerows(res["rows"])
    print(f"wrote {a.out / a.stem}.json and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
