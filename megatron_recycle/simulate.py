"""Simulate every pool strategy against a synthetic learner, at the paper's scale, in seconds.

THIS IS A TOOL FOR UNDERSTANDING AND TESTING THE POOL, NOT EVIDENCE ABOUT REAL TRAINING. The
"learner" is a table of per-query success probabilities: a query the policy trains on gets
easier (its logit rises), every query gets slightly easier as training goes on (transfer), and
all logits take a random walk (policy drift), so queries can flip between too-hard,
signal-bearing and too-easy. The printed numbers show how each strategy spends rollouts under
those assumptions, nothing more.

    megatron-recycle simulate                       # 10k queries, B=32, K=4, 84.5K rollouts
    megatron-recycle simulate --oversample 1 2 --out runs/sim.json

(``python tools/simulate_pool.py`` is the same program.) "roll/grp" is the rollouts spent per
trained group; it is reported as infinity (null in the JSON file) when no group was trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from megatron_recycle.pool import RecyclingPool

STRATEGY_K = {  # (strategy, uses --oversample values?)
    "recycle": True,
    "soft_recycle": True,
    "bounded_dapo": True,
    "grpo": False,
    "dapo": False,
}


class SyntheticLearner:
    """Per-query success probabilities that move with training (see the module docstring)."""

    def __init__(self, n: int, seed: int, learn: float, transfer: float, drift: float) -> None:
        g = torch.Generator().manual_seed(seed)
        # A mix: ~45% hard (logit around -4), ~30% medium, ~25% easy (logit around +4).
        u = torch.rand(n, generator=g, dtype=torch.float64)
        centers = torch.where(u < 0.45, -4.0, torch.where(u < 0.75, 0.0, 4.0))
        self.logits = centers + 1.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.g = g
        self.learn, self.transfer, self.drift = learn, transfer, drift

    def rollout(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        p = torch.sigmoid(self.logits[ids]).unsqueeze(1).expand(-1, k)
        return (torch.rand(p.shape, generator=self.g, dtype=torch.float64) < p).float()

    def train_on(self, ids: torch.Tensor) -> None:
        self.logits[ids] += self.learn
        self.logits += self.transfer * ids.numel()
        self.logits += self.drift * torch.randn(self.logits.shape, generator=self.g, dtype=torch.float64)


def simulate(strategy: str, oversample: int, args: argparse.Namespace) -> dict:
    pool = RecyclingPool(
        args.queries, batch_size=args.batch_size, oversample=oversample, strategy=strategy,
        seed=args.seed, max_gen_batches=args.max_gen_batches,
    )
    learner = SyntheticLearner(args.queries, args.seed + 1, args.learn, args.transfer, args.drift)
    timeline = []
    fills = []
    t0 = time.perf_counter()
    while pool.totals["rollouts"] < args.budget:
        chosen_all = []
        while True:
            ids = pool.sample()
            rewards = learner.rollout(ids, args.group_size)
            chosen_all.append(pool.update(ids, rewards))
            if not pool.needs_more:
                break
        learner.train_on(torch.cat(chosen_all))
        s = pool.stats()
        fills.append(s["batch_fill"])
        timeline.append(
            {k: s[k] for k in ("step", "rollouts", "effective_batch", "recycled", "recovery", "drift",
                               "recycled_share", "recovery_share", "drift_share", "zv_all_correct",
                               "zv_all_wrong", "live_weight_mass")}
        )
    s = pool.stats()
    tail = max(1, len(fills) // 10)
    return {
        "strategy": strategy,
        "oversample": oversample,
        "steps": pool.step,
        "rollouts": s["total_rollouts"],
        "trained_groups": s["total_effective"],
        "final_fill": sum(fills[-tail:]) / tail,
        "rollouts_per_effective_group": (s["total_rollouts"] / s["total_effective"] if s["total_effective"]
                                         else math.inf),
        # Shares over the tail's summed counts: a step with an empty effective batch has no share
        # (NaN), and averaging per-step shares would weigh a 1-group step like a full one.
        "final_recycled_share": _share(timeline[-tail:], "recycled"),
        "final_recovery_share": _share(timeline[-tail:], "recovery"),
        "final_drift_share": _share(timeline[-tail:], "drift"),
        "flipped_fraction": s["flipped_queries"] / args.queries,
        "epochs": s["pool_epoch"],
        "seconds": time.perf_counter() - t0,
        "timeline": timeline,
    }


def _share(steps: list[dict], key: str) -> float:
    """Summed ``key`` over summed effective batches of ``steps``; NaN when nothing was trained."""
    eff = sum(t["effective_batch"] for t in steps)
    return sum(t[key] for t in steps) / eff if eff else math.nan


def _share_curve(timeline: list[dict], points: int = 5) -> str:
    """The recycled share over each of ``points`` consecutive segments of the run ('-': no group
    trained in that segment)."""
    n = len(timeline)
    bounds = [round(i * n / points) for i in range(points + 1)]
    shares = [_share(timeline[a:b], "recycled") for a, b in zip(bounds, bounds[1:]) if b > a]
    return " ".join("  -" if math.isnan(x) else f"{x:.2f}" for x in shares)


def _json_safe(value):
    """A result for the JSON file: a non-finite ratio (nothing trained) becomes null, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10_000, help="pool size (paper: 10k)")
    ap.add_argument("--batch-size", type=int, default=32, help="B, groups per step (paper: 32)")
    ap.add_argument("--group-size", type=int, default=4, help="K, rollouts per query (paper: 4)")
    ap.add_argument("--oversample", type=int, nargs="+", default=[1, 2], help="k values for recycle/soft_recycle/bounded_dapo")
    ap.add_argument("--budget", type=int, default=84_500, help="total rollouts (paper: 84.5K)")
    ap.add_argument("--max-gen-batches", type=int, default=3, help="dapo: generation batches per step at most")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGY_K), choices=list(STRATEGY_K))
    ap.add_argument("--learn", type=float, default=0.6, help="logit gain of a query trained on")
    ap.add_argument("--transfer", type=float, default=2e-4, help="logit gain of every query per trained group")
    ap.add_argument("--drift", type=float, default=0.05, help="std of the per-step random walk of every logit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default="", help="write all results (with timelines) to this JSON file")
    args = ap.parse_args(argv)
    for name in ("queries", "batch_size", "group_size", "budget", "max_gen_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.oversample) < 1:
        ap.error(f"--oversample values must be >= 1, got {args.oversample}")
    for name in ("learn", "transfer", "drift"):
        if not math.isfinite(getattr(args, name)):
            ap.error(f"--{name} must be a finite number, got {getattr(args, name)}")
    if args.drift < 0:
        ap.error(f"--drift is a standard deviation: it must be >= 0, got {args.drift}")
    k_max = max([k for st in args.strategies for k in (args.oversample if STRATEGY_K[st] else [1])])
    if k_max * args.batch_size > args.queries:
        ap.error(f"a step draws k*B = {k_max}*{args.batch_size} candidates but the pool has only "
                 f"{args.queries} queries (--queries)")

    print("Pool simulator: a synthetic learner, NOT real training (see --help).", flush=True)
    print(f"queries={args.queries} B={args.batch_size} K={args.group_size} budget={args.budget} rollouts\n", flush=True)
    results = []
    for strategy in args.strategies:
        for k in args.oversample if STRATEGY_K[strategy] else [1]:
            results.append(simulate(strategy, k, args))
            r = results[-1]
            print(f"  ran {strategy:<13} k={k}: {r['steps']} steps in {r['seconds']:.1f}s", flush=True)

    header = f"\n{'strategy':<13} {'k':>2} {'steps':>6} {'trained':>8} {'fill':>6} {'roll/grp':>8} " \
             f"{'recycled':>8} {'recov':>6} {'drift':>6} {'flipped':>7}   recycled share by fifth of the run"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['strategy']:<13} {r['oversample']:>2} {r['steps']:>6} {r['trained_groups']:>8} "
            f"{r['final_fill']:>6.2f} {r['rollouts_per_effective_group']:>8.2f} "
            f"{r['final_recycled_share']:>8.2f} {r['final_recovery_share']:>6.2f} {r['final_drift_share']:>6.2f} "
            f"{r['flipped_fraction']:>7.2f}   {_share_curve(r['timeline'])}"
        )
    print("\nfill: mean over the last 10% of steps; recycled, recov, drift: shares of the groups trained in\n"
          "those steps; roll/grp: rollouts per trained group; '-' or nan: no group trained.\n"
          "recycled follows METHOD.md: an earlier draw of the query was zero-variance. The baselines\n"
          "consume every drawn query, so theirs are queries drawn again after an epoch reset.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": vars(args), "results": [_json_safe(r) for r in results]}
        Path(args.out).write_text(json.dumps(payload, indent=1, allow_nan=False))
        print(f"wrote {args.out}")
    return {"args": vars(args), "results": results}


if __name__ == "__main__":
    main(sys.argv[1:])
