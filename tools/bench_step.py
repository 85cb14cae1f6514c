"""Time and peak memory of one GRPO training step on a megatron-core model; print a table, write JSON/CSV.

    .venv/bin/python tools/bench_step.py --model smollm2-135m --n 8 --seq-len 256 --mbs 4
    torchrun --nproc-per-node 8 tools/bench_step.py --model qwen3-1.7b --bf16 --tp 2 --sequences 64 --seq-len 2048
    torchrun --nproc-per-node 2 tools/bench_step.py --model qwen3-1.7b --bf16 --tp 2 --sequence-parallel --recompute full
    torchrun --nproc-per-node 8 tools/bench_step.py --model qwen3-1.7b --bf16 --dist-opt --overlap-grad-reduce

A step has three phases, each timed separately (median over --steps after --warmup steps):
  old_logprobs      no-grad forward for log-probs at the loss positions (train.step.compute_logprobs
                    with only_loss_positions, what the trainer's KL-reference pass runs; the trainer's
                    old log-probs come from the rollout engine). Results written before 2026-11-30
                    computed every position here (more logits, and no length-grouped micro-batches).
  forward_backward  Megatron forward_backward_func over the micro-batches (GRPO loss)
  optimizer         optimizer.step (grad clipping, Adam, distributed optimizer) + LR schedule
Peak memory per phase: CUDA max_memory_allocated (reset at each phase start); on CPU the peak
resident set size (VmHWM, reset through /proc/self/clear_refs at each phase start). Also: the
activations the decoder keeps for the backward pass of one micro-batch (autograd's saved tensors,
weights excluded; what --recompute shrinks), from one extra forward (not with --pp > 1). Models:
"smollm2-135m" / "qwen3-1.7b" / "llama3.2-3b" / "tiny" are built from their published shapes with random
weights;
``--weights real`` loads SmolLM2-135M's real weights from its package (model.hf_loading), and
any local HF folder works as --model. The malloc setting (GLIBC_TUNABLES) is recorded: measure
with and without it on CPU (PLATFORM.md). ``--min-len-frac`` gives the rows uneven lengths (right
padding), which the step's length-grouped micro-batches cut (``--no-length-grouping`` pads every
micro-batch to the batch's width, to compare); tokens/s counts real tokens. ``--overlap-grad-reduce``
measures Megatron's overlapped DP gradient reduction (with DP > 1). ``--profile`` profiles one more
step: on CUDA the device activities it launches, their busy time and the share of the wall time the
device sat idle (a host-bound step shows a high share: what to compare between packed and padded
groups, packing having been the slower of the two on an H200), on a CPU the aten ops dispatched.
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
from typing import Any

import torch

PHASES = ("old_logprobs", "forward_backward", "optimizer")
REPO = Path(__file__).resolve().parent.parent


def model_config(name: str) -> Any:
    """HF config for a preset shape (random weights) or a local model folder / alias."""
    from transformers import LlamaConfig, Qwen3Config

    if name == "smollm2-135m":  # SmolLM2-135M(-Instruct) shape
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        )
    if name == "qwen3-1.7b":  # Qwen3-1.7B shape
        return Qwen3Config(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        )
    if name == "llama3.2-3b":  # Llama-3.2-3B shape, with its Llama 3 RoPE scaling
        return LlamaConfig(
            vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
            num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192),
        )
    if name == "tiny":
        return LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rope_theta=10000.0, tie_word_embeddings=True,
        )
    from megatron_recycle.model.hf_loading import load_hf_config

    return load_hf_config(name)


# ------------------------------------------------------------------------------ memory probes
class PeakMemory:
    """Peak memory since the last reset(): CUDA max_memory_allocated, or CPU VmHWM (peak RSS)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.can_reset_rss = os.path.exists("/proc/self/clear_refs")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.can_reset_rss:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        return float("nan")


