"""Cost of building a group-packed micro-batch's layout on the host (train.step.group_packed_layout).

For one GRPO group of K trajectories sharing a prompt (P prompt tokens, M generated tokens each),
the packed row is P + K x M positions wide. With the dense tree mask the layout holds a
[rows, 1, S, S] bool mask (and builds it from several S x S intermediates); with the plan-only
mask (what the trainer uses where the attention runs by the group plan) it holds [rows, 1, 1, 1].
The attention's group plan (model.attention.GroupAttentionPlan, built once per micro-batch
forward) is timed and sized too: index tensors only, no mask.
Each case runs in a fresh process, so its peak resident memory is its own.

    .venv/bin/python tools/bench_packing.py [--k 5] [--prompt 300] [--members 1000 2000 4000] [--out benchmarks]

Prints a table (layout time, mask size, plan time and size, peak RSS) and writes bench_packing_layout.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _case(k: int, prompt: int, member: int, dense: bool, repeats: int) -> dict:
    import torch

    from megatron_recycle.model.attention import GroupAttentionPlan
    from megatron_recycle.train.batch import build_batch
    from megatron_recycle.train.packing import group_packed_layout

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(4, 1000, (prompt,), generator=g).tolist()
    seqs = [shared + torch.randint(4, 1000, (member,), generator=g).tolist() for _ in range(k)]
    masks = [[0] * prompt + [1] * member for _ in range(k)]
    batch = build_batch(seqs, masks, group_ids=[0] * k)
    times, plan_times = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        packed = group_packed_layout(batch, dense_mask=dense)
        times.append(time.perf_counter() - t)
        mask_bytes = packed.attention_mask.numel() * packed.attention_mask.element_size()
        shape = tuple(packed.tokens.shape)
        t = time.perf_counter()
        plan = GroupAttentionPlan.build(packed.spans, shape[0], shape[1], packed.attention_mask)
        plan_times.append(time.perf_counter() - t)
        plan_bytes = sum(x.numel() * x.element_size() for blk in plan.blocks for x in (blk.q, blk.k, blk.pos, blk.sel))
        del packed, plan
    return {"k": k, "prompt": prompt, "member": member, "mask": "dense" if dense else "plan-only",
            "rows": shape[0], "width": shape[1], "layout_s": min(times), "mask_mib": mask_bytes / 2**20,
            "plan_s": min(plan_times), "plan_mib": plan_bytes / 2**20,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=5, help="trajectories per group")
    p.add_argument("--prompt", type=int, default=300, help="shared prompt tokens")
    p.add_argument("--members", type=int, nargs="+", default=[1000, 2000, 4000], help="generated tokens per trajectory")
    p.add_argument("--repeats", type=int, default=3, help="layouts built per case (the fastest is reported)")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: k,prompt,member,dense
    a = p.parse_args(argv)
    if a.case:
        k, prompt, member, dense = a.case.split(",")
        print(json.dumps(_case(int(k), int(prompt), int(member), dense == "1", a.repeats)))
        return 0
    if a.k < 1 or a.prompt < 1 or min(a.members) < 1:
        raise SystemExit("--k, --prompt and --members must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rows = []
    print(f"group-packed layout of one group: K={a.k}, prompt {a.prompt} tokens (fastest of {a.repeats}, one thread)")
    print(f"{'generated':>10}{'width':>8}{'mask':>11}{'layout (s)':>12}{'mask (MiB)':>12}{'plan (s)':>10}"
          f"{'plan (MiB)':>12}{'peak RSS (GiB)':>16}")
    for member in a.members:
        for dense in (True, False):
            cmd = [sys.executable, __file__, "--case", f"{a.k},{a.prompt},{member},{int(dense)}", "--repeats", str(a.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"case {cmd[-3]} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{member:>10}{r['width']:>8}{r['mask']:>11}{r['layout_s']:>12.3f}{r['mask_mib']:>12.3f}"
                  f"{r['plan_s']:>10.4f}{r['plan_mib']:>12.3f}{r['peak_rss_gib']:>16.2f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    (out / "bench_packing_layout.json").write_text(json.dumps(meta, indent=2) + "\n")
    with open(out / "bench_packing_layout.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'bench_packing_layout'}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
