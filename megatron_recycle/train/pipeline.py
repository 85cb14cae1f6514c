"""`megatron-recycle run`: the whole recipe end to end (the README's main job).

data (generated if absent) -> Pass@1 of the untrained policy on dev/test -> SFT warm-up ->
GRPO with the configured pool strategy -> Pass@1 after training -> plots -> a short report.
Every phase writes into the run directory; the report is also saved as report.json / report.md.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_recycle.config import Config
from megatron_recycle.train import runtime as rtm


def evaluate_model(cfg: Config, model_path: str, split: str, out_path: Path, label: str) -> dict[str, Any] | None:
    """Greedy Pass@1 of a Hugging Face model folder (or alias) on a split; rank 0 only."""
    from megatron_recycle.evaluate import evaluate, format_table
    from megatron_recycle.model.hf_loading import load_tokenizer

    # torchrun's world, also before torch.distributed is initialized (the first evaluation runs earlier)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank != 0:
        return None
    paths = rtm.data_paths(cfg)
    examples = rtm.read_examples(paths[split], cfg, cfg.eval.max_examples)
    print(f"[eval] {label}: {len(examples)} {split} questions, model {model_path}", flush=True)
    if rtm.engine_kind(cfg) == "vllm" and world > 1:
        # A vLLM engine in external-launcher mode needs every rank of its block; rank 0 alone uses hf.
        print("[eval] rollout.engine=vllm: evaluating with the hf engine on rank 0 (vLLM needs every rank "
              "of its block)", flush=True)
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="hf"))
    engine = rtm.build_engine(cfg, model_path, load_tokenizer(model_path, cache_dir=cfg.model.cache_dir))
    retriever = rtm.build_retriever_from_config(cfg)
    res = evaluate(engine, retriever, examples, n_samples=cfg.eval.n_samples, temperature=cfg.eval.temperature,
                   max_turns=cfg.rollout.max_turns, max_total_tokens=cfg.rollout.max_total_tokens,
                   topk=cfg.retriever.topk, batch_size=cfg.eval.batch_size,
                   max_new_tokens=cfg.rollout.max_new_tokens, max_passage_words=cfg.retriever.max_passage_words,
                   seed=cfg.run.seed, output_path=out_path,
                   run_info={"model": str(model_path), "label": label, "split": split})
    print(format_table(res), flush=True)
    return res


def run_pipeline(cfg: Config, resume: bool = False) -> dict[str, Any]:
    from megatron_recycle.model.convert import save_hf_checkpoint
    from megatron_recycle.train.grpo import run_grpo
    from megatron_recycle.train.sft import run_sft

    t0 = time.perf_counter()
    run_dir = cfg.run_dir
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    timings: dict[str, float] = {}

    def phase(name: str, start: float) -> None:
        timings[name] = time.perf_counter() - start
        if rank0:
            print(f"[run] {name} done in {timings[name]:.0f}s (total {time.perf_counter() - t0:.0f}s)", flush=True)

    t = time.perf_counter()
    rtm.ensure_data(cfg)
    phase("data", t)
    evals: dict[str, Any] = {}
    split = "test"
    t = time.perf_counter()
    before = run_dir / "eval" / "before_test.json"
    evals["before"] = _cached_eval(cfg, cfg.model.name_or_path, split, before, "untrained")
    phase("eval_before", t)

    start_model = cfg.model.name_or_path
    if cfg.sft.enabled and cfg.sft.steps > 0:
        sft_hf = run_dir / "sft" / "hf"
        t = time.perf_counter()
        if resume and (sft_hf / "config.json").is_file():
            print(f"[run] reusing the SFT result {sft_hf}", flush=True)
        else:
            res = run_sft(cfg)
            del res["runtime"]
            gc.collect()
        start_model = str(sft_hf)
        phase("sft", t)
        t = time.perf_counter()
        evals["after_sft"] = _cached_eval(cfg, start_model, split, run_dir / "eval" / "after_sft_test.json", "after SFT")
        phase("eval_after_sft", t)

    t = time.perf_counter()
    summary = run_grpo(cfg, resume=resume, init_from=start_model)
    rt = summary.pop("runtime")
    final_hf = run_dir / "final_hf"
    save_hf_checkpoint(rt.chunks, rt.hf_config, final_hf)
    if rank0:
        rt.tokenizer.save_pretrained(str(final_hf))
    del rt
    gc.collect()
    phase("grpo", t)

    t = time.perf_counter()
    evals["after"] = evaluate_model(cfg, str(final_hf), split, run_dir / "eval" / "after_test.json", "after GRPO")
    phase("eval_after", t)

    report: dict[str, Any] = {}
    if rank0:
        from megatron_recycle.analyze import analyze

        t = time.perf_counter()
        plots = analyze(run_dir)
        phase("analyze", t)
        report = _report(cfg, evals, timings, time.perf_counter() - t0, plots)
    return report


def _cached_eval(cfg: Config, model: str, split: str, path: Path, label: str) -> dict[str, Any] | None:
    """Reuse an evaluation already written by an earlier (interrupted) run of the same job."""
    if path.is_file():
        try:
            res = json.loads(path.read_text())
            print(f"[eval] {label}: reusing {path}", flush=True)
            return res
        except json.JSONDecodeError:
            pass
    return evaluate_model(cfg, model, split, path, label)


def _report(cfg: Config, evals: dict, timings: dict, total: float, plots: Any) -> dict[str, Any]:
    def p1(name: str) -> float | None:
        r = evals.get(name)
        return None if r is None else r["overall"]["pass@1"]

    report = {
        "recipe": cfg.run.name,
        "strategy": cfg.pool.strategy,
        "test_pass@1": {"untrained": p1("before"), "after_sft": p1("after_sft"), "after_grpo": p1("after")},
        "test_examples": (evals.get("before") or {}).get("overall", {}).get("n"),
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
        "run_dir": str(cfg.run_dir),
        "plots": str(cfg.run_dir / "plots"),
    }
    lines = [
        f"# Report: {cfg.run.name} ({cfg.pool.strategy})",
        "",
        "| model | test Pass@1 (EM, greedy) |",
        "|---|---|",
    ]
    for label, key in (("untrained", "untrained"), ("after SFT warm-up", "after_sft"), ("after GRPO", "after_grpo")):
        v = report["test_pass@1"][key]
        if v is not None:
            lines.append(f"| {label} | {v:.3f} |")
    lines += ["", f"Total time {total / 60:.1f} min; phases: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()),
              f"Run directory: {cfg.run_dir}", f"Plots: {cfg.run_dir / 'plots'}"]
    text = "\n".join(lines)
    (cfg.run_dir / "report.json").write_text(json.dumps(report, indent=1))
    (cfg.run_dir / "report.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return report
