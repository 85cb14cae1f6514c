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

With ``--attention`` it times the attention instead (forward+backward, median of ``--repeats``):
the group's K trajectories as K padded rows under plain causal attention (what the step computes
with ``--no-pack`` / ``optim.pack_groups=false``) against the packed row through the group plan
(model.attention.group_attention) on this device's route (a CPU: each member block as two flash
calls merged by log-sum-exp; CUDA: flash attention's bottom-right causal kernel) and, for
comparison, with one masked call per block, and on CUDA as one variable-length flash call for
every segment (route ``varlen``, torch.nn.attention.varlen), with a dense output gradient as in a
model, and the query-key pairs each computes. Keys and values have ``--kv-heads`` heads (grouped-query
attention) and go through the model's own handling of them (model.attention.native_gqa /
expand_kv) on both sides. On CUDA (``--device cuda``, bf16 by default) each form's device
activities per forward+backward are counted (torch.profiler) with the device's busy time: the
packed form launches more, smaller kernels, and whether that or the arithmetic sets its pace is
what this separates from the rest of a training step. It writes bench_packing_attention.{json,csv}.

    .venv/bin/python tools/bench_packing.py --attention [--heads 9] [--head-dim 64] [--members 250 500 1000]
    python tools/bench_packing.py --attention --device cuda --k 4 --prompt 256 --members 768 \
        --heads 16 --kv-heads 8 --head-dim 128        # one Qwen3-1.7B layer's attention, bf16
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
        if len(plan.blocks) > 1:  # the blocks' positions joined (with one block, the same tensor)
            plan_bytes += plan.pos.numel() * plan.pos.element_size()
        del packed, plan
    return {"k": k, "prompt": prompt, "member": member, "mask": "dense" if dense else "plan-only",
            "rows": shape[0], "width": shape[1], "layout_s": min(times), "mask_mib": mask_bytes / 2**20,
            "plan_s": min(plan_times), "plan_mib": plan_bytes / 2**20,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _attention_case(k: int, prompt: int, member: int, heads: int, head_dim: int, repeats: int,
                    kv_heads: int | None = None, device: str = "cpu", dtype: str = "fp32") -> dict:
    import statistics

    import torch
    import torch.nn.functional as F

    from megatron_recycle.model import attention
    from megatron_recycle.model.attention import (
        GroupAttentionPlan,
        VarlenPlan,
        expand_kv,
        group_attention,
        native_gqa,
    )
    from megatron_recycle.train.batch import build_batch
    from megatron_recycle.train.packing import group_packed_layout

    kv_heads = kv_heads or heads
    dev = torch.device(device)
    dt_ = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    cuda = dev.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(4, 1000, (prompt,), generator=g).tolist()
    seqs = [shared + torch.randint(4, 1000, (member,), generator=g).tolist() for _ in range(k)]
    masks = [[0] * prompt + [1] * member for _ in range(k)]
    packed = group_packed_layout(build_batch(seqs, masks, group_ids=[0] * k), dense_mask=False)
    rows, width = packed.tokens.shape
    plan = GroupAttentionPlan.build(packed.spans, rows, width, packed.attention_mask.to(dev))
    seq = prompt + member

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def with_kv(fn):
        """The model's handling of fewer key/value heads (SDPADotProductAttention.forward)."""
        def run(q, kk, v):
            gqa = kv_heads != heads and native_gqa(q)
            if kv_heads != heads and not gqa:
                kk, v = expand_kv(kk, heads), expand_kv(v, heads)
            return fn(q, kk, v, gqa)
        return run

    def timed(fn, b: int, s: int) -> tuple[float, int | None, float | None]:
        """Median fwd+bwd seconds; on CUDA also the device activities of one and their busy seconds."""
        q = torch.randn(b, heads, s, head_dim, generator=g).to(dev, dt_).requires_grad_()
        kk, v = (torch.randn(b, kv_heads, s, head_dim, generator=g).to(dev, dt_).requires_grad_() for _ in range(2))
        grad_out = torch.randn(b, heads, s, head_dim, generator=g).to(dev, dt_)  # a dense output gradient, as in a model
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            sync()
            t = time.perf_counter()
            fn(q, kk, v).backward(grad_out)
            sync()
            times.append(time.perf_counter() - t)
        launches = busy = None
        if cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn(q, kk, v).backward(grad_out)
                sync()
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_kernels import is_device_activity

            acts = [e for e in prof.events() if is_device_activity(e)]
            launches, busy = len(acts), sum(e.time_range.elapsed_us() for e in acts) / 1e6
        return statistics.median(times[1:]), launches, busy

    scale = head_dim ** -0.5
    padded = timed(with_kv(lambda q, kk, v, gqa: F.scaled_dot_product_attention(
        q, kk, v, is_causal=True, scale=scale, enable_gqa=gqa)), k, seq)
    route = attention.packed_route(dev)
    errors: dict[str, str] = {}

    def attempt(name: str, run):
        """One form of the plan's attention; a failure (a route never run on this device before) is
        recorded in the row and the other forms are still timed."""
        try:
            return run()
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"[bench_packing] {name} failed: {errors[name]}", flush=True)
            return (None, None, None)

    grouped = attempt("plan", lambda: timed(with_kv(lambda q, kk, v, gqa: group_attention(plan, q, kk, v, scale)),
                                            rows, width))
    masked = attempt("plan_bool_mask", lambda: timed(with_kv(  # for comparison
        lambda q, kk, v, gqa: group_attention(plan, q, kk, v, scale, route="bool-mask")), rows, width))
    varlen = (None, None, None)
    if cuda:  # every segment in one variable-length flash call (route "varlen"; a CPU only emulates it)
        def run_varlen():
            plan.varlen = VarlenPlan.build(packed.spans, rows, width, dev)
            return timed(with_kv(lambda q, kk, v, gqa: group_attention(plan, q, kk, v, scale, route="varlen")),
                         rows, width)

        varlen = attempt("plan_varlen", run_varlen)
    sp = packed.spans[0][2]  # the shared prefix (the prompt less its last token, which each member repeats)
    members = [ln for _, _, _, ms in packed.spans for _, ln in ms]
    return {"k": k, "prompt": prompt, "member": member, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "device": str(dev), "dtype": dtype,
            "padded_positions": k * seq, "packed_positions": rows * width,
            "padded_pairs": k * seq * (seq + 1) // 2,
            "plan_pairs": sp * (sp + 1) // 2 + sum(ln * sp + ln * (ln + 1) // 2 for ln in members),
            "padded_fwd_bwd_s": padded[0], "plan_route": route, "plan_fwd_bwd_s": grouped[0],
            "plan_bool_mask_fwd_bwd_s": masked[0],
            "padded_launches": padded[1], "plan_launches": grouped[1], "plan_bool_mask_launches": masked[1],
            "padded_busy_s": padded[2], "plan_busy_s": grouped[2], "plan_bool_mask_busy_s": masked[2],
            "plan_varlen_fwd_bwd_s": varlen[0], "plan_varlen_launches": varlen[1], "plan_varlen_busy_s": varlen[2],
            "errors": "; ".join(f"{k}: {v}" for k, v in errors.items())}