def saved_activation_gib(chunks: list, batch: Any, mbs: int, pack_groups: bool = True) -> float:
    """GiB the decoder layers keep for the backward pass of one training micro-batch: the unique
    storages saved by autograd (``saved_tensors_hooks``) while the decoder runs forward, weights
    excluded. Activation recomputation shrinks exactly this (on any device, whatever the allocator
    keeps around). Runs one extra forward of the first micro-batch, then drops its graph."""
    from megatron_recycle.model.build import unwrap_model
    from megatron_recycle.train.step import _forward_step, _micro_batches

    model = chunks[0]
    gpt = unwrap_model(model)
    params = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    saved: dict[int, int] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0]:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
        return t

    hooks = [gpt.decoder.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             gpt.decoder.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    mb = _micro_batches(batch.rows(0, mbs), mbs, pack_groups, chunks, select=True)  # the step's own layout
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output, _ = _forward_step(lambda *a: None, iter(mb), model)
        del output
    finally:
        for h in hooks:
            h.remove()
    return sum(saved.values()) / 2**30


def profile_step(run_step, top: int = 12) -> dict[str, Any]:
    """One more step (``run_step()``) under torch.profiler: its wall time, and on CUDA the device
    activities it launched (kernels, copies, fills), their busy time and the share of the wall time
    the device sat idle (high: the host's Python and launches set the pace), with the costliest
    kernels by total device time; on a CPU the aten ops dispatched (each would be at least one
    launch on a GPU) and the costliest by self time. What tells whether a step is host-bound."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run_step()
        _sync()
        wall = time.perf_counter() - t0
    out: dict[str, Any] = {"wall_s": wall}
    if cuda:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_kernels import is_device_activity  # device work, not user ranges (Optimizer.step)

        kernels = [e for e in prof.events() if is_device_activity(e)]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name[:80], []).append(e.time_range.elapsed_us() / 1e3)
        out.update(device_activities=len(kernels), device_busy_s=busy,
                   device_idle_frac=max(0.0, 1.0 - busy / wall) if wall > 0 else None,
                   top=[(n, len(v), sum(v)) for n, v in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]])
    else:
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        out.update(aten_ops=sum(e.count for e in ops),
                   top=[(e.key, e.count, e.self_cpu_time_total / 1e3)
                        for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]])
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_batch(n: int, seq_len: int, vocab: int, prompt_frac: float, seed: int, group_size: int = 1,
                 min_len_frac: float = 1.0) -> Any:
    """N x L random tokens; the first prompt_frac of each row is prompt (mask 0); advantages +-1.

    ``group_size`` > 1: consecutive rows form GRPO groups that share their prompt (group_ids set),
    so the step packs them (optim.pack_groups) as it does in training. ``min_len_frac`` < 1: each
    row's length is drawn uniformly from [min_len_frac * L, L] and the rest is right padding (what
    multi-turn trajectories of different lengths look like; the longest row sets L)."""
    from megatron_recycle.train.batch import TrajectoryBatch

    if group_size < 1 or n % group_size:
        raise SystemExit(f"--group-size {group_size} must be >= 1 and divide --sequences {n}")
    if not 0 < min_len_frac <= 1:
        raise SystemExit(f"--min-len-frac {min_len_frac} must be in (0, 1]")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq_len), generator=g)
    prompt = max(1, int(prompt_frac * seq_len))
    mask = torch.zeros(n, seq_len)
    mask[:, prompt:] = 1.0
    if min_len_frac < 1:
        shortest = min(seq_len, max(prompt + 2, int(min_len_frac * seq_len)))
        lengths = torch.randint(shortest, seq_len + 1, (n,), generator=g)
        lengths[0] = seq_len  # the batch is as long as its longest row
        cols = torch.arange(seq_len)[None, :]
        tokens = tokens.masked_fill(cols >= lengths[:, None], 0)
        mask = mask.masked_fill(cols >= lengths[:, None], 0.0)
    adv = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    if group_size == 1:
        return TrajectoryBatch(tokens, mask, adv)
    tokens[:, :prompt] = tokens[::group_size, :prompt].repeat_interleave(group_size, dim=0)
    return TrajectoryBatch(tokens, mask, adv, group_ids=torch.arange(n) // group_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | qwen3-1.7b | llama3.2-3b | tiny | a local HF folder")
    p.add_argument("--weights", choices=("random", "real"), default="random")
    # --sequences under torchrun: torchrun's own parser takes "--n" for an ambiguous prefix of its options
    p.add_argument("--n", "--sequences", dest="n", type=int, default=8, help="sequences per DP rank")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=1,
                   help="K: rows of a group share their prompt and are group-packed, as in training (1: no groups)")
    p.add_argument("--no-pack", action="store_true",
                   help="train the groups on padded rows (optim.pack_groups=false), to compare with group packing")
    p.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    p.add_argument("--min-len-frac", type=float, default=1.0,
                   help="row lengths uniform in [F x seq-len, seq-len], right-padded (default 1: all full)")
    p.add_argument("--no-length-grouping", action="store_true",
                   help="pad every micro-batch to the batch's width (train.step.LENGTH_GROUPING off), to compare")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (model.vpp; needs --pp > 1)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--dist-opt", action="store_true", help="Megatron distributed optimizer")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                   help="activation recomputation (model.recompute)")
    p.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    p.add_argument("--recompute-num-layers", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (needs --tp > 1)")
    p.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Megatron DDP's overlapped gradient reduction (optim.overlap_grad_reduce; pays off with DP > 1)")
    p.add_argument("--bucket-size", type=int, default=None,
                   help="parameters per gradient bucket with --overlap-grad-reduce (default: Megatron's)")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step (torch.profiler): device activities, busy time and idle share "
                        "on CUDA, aten ops on a CPU, the costliest kernels; in the JSON as 'profile'")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: OMP_NUM_THREADS or torch's")
    p.add_argument("--out", default=str(REPO / "benchmarks"), help="folder for the JSON/CSV")
    p.add_argument("--tag", default=None, help="file name tag (default: the malloc setting and the options that change the "
                   "step, e.g. malloc-default_k2; a rerun with the same settings replaces its file)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)

    from megatron_recycle.model.build import describe_memory_options, memory_options, unwrap_model
    from megatron_recycle.model.parallel import destroy_distributed, init_distributed
    from megatron_recycle.train.optim import describe_grad_reduction, setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    if a.bucket_size is not None and not a.overlap_grad_reduce:
        raise SystemExit("--bucket-size only applies with --overlap-grad-reduce")
    cfg = model_config(a.model)
    if a.vpp is not None and (a.pp < 2 or a.vpp < 1):
        raise SystemExit("--vpp needs --pp > 1 and a value >= 1")
    layout = init_distributed(a.tp, a.pp, a.vpp, seed=0, model_config=cfg)
    load = None
    if a.weights == "real":
        from megatron_recycle.model.convert import load_hf_weights

        load = lambda chunks: load_hf_weights(chunks, a.model, cfg)  # noqa: E731
    chunks, opt, sched = setup_model_and_optimizer(
        cfg, lr=1e-6, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=a.dist_opt, bf16=a.bf16,
        warmup_steps=0, total_steps=a.steps + a.warmup, load_weights=load, lr_decay_style="constant",
        model_options=memory_options(a.recompute, a.recompute_method, a.recompute_num_layers, a.sequence_parallel),
        overlap_grad_reduce=a.overlap_grad_reduce, ddp_bucket_size=a.bucket_size,
    )
    memory = ", ".join(x for x in (describe_memory_options(unwrap_model(chunks[0]).config) or "no recomputation",
                                   describe_grad_reduction(chunks)) if x)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if a.no_length_grouping:
        from megatron_recycle.train import step as step_mod

        step_mod.LENGTH_GROUPING = False
    batch = random_batch(a.n, a.seq_len, cfg.vocab_size, 0.25, seed=layout.dp_rank, group_size=a.group_size,
                         min_len_frac=a.min_len_frac)
    mem = PeakMemory()
    rows: list[dict[str, float]] = []
    for i in range(a.warmup + a.steps):
        rec: dict[str, float] = {}
        mem.reset()
        _sync()
        t = time.perf_counter()
        old = compute_logprobs(chunks, batch, a.mbs, only_loss_positions=True,  # other positions: masked out
                               pack_groups=not a.no_pack)
        _sync()
        rec["time/old_logprobs_s"] = time.perf_counter() - t
        rec["mem/old_logprobs_gib"] = mem.peak_gib()

        def on_phase(name: str, rec: dict[str, float] = rec) -> None:
            prev = {"optimizer": "forward_backward", "end": "optimizer"}.get(name)
            if prev:
                rec[f"mem/{prev}_gib"] = mem.peak_gib()
            if name != "end":
                mem.reset()

        metrics = grpo_train_step(chunks, opt, sched, batch.replace(old_logprobs=old), a.mbs, GRPOLossConfig(),
                                  on_phase=on_phase, pack_groups=not a.no_pack)
        rec.update({k: v for k, v in metrics.items() if k.startswith("time/") or k in ("loss", "grad_norm")})
        rec["packed_saved_tokens"] = metrics.get("packed_saved_tokens", 0.0)
        if i >= a.warmup:
            rows.append(rec)
    # the extra measurements after the timed steps: a failure in one is reported, and the timings
    # already measured are still printed and written
    activations = float("nan")
    if a.pp == 1:
        try:
            activations = saved_activation_gib(chunks, batch, a.mbs, pack_groups=not a.no_pack)
        except Exception as e:  # noqa: BLE001
            print(f"[bench_step] activation measurement failed: {type(e).__name__}: {e}", flush=True)
    prof = None
    if a.profile:
        def run_step() -> None:
            old = compute_logprobs(chunks, batch, a.mbs, only_loss_positions=True, pack_groups=not a.no_pack)
            grpo_train_step(chunks, opt, sched, batch.replace(old_logprobs=old), a.mbs, GRPOLossConfig(),
                            pack_groups=not a.no_pack)

        try:
            prof = profile_step(run_step)
        except Exception as e:  # noqa: BLE001
            print(f"[bench_step] --profile failed: {type(e).__name__}: {e}", flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    times = {
        "old_logprobs": med("time/old_logprobs_s"),
        # the step's host work before its forward/backward: token counts, micro-batches (packed
        # layout, group plans) and their copies to the device; packing makes it costlier
        "prepare": statistics.median(max(0.0, r["time/step_s"] - r["time/forward_backward_s"] - r["time/optimizer_s"])
                                     for r in rows),
        "forward_backward": med("time/forward_backward_s"),
        "optimizer": med("time/optimizer_s"),
    }
    if prof is not None and prof.get("device_busy_s") is not None:
        # the profiler's own per-op recording lengthens the profiled step, the more the more ops it
        # dispatches (a packed step dispatches more): the idle share against the unprofiled median too
        step = sum(times.values())
        prof["step_s_unprofiled"] = step
        prof["device_idle_frac_unprofiled"] = max(0.0, 1.0 - prof["device_busy_s"] / step) if step > 0 else None

    mems = {ph: max(r[f"mem/{ph}_gib"] for r in rows) for ph in PHASES}
    tokens = int(batch.loss_extent().sum())  # real tokens (a.n * a.seq_len without --min-len-frac)
    malloc = os.environ.get("GLIBC_TUNABLES", "")
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "glibc_tunables": malloc,
        "load_average_at_end": os.getloadavg(),  # other work on the machine skews CPU timings
        "model": a.model, "weights": a.weights, "params_this_rank": n_params, "bf16": a.bf16,
        "tp": a.tp, "pp": a.pp, "vpp": a.vpp, "dp": layout.dp, "dist_opt": a.dist_opt,
        "recompute": a.recompute, "recompute_method": a.recompute_method,
        "recompute_num_layers": a.recompute_num_layers, "sequence_parallel": a.sequence_parallel,
        "overlap_grad_reduce": a.overlap_grad_reduce, "bucket_size": a.bucket_size,
        "memory_options": memory,
        "n": a.n, "seq_len": a.seq_len, "group_size": a.group_size, "group_packing": a.group_size > 1 and not a.no_pack,
        "packed_saved_tokens": rows[-1]["packed_saved_tokens"], "mbs": a.mbs, "steps": a.steps,
        "min_len_frac": a.min_len_frac, "length_grouping": not a.no_length_grouping,
        "old_logprobs_positions": "loss",
        "loss_tokens": int(batch.target_mask.sum()),
        "warmup": a.warmup,
        "time_s": times, "step_time_s": sum(times.values()),
        "tokens_per_s": tokens / sum(times.values()), "real_tokens": tokens,
        "peak_mem_gib": mems, "mem_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)",
        "loss_last": rows[-1]["loss"], "grad_norm_last": rows[-1]["grad_norm"],
        # kept for backward by the decoder, one micro-batch (saved_activation_gib; NaN with PP > 1)
        "saved_activations_gib_per_microbatch": activations,
    }
    if prof is not None:
        result["profile"] = prof
    # the group plan's attention route ($MEGATRON_RECYCLE_PACKED_ATTENTION, else the device's default)
    from megatron_recycle.model.attention import packed_route as route_of

    packed_route = route_of("cuda" if torch.cuda.is_available() else "cpu")
    result["packed_attention_route"] = packed_route if a.group_size > 1 and not a.no_pack else None
    if layout.rank == 0:
        ragged = (f" (lengths {a.min_len_frac:g}-1 x L, {'length-grouped' if not a.no_length_grouping else 'batch-wide'}"
                  " micro-batches)" if a.min_len_frac < 1 else "")
        print(f"\nGRPO step: {a.model} ({a.weights} weights, {n_params / 1e6:.1f}M params/rank), N={a.n} x L={a.seq_len}{ragged}"
              f"{f' in groups of {a.group_size} ' if a.group_size > 1 else ''}"
              f"{('(padded rows)' if a.no_pack else f'(packed, attention route {packed_route})') if a.group_size > 1 else ''}, "
              f"mbs={a.mbs}, tp={a.tp} pp={a.pp}{f' vpp={a.vpp}' if a.vpp else ''} dp={layout.dp}, bf16={a.bf16}, "
              f"dist_opt={a.dist_opt}, {memory}")
        print(f"device: {result['device']}, threads={result['threads']}, GLIBC_TUNABLES={malloc or '(unset)'}")
        print(f"median of {a.steps} steps after {a.warmup} warm-up\n")
        print(f"{'phase':<18}{'time (s)':>10}{'peak mem (GiB)':>16}")
        for ph in times:
            print(f"{ph:<18}{times[ph]:>10.3f}" + (f"{mems[ph]:>16.2f}" if ph in mems else f"{'-':>16}"))
        print(f"{'total':<18}{sum(times.values()):>10.3f}{max(mems.values()):>16.2f}")
        print(f"tokens/s (old-logprob fwd + train step): {result['tokens_per_s']:.0f}"
              f"{f' ({tokens} real tokens of {a.n * a.seq_len})' if tokens != a.n * a.seq_len else ''}")
        print(f"decoder activations kept for backward, one micro-batch of {a.mbs}: {activations:.3f} GiB\n")
        if prof is not None:
            if "device_activities" in prof:
                print(f"profiled step: {prof['wall_s']:.3f} s wall, {prof['device_activities']} device activities, "
                      f"busy {prof['device_busy_s']:.3f} s, idle {100 * (prof['device_idle_frac'] or 0):.0f}% of the wall time "
                      f"({100 * (prof['device_idle_frac_unprofiled'] or 0):.0f}% of the unprofiled step's "
                      f"{prof['step_s_unprofiled']:.3f} s)")
                unit = "device ms"
            else:
                print(f"profiled step: {prof['wall_s']:.3f} s wall, {prof['aten_ops']} aten ops dispatched")
                unit = "self CPU ms"
            print(f"  {'count':>7} {unit:>12}  name")
            for name, count, ms in prof["top"]:
                print(f"  {count:>7} {ms:>12.2f}  {name}")
            print()
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = a.tag or ("malloc-tuned" if "mmap_max=0" in malloc else "malloc-default")
        if a.recompute != "none" and not a.tag:
            tag += f"_recompute-{a.recompute}"
        if a.sequence_parallel and not a.tag:
            tag += "_sp"
        if a.overlap_grad_reduce and not a.tag:
            tag += "_overlap"
        if a.pp > 1 and not a.tag:
            tag += f"_pp{a.pp}" + (f"vpp{a.vpp}" if a.vpp else "")
        if a.group_size > 1 and not a.tag:
            tag += f"_k{a.group_size}" + ("_nopack" if a.no_pack else "")
        if a.min_len_frac < 1 and not a.tag:
            tag += f"_ragged{a.min_len_frac:g}" + ("_nogroup" if a.no_length_grouping else "")
        stem = f"bench_step_{Path(a.model).name}_{a.n}x{a.seq_len}_{tag}"  # may contain dots (a model "x.y")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(out / f"{stem}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["phase", "time_s", "peak_mem_gib"])
            for ph in times:
                w.writerow([ph, f"{times[ph]:.4f}", f"{mems[ph]:.3f}" if ph in mems else ""])
        print(f"wrote {out / stem}.json and .csv")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
