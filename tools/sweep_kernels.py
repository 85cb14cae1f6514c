"""Launch-configuration sweep and device-time breakdown of the log-prob and loss kernels (for a GPU).

    python tools/sweep_kernels.py --out /tmp/sweep            # defaults sized for an H100/H200

Three parts, each printed as a table and written to <out>.json after it ran, in the order 1, 3, 2
(so that a run stopped at its time limit keeps the parts that matter most):

1. The forward statistics kernel of token_logprobs (one read of the [T, V] logits; on one rank it
   merges each row itself and writes log p, entropy and log-sum-exp, as timed here) over block
   widths, warps and pipeline stages, each without and with the entropy's moment (without: the
   trainer's default and the liger comparison): median time (CUDA events), the device's busy time
   (torch.profiler), GB/s over the logits' bytes against a measured copy bandwidth, and the largest
   error of log-sum-exp, entropy and target logit against an fp32 PyTorch computation (float32
   logsumexp over the upcast logits; both are float32, so the errors are rounding, near 1e-5).
   kernels/logprobs.py's STATS_BLOCK_V / STATS_WARPS / STATS_STAGES take the winner.
2. The gradient kernel of token_logprobs (a read and a write of the logits) over block widths,
   warps and stages: time, GB/s, and the error against a float32 PyTorch gradient on the first
   rows. kernels/logprobs.py's GRAD_BLOCK_V / GRAD_WARPS / GRAD_STAGES take the winner.
3. grpo_loss forward+backward over token block widths, warps, token blocks per forward program and
   the forward's joint reduction, and the finish kernel's rows per step and warps
   (kernels/policy_loss.py's MAX_BLOCK_T, LOSS_WARPS, LOSS_FWD_TILES, LOSS_FWD_JOINT, FINISH_ROWS,
   FINISH_WARPS): event time, each kernel's
   device time (torch.profiler: the finish kernel, one program, apart from the per-token passes),
   the forward and backward kernels' GB/s, and the errors against the float64 reference.

Without CUDA it runs under TRITON_INTERPRET=1 at tiny sizes as a smoke test (times meaningless).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as B  # noqa: E402  (measurement helpers)
from megatron_recycle_kernels import grpo_loss, logprobs  # noqa: E402

# (BLOCK_V, warps, stages; None = Triton's default). The first is kernels/logprobs.py's setting
# (the fastest of the first sweep, H200, 2026-11-30); one warp per row with a pipelined loop is what
# liger-kernel's GRPO forward uses, and its forward read the same logits at 3.9 TB/s there.
DEFAULT_CONFIGS = [
    (2048, 4, None),
    (4096, 8, None),
    (2048, 4, 2),
    (1024, 1, 2),
    (2048, 1, 2),
    (2048, 1, 4),
    (4096, 1, 2),
    (2048, 2, 2),
    (4096, 2, 3),
]


def _reference(logits: torch.Tensor, inv_t: float, rows: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    lse, ent = [], []
    for i in range(0, logits.shape[0], rows):
        z = logits[i : i + rows].float() * inv_t
        l_ = torch.logsumexp(z, -1)
        p = torch.softmax(z, -1)
        lse.append(l_)
        ent.append(l_ - (p * z).sum(-1))
    return torch.cat(lse), torch.cat(ent)


def _kernel_times(fn, dev: torch.device) -> dict[str, float]:
    """Device time (ms) per kernel name over one call of fn (bench_kernels.gpu_activities)."""
    out: dict[str, float] = defaultdict(float)
    for name, ms in B.gpu_activities(fn, dev):
        out[name[:60]] += ms
    return dict(out)


def _time_into(row: dict, fn, dev, reps: int, warmup: int, nbytes: int, bw: float) -> None:
    """Median event time of fn (ms), its device time on CUDA, and GB/s of ``nbytes`` against the
    copy bandwidth, into ``row``."""
    row["ms"] = B.time_fn(fn, dev, reps, warmup)
    if dev.type == "cuda":
        try:
            row["device_ms"] = sum(_kernel_times(fn, dev).values())
        except Exception as e:  # the device time is a detail: the row keeps its event time
            row["device_ms"] = None
            print(f"(no device time: {e!r})"[:200])
    row["gbs"] = nbytes / (row["ms"] * 1e-3) / 1e9
    row["pct_of_copy"] = 100 * row["gbs"] / bw


def sweep_stats(dev, tokens: int, vocab: int, configs, reps: int, warmup: int, bw: float) -> list[dict]:
    inv_t = 1 / 0.9
    logits = (torch.randn(tokens, vocab, device=dev) * 2).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    ref_lse, ref_ent = _reference(logits, inv_t)
    nbytes = logits.numel() * logits.element_size()
    saved = (logprobs.STATS_BLOCK_V, logprobs.STATS_WARPS, logprobs.STATS_STAGES, logprobs.MAX_BLOCK_V)
    rows = []
    try:
        for (block_v, warps, stages), entropy in ((c, e) for c in configs for e in (False, True)):
            logprobs.STATS_BLOCK_V, logprobs.STATS_WARPS, logprobs.STATS_STAGES = block_v, warps, stages
            logprobs.MAX_BLOCK_V = max(saved[3], block_v)  # a wider block than the default cap runs as named
            row = dict(tokens=tokens, vocab=vocab, block_v=block_v, warps=warps, stages=stages, entropy=entropy)
            try:
                # the one-rank pass, as token_logprobs runs it: each row merged in the same launch
                out = logprobs._merged_outputs(tokens, logits.dtype, dev)
                fn = lambda entropy=entropy, out=out: logprobs._stats_triton(  # noqa: E731
                    logits, targets, 0, inv_t, entropy, vocab, final=out)
                fn()
                lp, ent, lse = out
                row["err_lse"] = (lse - ref_lse).abs().max().item()
                row["err_entropy"] = (ent - ref_ent).abs().max().item() if entropy else None
                t = lp + lse  # the target logit the kernel read
                row["err_target"] = (t - logits.float().gather(1, targets[:, None]).squeeze(1) * inv_t).abs().max().item()
                _time_into(row, fn, dev, reps, warmup, nbytes, bw)
            except Exception as e:  # a configuration that does not compile or run: say so, go on
                row["error"] = repr(e)[:300]
            rows.append(row)
            _print_stats_row(row)
    finally:
        logprobs.STATS_BLOCK_V, logprobs.STATS_WARPS, logprobs.STATS_STAGES, logprobs.MAX_BLOCK_V = saved
    return rows


def _print_stats_row(r: dict) -> None:
    head = (f"{r['tokens']:>7} {r['vocab']:>7} {r['block_v']:>6} {r['warps']:>5} {r['stages'] or '-':>6}"
            f" {'yes' if r['entropy'] else 'no':>4}")
    if "error" in r:
        print(f"{head}  failed: {r['error']}"[:200], flush=True)
        return
    dms = f"{r['device_ms']:.3f}" if r.get("device_ms") is not None else "-"
    err_h = "-" if r["err_entropy"] is None else f"{r['err_entropy']:.2e}"
    print(
        f"{head} {r['ms']:9.3f} {dms:>9} {r['gbs']:9.1f} {r['pct_of_copy']:6.1f}"
        f" {r['err_lse']:9.2e} {err_h:>9} {r['err_target']:9.2e}",
        flush=True,
    )


# The log-prob gradient kernel's settings (BLOCK_V, warps, stages; None = Triton's default): a read
# and a write of the logits per call. The first is kernels/logprobs.py's (GRAD_*; 2.6 ms for 16,384
# x 151,936 bf16 on an H200, 2026-11-30, against liger-kernel's backward's 2.5 ms).
GRAD_CONFIGS = [
    (4096, 8, None),
    (4096, 4, None),
    (2048, 4, None),
    (2048, 8, None),
    (2048, 2, 2),
    (1024, 1, 2),
    (4096, 16, None),
]


def sweep_grad(dev, tokens: int, vocab: int, configs, reps: int, warmup: int, bw: float) -> list[dict]:
    """The gradient kernel alone (log p's gradient, no entropy, as the trainer's loss gives it) under
    each setting: event and device time, GB/s over a read and a write of the logits, and the largest
    error against a float32 PyTorch computation of (onehot - p) * g / T, rounded to bf16 as the
    kernel's output is (max |diff| / max |reference|: one bf16 rounding step is about 4e-3)."""
    inv_t = 1 / 0.9
    logits = (torch.randn(tokens, vocab, device=dev) * 2).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    g_lp = torch.randn(tokens, device=dev)
    lse, _ = _reference(logits, inv_t)
    grad = torch.empty_like(logits)
    want_rows = min(tokens, 256)  # the error is checked on the first rows (an fp32 copy of all is large)
    z = logits[:want_rows].float() * inv_t
    want = -torch.softmax(z, -1) * g_lp[:want_rows, None]
    want[torch.arange(want_rows, device=dev), targets[:want_rows]] += g_lp[:want_rows]
    want = (want * inv_t).to(torch.bfloat16).float()
    nbytes = 2 * logits.numel() * logits.element_size()
    saved = (logprobs.GRAD_BLOCK_V, logprobs.GRAD_WARPS, logprobs.GRAD_STAGES, logprobs.MAX_BLOCK_V)
    rows = []
    try:
        for block_v, warps, stages in configs:
            logprobs.GRAD_BLOCK_V, logprobs.GRAD_WARPS, logprobs.GRAD_STAGES = block_v, warps, stages
            logprobs.MAX_BLOCK_V = max(saved[3], block_v)
            row = dict(tokens=tokens, vocab=vocab, block_v=block_v, warps=warps, stages=stages)
            try:
                fn = lambda: logprobs._grad_triton(  # noqa: E731
                    logits, targets, 0, inv_t, lse, lse, g_lp, None, out=grad, vocab_total=vocab)
                fn()
                row["err_grad"] = ((grad[:want_rows].float() - want).abs().max() / want.abs().max()).item()
                _time_into(row, fn, dev, reps, warmup, nbytes, bw)
            except Exception as e:  # a configuration that does not compile or run: say so, go on
                row["error"] = repr(e)[:300]
            rows.append(row)
            head = f"{tokens:>7} {vocab:>7} {block_v:>6} {warps:>5} {stages or '-':>6}"
            if "error" in row:
                print(f"{head}  failed: {row['error']}"[:200], flush=True)
            else:
                dms = f"{row['device_ms']:.3f}" if row.get("device_ms") is not None else "-"
                print(f"{head} {row['ms']:9.3f} {dms:>9} {row['gbs']:9.1f} {row['pct_of_copy']:6.1f}"
                      f" {row['err_grad']:9.2e}", flush=True)
    finally:
        logprobs.GRAD_BLOCK_V, logprobs.GRAD_WARPS, logprobs.GRAD_STAGES, logprobs.MAX_BLOCK_V = saved
    return rows