def _write(out: Path, name: str, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / name}.json and .csv")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=5, help="trajectories per group")
    p.add_argument("--prompt", type=int, default=300, help="shared prompt tokens")
    p.add_argument("--members", type=int, nargs="+", default=[1000, 2000, 4000], help="generated tokens per trajectory")
    p.add_argument("--repeats", type=int, default=3, help="repeats per case: the fastest layout build is reported; "
                   "with --attention, the median time")
    p.add_argument("--attention", action="store_true",
                   help="time the attention (padded causal rows vs the group plan) instead of the layout")
    p.add_argument("--heads", type=int, default=9, help="attention heads (--attention; SmolLM2-135M: 9)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (--attention)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads (--attention; grouped-query attention; default: --heads; SmolLM2-135M: 3)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (--attention)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="--attention's inputs (default: bf16 on CUDA, fp32 on a CPU)")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: k,prompt,member,dense
    a = p.parse_args(argv)
    if a.case:
        k, prompt, member, dense = a.case.split(",")
        print(json.dumps(_case(int(k), int(prompt), int(member), dense == "1", a.repeats)))
        return 0
    if a.k < 1 or a.prompt < 1 or min(a.members) < 1 or a.repeats < 1 or a.heads < 1 or a.head_dim < 1:
        raise SystemExit("--k, --prompt, --members, --repeats, --heads and --head-dim must be >= 1")
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    if a.attention:
        import torch

        kv = a.kv_heads or a.heads
        if kv < 1 or a.heads % kv:
            raise SystemExit(f"--kv-heads {kv} must be >= 1 and divide --heads {a.heads}")
        dev = torch.device(a.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch finds no CUDA device here")
        dtype = a.dtype or ("bf16" if dev.type == "cuda" else "fp32")
        cuda = dev.type == "cuda"
        where = torch.cuda.get_device_name(dev) if cuda else "one thread"
        print(f"attention of one group: K={a.k}, prompt {a.prompt} tokens, {a.heads} heads ({kv} key/value) x "
              f"{a.head_dim}, {dtype}, {where}, forward+backward, median of {a.repeats}")
        print(f"{'generated':>10}{'padded pos.':>13}{'packed pos.':>13}{'padded pairs':>14}{'plan pairs':>12}"
              f"{'padded (s)':>12}{'plan (s)':>10}{'plan, masked (s)':>18}  plan route"
              + (f"{'varlen (s)':>12}   launches padded/plan/masked/varlen   device busy (ms) padded/plan/masked/varlen"
                 if cuda else ""))
        def num(x, width: int = 0, fmt: str = ".4f", scale: float = 1.0) -> str:  # a failed form: "-"
            return f"{'-' if x is None else format(scale * x, fmt):>{width}}"

        rows = []
        for member in a.members:
            r = _attention_case(a.k, a.prompt, member, a.heads, a.head_dim, a.repeats, kv, str(dev), dtype)
            rows.append(r)
            line = (f"{member:>10}{r['padded_positions']:>13}{r['packed_positions']:>13}{r['padded_pairs']:>14}"
                    f"{r['plan_pairs']:>12}{num(r['padded_fwd_bwd_s'], 12)}{num(r['plan_fwd_bwd_s'], 10)}"
                    f"{num(r['plan_bool_mask_fwd_bwd_s'], 18)}  {r['plan_route']}")
            if cuda:
                line += (f"{num(r['plan_varlen_fwd_bwd_s'], 12)}"
                         f"   {r['padded_launches']}/{r['plan_launches']}/{r['plan_bool_mask_launches']}"
                         f"/{r['plan_varlen_launches']}"
                         f"   {num(r['padded_busy_s'], 0, '.3f', 1e3)}/{num(r['plan_busy_s'], 0, '.3f', 1e3)}/"
                         f"{num(r['plan_bool_mask_busy_s'], 0, '.3f', 1e3)}/{num(r['plan_varlen_busy_s'], 0, '.3f', 1e3)}")
            if r["errors"]:
                line += f"   failed: {r['errors']}"
            print(line)
        meta["device"] = where if cuda else meta["machine"]
        _write(Path(a.out), "bench_packing_attention", {**meta, "torch": torch.__version__}, rows)
        return 0
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
    _write(Path(a.out), "bench_packing_layout", meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
