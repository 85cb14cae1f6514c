"""Our GRPO step against TRL's GRPOTrainer on the same work, side by side on a CPU (issue 8).

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_vs_trl.py --threads 2 --steps 4 --allocator both

One step, on both sides: SmolLM2-135M-Instruct (from its package), 4 single-turn chat prompts x 4
completions, at most 64 new tokens, temperature 1.0, no KL term, one AdamW step (weight decay 0,
TRL's default; same lr; grad clip 1.0; constant lr), fp32. Ours = what the trainer runs by
default on this layout: NativeEngine generation (decoding with the Megatron model's own tensors,
a group's prompt prefilled once) + megatron_recycle_kernels.grpo_advantages + Megatron
grpo_train_step with group packing (a group's prompt forwarded and back-propagated once; the
same gradient) and no weight export (the engine already reads the updated tensors).
``--engine hf`` (HFEngine over a transformers copy + export after each step) and ``--no-pack``
(padded rows) measure the step without each of the two. TRL = one GRPOTrainer optimizer step (per_device_train_batch_size=16,
num_generations=4, beta=0, no vLLM, bf16 and gradient checkpointing off to match our fp32 step).
The reward is a seeded random 0/1 per completion, forced to hold one 1 and one 0 in every group,
so every group is signal-bearing on both sides and nothing is skipped.

Each side runs in its own worker process (a clean peak RSS each, the same thread count, the same
GLIBC_TUNABLES); the parent alternates them step by step, drops each side's first step and
reports median / min / max step time, the phase split, peak RSS and the ratio; it writes
benchmarks/vs_trl_<allocator>.{json,csv}. --allocator keep starts the workers with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 (PLATFORM.md).

Phases. Ours: generation, advantages, forward_backward (Megatron's schedule: forward, log-probs,
loss and backward together), optimizer, weight_sync. TRL (by wrapping its methods): generation
(``_generate``), score (the rest of ``_generate_and_score_completions``: rewards, advantages and
any extra log-prob forward), forward (``compute_loss``: policy forward + loss), backward (the rest
of ``training_step``), optimizer (between the on_pre_optimizer_step / on_optimizer_step callbacks),
other (the remainder of the step: clipping, scheduler, logging).

TRL is an optional dependency of this benchmark only. Install it without touching the CPU torch:

    .venv/bin/pip install --dry-run trl   # check that the plan does not list torch
    .venv/bin/pip install trl             # trl 1.16.0 adds datasets, pandas, dill, multiprocess, xxhash

(if the dry run would replace torch: ``pip install --no-deps trl datasets`` plus the missing
pure-Python packages it reports at import). Without trl the TRL side is skipped with a message.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KEEP_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
MARK = "@@BENCH "  # worker -> parent protocol lines on stdout
PROMPTS = (
    "What is the capital of France?",
    "Who wrote the novel Pride and Prejudice?",
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level in Celsius?",
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the largest ocean on Earth?",
    "In which year did the first person walk on the Moon?",
)


# ------------------------------------------------------------------------------- shared work
def group_rewards(completions: list[list[int]], group_size: int, seed: int, step: int) -> list[float]:
    """Seeded pseudo-random 0/1 reward per completion, forced to mix 0 and 1 inside every group.

    Deterministic in (seed, step, token ids), so it needs no state; groups are consecutive blocks
    of ``group_size`` completions (TRL's and our order). Every group is signal-bearing.
    """
    if group_size < 2 or len(completions) % group_size != 0:
        raise ValueError(
            f"{len(completions)} completions do not form groups of {group_size} (need group_size >= 2 dividing it)"
        )
    out: list[float] = []
    for g in range(0, len(completions), group_size):
        r = []
        for ids in completions[g : g + group_size]:
            h = hashlib.blake2b(f"{seed}:{step}:{','.join(map(str, ids))}".encode(), digest_size=8).digest()
            r.append(float(h[0] & 1))
        if min(r) == max(r):  # constant group: force one success and one failure
            r[0], r[1] = 1.0, 0.0
        out += r
    return out


def prompt_messages(n: int) -> list[list[dict[str, str]]]:
    """``n`` single-turn chat prompts (plain questions), the same on both sides."""
    if not 1 <= n <= len(PROMPTS):
        raise ValueError(f"--prompts must be in [1, {len(PROMPTS)}], got {n}")
    return [[{"role": "user", "content": q}] for q in PROMPTS[:n]]


def peak_rss_gib() -> float:
    """Peak resident set size of this process (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _wait_go() -> bool:
    """Block until the parent says go (True) or stop (False)."""
    line = sys.stdin.readline()
    return line.strip() == "go"


# --------------------------------------------------------------------------------- our side
class OurSide:
    """Our GRPO step: rollouts (native or HF engine) -> grpo_advantages -> Megatron grpo_train_step
    (group-packed unless pack=False) -> weight export into the engine (HF engine only)."""

    def __init__(self, model: str, prompts: int, group: int, max_new: int, lr: float, mbs: int,
                 seed: int, random_tiny: bool = False, engine: str = "native", pack: bool = True) -> None:
        import torch

        from megatron_recycle.engines.hf import HFEngine
        from megatron_recycle.model.parallel import init_distributed
        from megatron_recycle.train.optim import setup_model_and_optimizer

        if engine not in ("native", "hf"):
            raise ValueError(f"engine must be 'native' or 'hf', got {engine!r}")
        self.group, self.max_new, self.mbs, self.seed, self.pack = group, max_new, mbs, seed, pack
        if random_tiny:  # tests: a tiny random Llama and a stand-in tokenizer
            from transformers import LlamaConfig, LlamaForCausalLM

            self.hf_config = LlamaConfig(
                vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            )
            torch.manual_seed(seed)
            hf_model = LlamaForCausalLM(self.hf_config).eval()
            hf_model.generation_config.eos_token_id = _ByteTokenizer.eos_token_id
            self.tokenizer = _ByteTokenizer()
            state = {k: v.clone() for k, v in hf_model.state_dict().items()}

            def load(chunks: list) -> None:
                from megatron_recycle.model.convert import load_hf_weights

                load_hf_weights(chunks, state, self.hf_config)
        else:
            from megatron_recycle.model.convert import load_hf_weights
            from megatron_recycle.model.hf_loading import (
                load_hf_config,
                load_hf_model,
                load_tokenizer,
                resolve_model_folder,
            )

            folder = resolve_model_folder(model)
            self.hf_config = load_hf_config(model)
            self.tokenizer = load_tokenizer(model)
            hf_model = load_hf_model(model) if engine == "hf" else None

            def load(chunks: list) -> None:
                load_hf_weights(chunks, folder, self.hf_config)

        init_distributed(1, 1, None, seed=seed, model_config=self.hf_config)
        self.chunks, self.opt, self.sched = setup_model_and_optimizer(
            self.hf_config, lr=lr, weight_decay=0.0, clip_grad=1.0, warmup_steps=0, total_steps=10**6,
            load_weights=load, lr_decay_style="constant",
        )
        if engine == "hf":
            self.engine = HFEngine(hf_model, self.tokenizer, device="cpu", max_batch_size=prompts * group)
        else:
            from megatron_recycle.engines.native import NativeEngine

            del hf_model  # the native engine decodes with the Megatron model's tensors
            self.engine = NativeEngine(self.chunks[0], self.hf_config, self.tokenizer, max_batch_size=prompts * group)
        self.prompt_ids = [
            list(self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
            for m in prompt_messages(prompts)
        ]
        self.step_index = 0

    def step(self) -> dict[str, float]:
        """One GRPO step; returns times per phase, token counts and the loss."""
        import torch
        from megatron_recycle_kernels import grpo_advantages

        from megatron_recycle.engines.base import SamplingParams
        from megatron_recycle.model.convert import export_hf_state_dict
        from megatron_recycle.train.batch import build_batch
        from megatron_recycle.train.step import GRPOLossConfig, grpo_train_step

        t: dict[str, float] = {}
        t0 = time.perf_counter()
        prompts = [p for p in self.prompt_ids for _ in range(self.group)]
        gens = self.engine.generate(prompts, SamplingParams(
            temperature=1.0, max_new_tokens=self.max_new, seed=self.seed * 1000 + self.step_index * 100))
        self.engine.sleep()  # as the trainer does before its training phase (native: drops the prefix store)
        t1 = time.perf_counter()
        completions = [g.token_ids for g in gens]
        rewards = group_rewards(completions, self.group, self.seed, self.step_index)
        adv = grpo_advantages(torch.tensor(rewards), group_size=self.group)[0]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = build_batch(
            [p + c for p, c in zip(prompts, completions)],
            [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)],
            advantages=adv, pad_token_id=pad, pad_rows_to_multiple_of=self.mbs,
            group_ids=[i // self.group for i in range(len(prompts))],
        )
        t2 = time.perf_counter()
        m = grpo_train_step(self.chunks, self.opt, self.sched, batch, self.mbs,
                            GRPOLossConfig(eps_low=0.2, eps_high=0.2), pack_groups=self.pack)
        t3 = time.perf_counter()
        if not getattr(self.engine, "shares_trainer_weights", False):
            self.engine.load_weights(export_hf_state_dict(self.chunks, self.hf_config))
        t4 = time.perf_counter()
        self.step_index += 1
        t.update(generation=t1 - t0, advantages=t2 - t1, forward_backward=m["time/forward_backward_s"],
                 optimizer=m["time/optimizer_s"], weight_sync=t4 - t3)
        t["train_other"] = (t3 - t2) - t["forward_backward"] - t["optimizer"]
        return {"step_s": t4 - t0, **{f"time/{k}": v for k, v in t.items()},
                "completion_tokens": float(sum(len(c) for c in completions)),
                "sequences": float(len(completions)), "loss": float(m["loss"]),
                "trained_positions": float(batch.num_sequences * batch.seq_length - m["packed_saved_tokens"]
                                           - m["length_cut_tokens"]),
                "reward_mean": sum(rewards) / len(rewards)}


class _ByteTokenizer:
    """A stand-in tokenizer for the tiny random model in tests (bytes -> ids 3..258 mod vocab)."""

    pad_token_id = 0
    eos_token_id = 1

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return [3 + b % 250 for b in text.encode()]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)


def run_ours_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    side = OurSide(a.model, a.prompts, a.group, a.max_new_tokens, a.lr, a.mbs, a.seed,
                   engine=a.engine, pack=not a.no_pack)
    _emit({"ready": True, "rss_gib": peak_rss_gib()})
    while _wait_go():
        rec = side.step()
        rec["peak_rss_gib"] = peak_rss_gib()
        _emit(rec)


# --------------------------------------------------------------------------------- TRL side
def run_trl_worker(a: argparse.Namespace) -> None:
    """A GRPOTrainer whose callbacks block between steps until the parent says go."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_recycle.model.hf_loading import load_hf_model, load_tokenizer

    torch.set_num_threads(a.threads)
    model = load_hf_model(a.model)
    model.train()
    tok = load_tokenizer(a.model)
    n = a.group * a.prompts
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_vs_trl_"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, learning_rate=a.lr, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        epsilon=0.2, epsilon_high=0.2, num_iterations=1, loss_type="dapo", max_steps=a.steps,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False,
        report_to=[], logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=a.seed,
        shuffle_dataset=False, dataloader_num_workers=0,
    )
    rows = [{"prompt": m} for m in prompt_messages(a.prompts)] * (a.steps + 2)
    state = {"step": 0, "tokens": 0.0, "seqs": 0.0, "reward": 0.0}

    def reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
        r = group_rewards([list(c) for c in completion_ids], a.group, a.seed, state["step"])
        state["tokens"] += float(sum(len(c) for c in completion_ids))
        state["seqs"] += float(len(completion_ids))
        state["reward"] = sum(r) / len(r)
        return r

    timers: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    class Pace(TrainerCallback):
        def on_train_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            opt = kw.get("optimizer")
            if opt is not None:  # cross-check of the callback interval: the optimizer's own step call
                opt.step = timed("optimizer_step_call", opt.step)

        def on_step_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            if not _wait_go():
                control.should_training_stop = True
            timers.clear()
            state.update(tokens=0.0, seqs=0.0)
            state["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            state["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            timers["optimizer"] = time.perf_counter() - state["t_opt"]

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            total = time.perf_counter() - state["t0"]
            gen = timers.get("generation", 0.0)
            score = timers.get("generate_and_score", 0.0) - gen
            fwd = timers.get("forward", 0.0)
            backward = timers.get("training_step", 0.0) - timers.get("generate_and_score", 0.0) - fwd
            opt = timers.get("optimizer", 0.0)
            rec = {"step_s": total, "time/generation": gen, "time/score": score, "time/forward": fwd,
                   "time/backward": backward, "time/optimizer": opt,
                   "time/other": total - gen - score - fwd - backward - opt,
                   "optimizer_step_call_s": timers.get("optimizer_step_call", float("nan")),
                   "completion_tokens": state["tokens"], "sequences": state["seqs"],
                   "reward_mean": state["reward"], "peak_rss_gib": peak_rss_gib()}
            state["step"] += 1
            _emit(rec)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Pace()])
    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    trainer.compute_loss = timed("forward", trainer.compute_loss)
    trainer.training_step = timed("training_step", trainer.training_step)
    _emit({"ready": True, "rss_gib": peak_rss_gib()})
    try:
        trainer.train()
    finally:
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
    _wait_go()  # the parent's final stop


# ---------------------------------------------------------------------------------- parent
class Worker:
    """A side in its own process; ``step()`` lets it run one step and returns its record."""

    def __init__(self, side: str, a: argparse.Namespace, allocator: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("GLIBC_TUNABLES", None)
        if allocator == "keep":
            env["GLIBC_TUNABLES"] = KEEP_MEMORY
        argv = [sys.executable, __file__, "--worker", side, *sys.argv[1:]] if a.argv is None else [
            sys.executable, __file__, "--worker", side, *a.argv]
        self.side = side
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(REPO))
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stderr.write(f"[{self.side}] {line}")
        raise RuntimeError(f"the {self.side} worker exited (code {self.proc.wait()}) before reporting; see its stderr")

    def step(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median / min / max of step time, median of every phase, peak RSS over the measured steps."""
    steps = [r["step_s"] for r in rows]
    return {
        "step_s": {"median": statistics.median(steps), "min": min(steps), "max": max(steps), "all": steps},
        "phases_median_s": {k[5:]: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("time/")},
        "completion_tokens_mean": statistics.mean(r["completion_tokens"] for r in rows),
        "sequences": rows[0]["sequences"],
        "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
    }


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def run_allocator(a: argparse.Namespace, allocator: str) -> dict[str, Any]:
    sides = ["trl", "ours"] if trl_available() and not a.skip_trl else ["ours"]
    if "trl" not in sides:
        print("trl is not installed (or --skip-trl): running our side only; see the docstring to install it")
    workers = {s: Worker(s, a, allocator) for s in sides}
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    try:
        for i in range(a.steps):
            for s in sides:  # alternate TRL and ours step by step
                rec = workers[s].step()
                rows[s].append(rec)
                print(f"[{allocator}] step {i} {s:<5} {rec['step_s']:7.2f} s  "
                      f"tokens {rec['completion_tokens']:.0f}  peak RSS {rec['peak_rss_gib']:.2f} GiB", flush=True)
    finally:
        for w in workers.values():
            w.close()
    result: dict[str, Any] = {"allocator": allocator, "glibc_tunables": KEEP_MEMORY if allocator == "keep" else "",
                              "load_average_at_end": os.getloadavg()}  # other work skews CPU timings
    for s in sides:
        result[s] = summarize(rows[s][1:] if len(rows[s]) > 1 else rows[s])
        result[s]["raw"] = rows[s]
    if "trl" in sides:
        result["ratio_ours_over_trl"] = result["ours"]["step_s"]["median"] / result["trl"]["step_s"]["median"]
        result["target_met"] = bool(result["ratio_ours_over_trl"] <= 0.5
                                    and result["ours"]["peak_rss_gib"] <= result["trl"]["peak_rss_gib"])
    return result


def print_table(res: dict[str, Any]) -> None:
    print(f"\n== allocator: {res['allocator']} (GLIBC_TUNABLES={res['glibc_tunables'] or '(unset)'}) ==")
    sides = [s for s in ("trl", "ours") if s in res]
    print(f"{'':<26}" + "".join(f"{s:>12}" for s in sides))
    row = lambda name, vals: print(f"{name:<26}" + "".join(f"{v:>12}" for v in vals))  # noqa: E731
    row("step median (s)", [f"{res[s]['step_s']['median']:.2f}" for s in sides])
    row("step min (s)", [f"{res[s]['step_s']['min']:.2f}" for s in sides])
    row("step max (s)", [f"{res[s]['step_s']['max']:.2f}" for s in sides])
    phases = sorted({p for s in sides for p in res[s]["phases_median_s"]})
    for p in phases:
        row(f"  {p} (s)", [f"{res[s]['phases_median_s'][p]:.2f}" if p in res[s]["phases_median_s"] else "-"
                           for s in sides])
    row("completion tokens/step", [f"{res[s]['completion_tokens_mean']:.0f}" for s in sides])
    row("peak RSS (GiB)", [f"{res[s]['peak_rss_gib']:.2f}" for s in sides])
    if "ratio_ours_over_trl" in res:
        print(f"ratio ours / TRL (median step): {res['ratio_ours_over_trl']:.2f}  "
              f"(target <= 0.50 and peak RSS <= TRL's: {'met' if res['target_met'] else 'NOT met'})")


def write_files(res: dict[str, Any], meta: dict[str, Any], out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{res['allocator']}"
    path.with_name(path.name + ".json").write_text(json.dumps({**meta, **res}, indent=2) + "\n")
    with open(path.with_name(path.name + ".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["allocator", "side", "metric", "value"])
        for s in ("trl", "ours"):
            if s not in res:
                continue
            for k in ("median", "min", "max"):
                w.writerow([res["allocator"], s, f"step_{k}_s", f"{res[s]['step_s'][k]:.4f}"])
            for p, v in res[s]["phases_median_s"].items():
                w.writerow([res["allocator"], s, f"{p}_median_s", f"{v:.4f}"])
            w.writerow([res["allocator"], s, "completion_tokens_mean", f"{res[s]['completion_tokens_mean']:.1f}"])
            w.writerow([res["allocator"], s, "peak_rss_gib", f"{res[s]['peak_rss_gib']:.3f}"])
        if "ratio_ours_over_trl" in res:
            w.writerow([res["allocator"], "both", "ratio_ours_over_trl", f"{res['ratio_ours_over_trl']:.4f}"])
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias or local HF folder (both sides load the same)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--mbs", type=int, default=16, help="our micro-batch size (16 = the whole step in one)")
    p.add_argument("--steps", type=int, default=4, help="steps per side; the first is left out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocator", choices=("default", "keep", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-trl", action="store_true", help="run our side only")
    p.add_argument("--engine", choices=("native", "hf"), default="native",
                   help="our rollout engine: native (the trainer's default at tp=pp=1) or hf (a transformers copy)")
    p.add_argument("--no-pack", action="store_true", help="our step without group packing (padded rows)")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--stem", default="vs_trl", help="output file name stem")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = argv
    if a.steps < 1 or a.threads < 1 or a.group < 2:
        p.error(f"need --steps >= 1, --threads >= 1, --group >= 2; got {a.steps}, {a.threads}, {a.group}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker == "ours":
        run_ours_worker(a)
        return 0
    if a.worker == "trl":
        run_trl_worker(a)
        return 0
    import torch

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])]),
        "machine": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "threads": a.threads, "model": a.model, "prompts": a.prompts,
        "group": a.group, "max_new_tokens": a.max_new_tokens, "lr": a.lr, "mbs": a.mbs, "steps": a.steps,
        "our_engine": a.engine, "our_group_packing": not a.no_pack,
        "first_step_left_out": a.steps > 1,
    }
    try:
        import trl

        meta["trl_version"] = trl.__version__
    except ImportError:
        meta["trl_version"] = None
    for alloc in (("default", "keep") if a.allocator == "both" else (a.allocator,)):
        res = run_allocator(a, alloc)
        print_table(res)
        path = write_files(res, meta, Path(a.out), a.stem)
        print(f"wrote {path}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