# grpo_loss launch settings: (BLOCK_T, warps, token blocks per forward program, joint reduction,
# finish kernel rows per step, finish kernel warps).
# The first is kernels/policy_loss.py's (measured on an H200, 2026-11-30: forward ~1.3 TB/s,
# backward 3.6 TB/s); its forward keeps 16 tokens per thread in 96-111 registers (sm_90,
# tools/compile_kernels.py), so about 4 programs fit an SM. The others hold 4-8 tokens per thread,
# some with several blocks per program (fewer reductions; 57-64 registers at 4 tokens per thread
# with KL and dual clip). Joint (1): the eight partial sums in one multi-operand reduction
# (kernels/policy_loss.py LOSS_FWD_JOINT; with KL and dual clip on sm_90: 8 barriers instead of
# 15, 80 registers instead of 96 at 2048 x 4 warps). The finish kernel (one program) took 4.4 us at
# 4M tokens and 10.3 us at 16M with 512 rows per step and 4 warps, about 1 us per step of its loop;
# wider steps with more warps (sm_90, with KL: 1024 x 8 warps 174 registers, 2048 x 16 128; 4096 x
# 16 would keep a stack) take fewer steps.
LOSS_CONFIGS = [
    (2048, 4, 1, 0, 512, 4),
    (2048, 4, 1, 1, 512, 4),
    (2048, 8, 1, 1, 512, 4),
    (1024, 4, 1, 0, 512, 4),
    (1024, 8, 4, 0, 512, 4),
    (1024, 8, 4, 1, 512, 4),
    (1024, 8, 8, 1, 512, 4),
    (2048, 16, 2, 0, 512, 4),
    (512, 4, 8, 1, 512, 4),
    (2048, 4, 1, 0, 1024, 8),
    (2048, 4, 1, 0, 2048, 16),
]
_LOSS_KNOBS = ("MAX_BLOCK_T", "LOSS_WARPS", "LOSS_FWD_TILES", "LOSS_FWD_JOINT", "FINISH_ROWS", "FINISH_WARPS")


