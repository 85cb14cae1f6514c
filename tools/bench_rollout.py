"""Multi-turn rollout time through the trainer's own path, with and without the native engine's
prefix store (and, with ``--engines native+hf``, the HF engine), on identical rollouts.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_rollout.py --model runs/embedded_cpu/final_hf

Builds the runtime exactly as ``megatron-recycle train`` does (``setup_runtime`` on the recipe,
BM25 retriever), then rolls out the same queries (K trajectories each, up to
``rollout.max_turns`` searches, the same seed) once per variant in each round: ``--warmup``
untimed rounds first (allocator, thread pools and caches warm for every variant alike), then
``--repeats`` timed rounds, the variants in reverse order every other round so that no variant
always runs first. The untrained packaged model rarely searches, so pass a policy that has
learned the tag protocol: ``runs/embedded_cpu/final_hf`` after the README's main job, or its
``sft/hf``. Prints a table (seconds per rollout batch, generate calls, prompt tokens reused from
the store) and writes ``benchmarks/<stem>.{json,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "recipes" / "embedded_cpu.yaml"))
    p.add_argument("--model", default=str(REPO / "runs" / "embedded_cpu" / "final_hf"),
                   help="policy folder (HF format) that uses the search protocol")
    p.add_argument("--queries", type=int, default=8, help="training queries rolled out (K trajectories each)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; each runs every variant once")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (not in the results)")
    p.add_argument("--engines", choices=("native", "native+hf"), default="native",
                   help="native: store on/off; native+hf: also the HF engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--stem", default="rollout_prefix_store")
    a = p.parse_args(argv)
    if a.queries < 1 or a.repeats < 1:
        p.error("--queries and --repeats must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if not Path(a.model).exists():
        p.error(f"--model {a.model} does not exist; run the README's main job first "
                "(it writes runs/embedded_cpu/final_hf) or pass another trained policy folder")
    return a


def schedule(variants: list[str], repeats: int, warmup: int) -> list[tuple[int, str, bool]]:
    """(round, variant, timed) in run order: warm-up rounds (round < 0) first, untimed; every
    odd round runs the variants in reverse order."""
    out = []
    for r in range(-warmup, repeats):
        order = variants if (r + warmup) % 2 == 0 else variants[::-1]
        out.extend((r, name, r >= 0) for name in order)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from megatron_recycle.config import load_config
    from megatron_recycle.engines.native import NativeEngine
    from megatron_recycle.train import runtime as rtm
    from megatron_recycle.train.grpo import rollout_share

    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, [f"model.name_or_path={a.model}", "rollout.engine=native"])
    rt = rtm.setup_runtime(cfg, model_path=a.model, lr=1e-6, warmup_steps=0, total_steps=1)
    rt.retriever = rtm.build_retriever_from_config(cfg)
    examples = rtm.read_examples(rtm.ensure_data(cfg)["train"], cfg, a.queries)
    ids = torch.arange(len(examples))
    native = rt.engine
    if not isinstance(native, NativeEngine):
        raise SystemExit(f"expected the native engine at tp=pp=1, got {type(native).__name__}")
    variants = {"native, prefix store": (native, True), "native, no store": (native, False)}
    if a.engines == "native+hf":
        variants["hf (transformers copy)"] = (rtm.build_engine(cfg, a.model, rt.tokenizer), None)

    rows: dict[str, list[dict]] = {k: [] for k in variants}
    for r, name, timed in schedule(list(variants), a.repeats, a.warmup):
        engine, store = variants[name]
        if store is not None:
            engine.prefix_cache = store
            engine.clear_prefix_cache()
        rt.engine = engine
        calls = []
        original = engine.generate

        def counted(prompts, params, original=original, calls=calls):
            calls.append(sum(len(p) for p in prompts))
            return original(prompts, params)

        engine.generate = counted
        reused0 = getattr(engine, "reused_tokens", 0)
        t0 = time.perf_counter()
        trajs = rollout_share(rt, examples, ids, step=0, gen_batch=0)
        seconds = time.perf_counter() - t0
        del engine.generate
        run = {"round": r, "seconds": seconds, "generate_calls": len(calls), "prompt_tokens": sum(calls),
               "reused_tokens": getattr(engine, "reused_tokens", 0) - reused0,
               "trajectories": len(trajs), "tokens": sum(len(t.token_ids) for t in trajs)}
        if timed:
            rows[name].append(run)
        print(f"{'round ' + str(r) if timed else 'warm-up':<8} {name:<24} {seconds:6.1f} s  calls {len(calls)}  "
              f"prompt tokens {sum(calls)}  reused {run['reused_tokens']}", flush=True)

    summary = {k: {"median_s": statistics.median(x["seconds"] for x in v), "runs": v} for k, v in rows.items()}
    print(f"\n{'variant':<26}{'median s':>10}{'calls':>8}{'prompt tok':>12}{'reused':>10}")
    for k, v in summary.items():
        last = v["runs"][-1]
        print(f"{k:<26}{v['median_s']:>10.1f}{last['generate_calls']:>8}{last['prompt_tokens']:>12}"
              f"{last['reused_tokens']:>10}")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])]),
            "machine": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
            "torch": torch.__version__, "threads": a.threads, "model": a.model, "queries": a.queries,
            "group_size": cfg.rollout.group_size, "max_turns": cfg.rollout.max_turns,
            "repeats": a.repeats, "warmup_rounds": a.warmup}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.stem}.json").write_text(json.dumps({**meta, "variants": summary}, indent=2) + "\n")
    with open(out / f"{a.stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "round", "seconds", "generate_calls", "prompt_tokens", "reused_tokens", "tokens"])
        for k, v in rows.items():
            for x in v:
                w.writerow([k, x["round"], f"{x['seconds']:.3f}", x["generate_calls"], x["prompt_tokens"],
                            x["reused_tokens"], x["tokens"]])
    print(f"wrote {out / a.stem}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