def sweep_loss(dev, tokens: int, configs, reps: int, warmup: int, bw: float, seq: int = 4096) -> list[dict]:
    """grpo_loss forward+backward (bf16, KL and dual clip on) under each launch setting: event time,
    each kernel's device time, the forward and backward kernels' GB/s, and the loss's and
    gradient's error against the float64 reference (max |diff| / max |ref| for the gradient)."""
    from megatron_recycle_kernels import policy_loss
    from megatron_recycle_kernels import reference as R

    seq = min(seq, tokens)
    n = max(1, tokens // seq)
    lp = (-torch.rand(n, seq, device=dev) * 2).to(torch.bfloat16)
    old = (lp.float() + 0.3 * torch.randn(n, seq, device=dev)).to(torch.bfloat16)
    ref = (lp.float() + 0.1 * torch.randn(n, seq, device=dev)).to(torch.bfloat16)
    adv = torch.randn(n, device=dev)
    mask = torch.rand(n, seq, device=dev) < 0.8
    kw = dict(clip_c=3.0, kl_beta=0.04)
    xr = lp.double().requires_grad_()
    ref_loss, _ = R.grpo_loss_reference(xr, old.double(), adv.double(), mask, ref.double(), **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, xr)
    del xr
    x = lp.clone().requires_grad_()
    es = lp.element_size()
    bytes_fwd = n * seq * (3 * es + 1)  # log-probs, old, reference, mask
    saved = {k: getattr(policy_loss, k) for k in _LOSS_KNOBS}
    rows = []
    try:
        for config in configs:
            block_t, warps, tiles, joint, finish_rows, finish_warps = config
            for k, v in zip(_LOSS_KNOBS, (block_t, warps, tiles, bool(joint), finish_rows, finish_warps)):
                setattr(policy_loss, k, v)
            row = dict(tokens=n * seq, rows=n, seq=seq, block_t=block_t, warps=warps, tiles=tiles, joint=int(joint),
                       finish_rows=finish_rows, finish_warps=finish_warps)

            def fb():
                loss, _ = grpo_loss(x, old, adv, mask, ref, impl="triton", **kw)
                loss.backward()
                return loss

            try:
                loss = fb()
                row["err_loss"] = abs(loss.item() - ref_loss.item())
                row["err_grad"] = ((x.grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
                x.grad = None
                row["event_ms"] = B.time_fn(lambda: (fb(), setattr(x, "grad", None)), dev, reps, warmup)
                if dev.type == "cuda":
                    times = _kernel_times(lambda: (fb(), setattr(x, "grad", None)), dev)
                    row["kernels_ms"] = times
                    fwd = sum(v for k, v in times.items() if "fwd" in k)
                    bwd = sum(v for k, v in times.items() if "bwd" in k)
                    row["fwd_gbs"] = bytes_fwd / (fwd * 1e-3) / 1e9 if fwd else None
                    row["bwd_gbs"] = (bytes_fwd + n * seq * es) / (bwd * 1e-3) / 1e9 if bwd else None
                    row["device_ms"] = sum(times.values())
            except Exception as e:  # a setting that does not compile or run: say so, go on
                row["error"] = repr(e)[:300]
                x.grad = None
            rows.append(row)
            _print_loss_row(row, bw)
    finally:
        for k, v in saved.items():
            setattr(policy_loss, k, v)
    return rows


def _print_loss_row(r: dict, bw: float) -> None:
    head = (f"{r['tokens']:>9} {r['block_t']:>6} {r['warps']:>5} {r['tiles']:>5} {r['joint']:>5}"
            f" {r['finish_rows']:>6} {r['finish_warps']:>5}")
    if "error" in r:
        print(f"{head}  failed: {r['error']}"[:200], flush=True)
        return

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(
        f"{head} {r['event_ms']:9.3f} {f(r.get('device_ms'), '.4f'):>9} {f(r.get('fwd_gbs'), '.0f'):>8}"
        f" {f(r.get('bwd_gbs'), '.0f'):>8} {r['err_loss']:9.2e} {r['err_grad']:9.2e}",
        flush=True,
    )


def parse_loss_config(text: str) -> tuple[int, int, int, int, int, int]:
    """'block_t:warps:tiles[:joint[:finish_rows:finish_warps]]' -> (block_t, warps, tiles, joint 0/1,
    finish_rows, finish_warps), joint 0 and the finish kernel at 512 rows and 4 warps by default;
    ValueError otherwise. Block and row widths must be powers of two (Triton's tl.arange)."""
    parts = [int(v) for v in text.split(":")]
    defaults = [0, 512, 4]
    if len(parts) not in (3, 4, 6):
        raise ValueError(f"bad grpo_loss setting {text!r}")
    parts += defaults[len(parts) - 3:]
    block_t, warps, tiles, joint, finish_rows, finish_warps = parts
    pow2 = all(v >= 16 and not v & (v - 1) for v in (block_t, finish_rows))
    if min(warps, tiles, finish_warps) < 1 or joint not in (0, 1) or not pow2:
        raise ValueError(f"bad grpo_loss setting {text!r}")
    return block_t, warps, tiles, joint, finish_rows, finish_warps


def _print_fastest(what: str, rows: list[dict], tokens: list[int]) -> None:
    """The fastest setting of ``rows`` (those that ran) at each token count, with the median of all."""
    for t in tokens:
        mine = [r for r in rows if r["tokens"] == t and "error" not in r]
        if mine:
            best = min(mine, key=lambda r: r["ms"])
            print(f"fastest {what} at tokens={t}: BLOCK_V={best['block_v']} warps={best['warps']} "
                  f"stages={best['stages']} ({best['ms']:.3f} ms, median of all settings "
                  f"{statistics.median(r['ms'] for r in mine):.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", nargs="+", type=int, help="logits rows (16384 4096 on a GPU)")
    p.add_argument("--vocab", type=int, help="vocabulary (151936 on a GPU)")
    p.add_argument("--loss-tokens", nargs="+", type=int, help="grpo_loss sizes (4194304 16777216 on a GPU)")
    p.add_argument(
        "--configs", nargs="+", help="block_v:warps[:stages], e.g. 2048:1:2 (default: a set of 9)"
    )
    p.add_argument(
        "--grad-configs", nargs="+",
        help="log-prob gradient kernel block_v:warps[:stages], e.g. 2048:4 (default: a set of 7)",
    )
    p.add_argument(
        "--loss-configs", nargs="+",
        help="grpo_loss block_t:warps:tiles[:joint[:finish_rows:finish_warps]], e.g. 2048:4:2, 2048:4:1:1 or "
        "2048:4:1:0:2048:16 (default: a set of 11)"
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="benchmarks/sweep_kernels")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    configs = DEFAULT_CONFIGS
    if args.configs:
        try:
            configs = [B.parse_stats_config(c) for c in args.configs]
        except ValueError:
            p.error("--configs takes block_v:warps[:stages], e.g. 2048:1:2")
    tokens = args.tokens or ([16384, 4096] if gpu else [8])
    vocab = args.vocab or (151936 if gpu else 300)
    loss_tokens = args.loss_tokens or ([1 << 22, 1 << 24] if gpu else [4096])
    grad_configs = GRAD_CONFIGS
    if args.grad_configs:
        try:
            grad_configs = [B.parse_stats_config(c) for c in args.grad_configs]
        except ValueError:
            p.error("--grad-configs takes block_v:warps[:stages], e.g. 2048:4")
    loss_configs = LOSS_CONFIGS
    if args.loss_configs:
        try:
            loss_configs = [parse_loss_config(c) for c in args.loss_configs]
        except ValueError:
            p.error("--loss-configs takes block_t:warps:tiles[:joint[:finish_rows:finish_warps]], "
                    "e.g. 2048:4:2, 2048:4:1:1 or 2048:4:1:0:2048:16")
    name = torch.cuda.get_device_name(dev) if gpu else "CPU (Triton interpreter: times meaningless)"
    bw = B.copy_bandwidth_gbs(dev, 1024 if gpu else 16)
    print(f"device: {name}; measured copy bandwidth {bw:.1f} GB/s")
    meta = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=name,
        copy_bandwidth_gbs=bw,
        torch=torch.__version__,
        command=" ".join([sys.executable, *sys.argv]),
    )
    out = Path(args.out + "_" + dev.type + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[dict]] = dict(stats=[], loss=[], grad=[])

    def save() -> None:  # after every size: a run stopped at its time limit keeps what it measured
        out.write_text(json.dumps(dict(meta=meta, **parts), indent=1))

    # in order of what the next decisions need most: the statistics pass (liger's comparison), the
    # loss (its 80% target), then the gradient kernel (already near the copy bandwidth)
    print(f"\ntoken_logprobs statistics kernel (bf16 logits, one read), median of {args.reps}")
    print(f"{'tokens':>7} {'vocab':>7} {'BLOCK':>6} {'warps':>5} {'stages':>6} {'ent':>4} {'ms':>9} {'dev ms':>9}"
          f" {'GB/s':>9} {'%copy':>6} {'err lse':>9} {'err H':>9} {'err tgt':>9}")
    for t in tokens:
        parts["stats"] += sweep_stats(dev, t, vocab, configs, args.reps, args.warmup, bw)
        save()
        if gpu:
            torch.cuda.empty_cache()
    _print_fastest("statistics kernel", parts["stats"], tokens)
    save()
    print(f"\ngrpo_loss forward+backward (bf16, KL, dual clip), median of {args.reps}; GB/s of the"
          " forward and backward kernels from their device time")
    print(f"{'tokens':>9} {'BLOCK':>6} {'warps':>5} {'tiles':>5} {'joint':>5} {'fin R':>6} {'fin w':>5} {'ms':>9} {'dev ms':>9} {'fwd GB/s':>8}"
          f" {'bwd GB/s':>8} {'err loss':>9} {'err grad':>9}")
    for t in loss_tokens:
        parts["loss"] += sweep_loss(dev, t, loss_configs, args.reps, args.warmup, bw)
        save()
        if gpu:
            torch.cuda.empty_cache()
    save()
    print(f"\ntoken_logprobs gradient kernel (bf16 logits, a read and a write), median of {args.reps}")
    print(f"{'tokens':>7} {'vocab':>7} {'BLOCK':>6} {'warps':>5} {'stages':>6} {'ms':>9} {'dev ms':>9}"
          f" {'GB/s':>9} {'%copy':>6} {'err grad':>9}")
    for t in tokens:
        parts["grad"] += sweep_grad(dev, t, vocab, grad_configs, args.reps, args.warmup, bw)
        save()
        if gpu:
            torch.cuda.empty_cache()
    _print_fastest("gradient kernel", parts["grad"], tokens)
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
