"""`megatron-recycle run`: the whole recipe end to end (the README's main job).

data (generated if absent) -> Pass@1 of the untrained policy on dev/test -> SFT warm-up ->
GRPO with the configured pool strategy -> Pass@1 after training -> plots -> a short report.
Every phase writes into the run directory; the report is also saved as report.json / report.md.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_recycle.config import Config, check_against_data
from megatron_recycle.train import runtime as rtm


def _eval_world(cfg: Config) -> tuple[int, int]:
    """(world size, rank) of torchrun's world, also before the trainer has set up torch.distributed
    (the first evaluation runs earlier); with several ranks the default process group is brought
    up here, for the evaluation's collectives, and the trainer reuses it."""
    from megatron_recycle.model.parallel import init_process_group

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        init_process_group(timeout_min=cfg.run.collective_timeout_min)
    return world, (dist.get_rank() if dist.is_initialized() else 0)


def resume_after_restart(cfg: Config, resume: bool, command: str, what: str) -> bool:
    """``resume``, or True when torchrun restarted the worker group (``--max-restarts``, the launch
    scripts' MAX_RESTARTS) on any rank: a restarted job continues from what its crashed predecessor
    saved instead of starting over. Collective in a multi-rank world (model.parallel.restarted_anywhere:
    on the nodes whose workers did not fail the restart count stays 0)."""
    if resume:
        return True
    from megatron_recycle.model.parallel import restarted_anywhere

    _, rank = _eval_world(cfg)
    if not restarted_anywhere():
        return False
    if rank == 0:
        print(f"[{command}] torchrun restarted the workers: resuming as with --resume ({what})", flush=True)
    return True


def evaluate_model(cfg: Config, model_path: str, split: str, out_path: Path | None, label: str,
                   tools: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Greedy Pass@1 of a Hugging Face model folder (or alias) on a split, over the whole torchrun
    world: the batches are dealt round-robin to the evaluation shards, rank 0 gathers them, prints
    the table and writes ``out_path``; the result is returned on rank 0, None elsewhere.

    Shards: with ``rollout.engine=vllm``, each vLLM tensor-parallel block of ``rollout.vllm_tp``
    ranks (all its ranks issue the same requests; the process's one engine, kept for later
    phases, sleeps afterwards); otherwise every rank, each with a transformers copy of the model
    on its own device. Greedy results do not depend on the world size (the same batches are
    formed). Collective when the world has more than one rank: every rank must call it.

    ``tools``: a dict the caller keeps across calls for the same model (the ``eval`` command's
    benchmark files): the first call stores its engine and retriever in it and later calls reuse
    them instead of loading the model and the index again.
    """
    from megatron_recycle.evaluate import (
        EvalOutputError,
        check_writable,
        evaluate,
        format_table,
        gather_on_rank0,
    )
    from megatron_recycle.model.hf_loading import load_hf_config, load_tokenizer, model_digest

    world, rank = _eval_world(cfg)
    block = 1
    if rtm.engine_kind(cfg) == "vllm" and world > 1:
        rtm.check_vllm_world(cfg, load_hf_config(model_path, cache_dir=cfg.model.cache_dir), world, tp=1, pp=1)
        block = cfg.rollout.vllm_tp
    shard = (rank // block, world // block)
    paths = rtm.data_paths(cfg)
    examples = rtm.read_examples(paths[split], cfg, cfg.eval.max_examples)
    if rank == 0:
        where = "" if shard[1] == 1 else f", {shard[1]} shards of {block} rank(s)"
        print(f"[eval] {label}: {len(examples)} {split} questions, model {model_path}{where}", flush=True)
        batches = -(-len(examples) // cfg.eval.batch_size)
        if batches < shard[1]:
            print(f"[eval] only {batches} batch(es) of eval.batch_size={cfg.eval.batch_size} for {shard[1]} shards: "
                  f"{shard[1] - batches} shard(s) idle; a smaller eval.batch_size uses them", flush=True)
    # where the result goes is checked now, not after the rollouts (rank 0 writes it; every rank
    # learns the verdict, so that none goes on to wait for it in the gather)
    problem = ""
    if rank == 0 and out_path is not None:
        try:
            check_writable(out_path)
        except EvalOutputError as e:
            problem = str(e)
    if world > 1 and out_path is not None:  # (the same on every rank: one call's argument)
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise EvalOutputError(problem)
    tools = {} if tools is None else tools
    if tools.get("model") != str(model_path):
        tools.clear()  # another model: nothing of the last one's is reused
        tools["engine"] = rtm.build_engine(cfg, model_path, load_tokenizer(model_path, cache_dir=cfg.model.cache_dir))
        tools["retriever"] = rtm.build_retriever_from_config(cfg)
        tools["model"] = str(model_path)
    engine, retriever = tools["engine"], tools["retriever"]
    res = evaluate(engine, retriever, examples, **rtm.eval_settings(cfg), output_path=out_path, progress=rank == 0,
                   run_info={"model": str(model_path), "label": label, "split": split, "data": str(paths[split]),
                             "retriever": rtm.retriever_id(cfg),
                             "model_digest": model_digest(model_path) if rank == 0 else None,
                             **(rtm.eval_identity(cfg, paths[split]) if rank == 0 else {})},
                   shard=shard, gather=gather_on_rank0 if world > 1 else None)
    if rtm.engine_kind(cfg) == "vllm":
        engine.sleep()  # the engine stays for later phases; its memory goes back to them
    if res is not None:
        print(format_table(res), flush=True)
    return res


def eval_files(cfg: Config, data: list[str], benchmarks: bool = True) -> list[tuple[str, Path, str]]:
    """(name in the summary, file, result file stem) for each dataset file given and, with
    ``benchmarks``, each of the seven benchmarks found in ``eval.data_dir`` (the missing ones are
    named). Every file must exist; two files never write the same result file."""
    from megatron_recycle.data.datasets import find_benchmark_files

    files = [(Path(f).stem, Path(f), f"{Path(f).parent.name}_{Path(f).stem}") for f in data]
    if benchmarks and cfg.eval.data_dir:
        found = find_benchmark_files(cfg.eval.data_dir)
        for name, f in found.items():  # nq/test.jsonl -> nq_test, hotpotqa_dev.jsonl -> hotpotqa_dev
            f = Path(f)
            files.append((name, f, f.stem if f.stem.lower().startswith(name) else f"{name}_{f.stem}"))
        if not found:
            raise FileNotFoundError(
                f"eval.data_dir={cfg.eval.data_dir}: none of the benchmarks ({', '.join(found.missing)}) is there; "
                "expected <dir>/<name>/<test|dev>.<jsonl|parquet|json> or <dir>/<name>_<split>.<ext>")
        if found.missing and rtm.env_rank() == 0:
            print(f"[eval] not found in {cfg.eval.data_dir}: {', '.join(found.missing)}", flush=True)
    for _, f, _ in files:  # all of them before the first (long) evaluation
        if not f.is_file():
            raise FileNotFoundError(f"eval: dataset file {f} does not exist")
    names = [name for name, _, _ in files]
    if len(set(names)) < len(names):  # e.g. two files named test.jsonl: name them by folder too
        files = [(stem, f, stem) for _, f, stem in files]
    if len({stem for _, _, stem in files}) < len(files):
        raise FileExistsError("eval: two dataset files would write the same result file: "
                              + ", ".join(str(f) for _, f, _ in files))
    return files


def evaluate_files(cfg: Config, model: str, files: list[tuple[str, Path, str]], out_dir: Path,
                   resume: bool) -> dict[str, Any] | None:
    """Evaluate ``model`` on each of ``files`` (from :func:`eval_files`) with one engine and
    retriever, writing ``out_dir/<stem>.json`` as each finishes. The summary (each file's numbers
    and their average) goes to ``out_dir/summary.json`` and is returned on rank 0 (None
    elsewhere); with several files it is also printed side by side. ``resume`` reuses a file's
    result already there when it matches. Collective in a multi-rank world; ``cfg`` is not changed."""
    from megatron_recycle.evaluate import format_summary, summarize_benchmarks, write_summary

    cfg = copy.deepcopy(cfg)
    tools: dict[str, Any] = {}  # the engine and retriever, loaded once for all the files
    results = {}
    for name, f, stem in files:
        cfg.data.test_file = str(f)
        out = out_dir / f"{stem}.json"
        if resume:
            res = _cached_eval(cfg, model, "test", out, name, tools)
        else:
            res = evaluate_model(cfg, model, "test", out, name, tools)
        if res is not None:  # rank 0
            results[name] = res
    tools.clear()
    gc.collect()
    if not results:
        return None
    summary = summarize_benchmarks(results, model)
    write_summary(summary, out_dir / "summary.json")
    if len(results) > 1:  # one file's table is already printed
        print(f"\n[eval] {model}: {len(results)} files\n{format_summary(summary)}\n"
              f"[eval] wrote {out_dir / 'summary.json'}", flush=True)
    return summary


def run_pipeline(cfg: Config, resume: bool = False) -> dict[str, Any]:
    from megatron_recycle.model.convert import save_hf_checkpoint
    from megatron_recycle.train.grpo import run_grpo
    from megatron_recycle.train.sft import run_sft

    t0 = time.perf_counter()
    run_dir = cfg.run_dir
    rank0 = rtm.env_rank() == 0
    resume = resume_after_restart(cfg, resume, "run", "finished phases reused, GRPO from its newest checkpoint")
    if not resume:
        # before any phase: an earlier run's SFT result, GRPO checkpoints or evaluations left here
        # must not be taken for this run's by a `run --resume` (or a torchrun restart) after an
        # interruption in an early phase, before SFT and GRPO would move their own files aside.
        # What this run starts from stays (model.name_or_path = RUN_DIR/sft/hf of an earlier
        # `megatron-recycle sft`, as the GPU recipes suggest).
        from megatron_recycle.train.resume import PIPELINE_RUN_FILES, archive_earlier_run

        start = Path(cfg.model.name_or_path).expanduser().resolve()
        keep = tuple(n for n in PIPELINE_RUN_FILES
                     if not (start == (run_dir / n).resolve() or (run_dir / n).resolve() in start.parents))
        archive_earlier_run(run_dir, keep, rank0, "run")
    timings: dict[str, float] = {}

    def phase(name: str, start: float) -> None:
        timings[name] = time.perf_counter() - start
        if rank0:
            print(f"[run] {name} done in {timings[name]:.0f}s (total {time.perf_counter() - t0:.0f}s)", flush=True)

    # the benchmarks the final model is evaluated on: looked up now, not after hours of training
    bench_files = eval_files(cfg, []) if cfg.eval.data_dir else []
    t = time.perf_counter()
    paths = rtm.ensure_data(cfg)
    sft_reused = resume and (run_dir / "sft" / "hf" / "config.json").is_file()
    if cfg.sft.enabled and cfg.sft.steps > 0 and not sft_reused and not Path(paths["sft"]).is_file():
        raise FileNotFoundError(
            f"{paths['sft']} is missing: the SFT phase (sft.enabled) trains on its oracle trajectories; run "
            "`megatron-recycle gen-data` into data.dir, or set sft.enabled=false")
    # the pool's size against the data, and the layout and model against the config, now: not
    # after the evaluation and SFT phases (a 1,000-question evaluation with a GPU recipe)
    check_against_data(cfg, len(rtm.read_examples(paths["train"], cfg, cfg.data.max_train_queries)))
    rtm.check_trainer_config(cfg, cfg.model.name_or_path)
    phase("data", t)
    evals: dict[str, Any] = {}
    split = "test"
    t = time.perf_counter()
    before = run_dir / "eval" / "before_test.json"
    evals["before"] = _eval(cfg, cfg.model.name_or_path, split, before, "untrained", resume)
    phase("eval_before", t)

    start_model = cfg.model.name_or_path
    if cfg.sft.enabled and cfg.sft.steps > 0:
        sft_hf = run_dir / "sft" / "hf"
        t = time.perf_counter()
        if resume and (sft_hf / "config.json").is_file():
            if rank0:
                print(f"[run] reusing the SFT result {sft_hf}", flush=True)
                for line in _sft_setting_changes(cfg, run_dir / "sft" / "config.yaml"):
                    print(line, flush=True)
        else:
            res = run_sft(cfg, resume=resume)
            del res["runtime"]
            gc.collect()
            if res.get("stopped") or res.get("stop_requested"):  # (asked during its last step: SFT done)
                return _stopped("SFT", res["steps"], cfg.sft.steps, rank0)
        start_model = str(sft_hf)
        phase("sft", t)
        t = time.perf_counter()
        evals["after_sft"] = _eval(cfg, start_model, split, run_dir / "eval" / "after_sft_test.json", "after SFT",
                                   resume)
        phase("eval_after_sft", t)

    t = time.perf_counter()
    summary = run_grpo(cfg, resume=resume, init_from=start_model)
    rt = summary.pop("runtime")
    if summary.get("stopped"):
        return _stopped("GRPO", summary["steps"], cfg.train.steps, rank0)
    final_hf = run_dir / "final_hf"
    save_hf_checkpoint(rt.chunks, rt.hf_config, final_hf, tokenizer=rt.tokenizer, generation_config=rt.generation_config)
    if dist.is_initialized():
        dist.barrier()  # every rank evaluates final_hf next: rank 0 must have finished writing it
    del rt
    gc.collect()
    phase("grpo", t)

    t = time.perf_counter()
    evals["after"] = _eval(cfg, str(final_hf), split, run_dir / "eval" / "after_test.json", "after GRPO", resume)
    phase("eval_after", t)
    if bench_files:  # the trained model on the QA benchmarks too (the papers' headline table)
        t = time.perf_counter()
        evals["benchmarks"] = evaluate_files(cfg, str(final_hf), bench_files, run_dir / "eval" / "benchmarks",
                                             resume=resume)
        phase("eval_benchmarks", t)

    report: dict[str, Any] = {}
    if rank0:
        from megatron_recycle.analyze import analyze

        t = time.perf_counter()
        plots = analyze(run_dir)
        phase("analyze", t)
        report = _report(cfg, evals, timings, time.perf_counter() - t0, plots)
    return report


def _sft_setting_changes(cfg: Config, saved_config: Path) -> list[str]:
    """A note when the SFT result a resume reuses was made with other sft.* settings (or another
    starting model) than this config's: it is reused as it is."""
    import yaml

    try:
        saved = yaml.safe_load(saved_config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(saved, dict):
        return []
    now = cfg.to_dict()
    diff = [f"sft.{k} {v!r} -> {now['sft'].get(k)!r}" for k, v in (saved.get("sft") or {}).items()
            if now["sft"].get(k) != v]
    was_model = (saved.get("model") or {}).get("name_or_path")
    if was_model is not None and was_model != cfg.model.name_or_path:
        diff.append(f"model.name_or_path {was_model!r} -> {cfg.model.name_or_path!r}")
    if not diff:
        return []
    return [f"[run] note: that SFT result was made with other settings ({'; '.join(diff)}); it is reused as "
            f"it is. To redo SFT with these, move {saved_config.parent} away and resume."]


def _stopped(phase: str, done: int, total: int, rank0: bool) -> dict[str, Any]:
    """A phase stopped on request (Ctrl-C / SIGTERM) after checkpointing: the later phases would
    evaluate and report a half-trained model as the recipe's result, so the run ends here."""
    if rank0:
        print(f"[run] {phase} stopped after {done} of {total} steps: no final evaluation or report; "
              "`run --resume` continues from its checkpoint", flush=True)
    return {"stopped": phase}


def _eval(cfg: Config, model: str, split: str, path: Path, label: str, resume: bool) -> dict[str, Any] | None:
    """An evaluation of the pipeline: reused from an interrupted run's file only with --resume (a
    new run in the same folder trains again, so an old file may hold another model's numbers)."""
    if resume:
        return _cached_eval(cfg, model, split, path, label)
    return evaluate_model(cfg, model, split, path, label)


def _cached_eval(cfg: Config, model: str, split: str, path: Path, label: str,
                 tools: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Reuse an evaluation already written by an earlier (interrupted) run of the same job when it
    matches (:func:`_usable_eval`); rank 0 reads it and decides for every rank (collective in a
    multi-rank world)."""
    world, rank = _eval_world(cfg)
    res = None
    if rank == 0 and path.is_file():
        res = _usable_eval(cfg, model, split, path, label)
    if world > 1:
        decision = [res is not None]
        dist.broadcast_object_list(decision, src=0)
        if rank != 0:
            return None if decision[0] else evaluate_model(cfg, model, split, path, label, tools)
    if res is not None:
        print(f"[eval] {label}: reusing {path}", flush=True)
        return res
    return evaluate_model(cfg, model, split, path, label, tools)


def _usable_eval(cfg: Config, model: str, split: str, path: Path, label: str) -> dict[str, Any] | None:
    """The result JSON at ``path`` if it evaluated this model (the same weights: the same path may
    hold other ones now, as final_hf after more training) on this split's file (the same bytes),
    with as many questions, the same evaluation settings, retriever, engine and precision as the
    config asks for now;
    None, and why, otherwise (a file written before all of these were recorded included)."""
    from megatron_recycle.model.hf_loading import model_digest

    try:
        res = json.loads(path.read_text())
        have = dict(res["config"]) | {"questions": res["overall"]["n"]}
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: bad JSON, bad UTF-8 (a damaged file)
        print(f"[eval] {label}: {path} is not a valid result file; evaluating again", flush=True)
        return None
    data = str(rtm.data_paths(cfg)[split])
    want = {"model": str(model), "data": data, "questions": len(rtm.read_examples(data, cfg, cfg.eval.max_examples))}
    want |= rtm.eval_settings(cfg) | {"retriever": rtm.retriever_id(cfg), "model_digest": model_digest(model)}
    want |= rtm.eval_identity(cfg, data)
    differ = [f"{k}={have.get(k)!r} (now {v!r})" for k, v in want.items() if have.get(k) != v]
    if differ:
        print(f"[eval] {label}: {path} was evaluated otherwise: {', '.join(differ)}; evaluating again", flush=True)
        return None
    return res


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
    bench = evals.get("benchmarks")
    if bench is not None:
        report["benchmarks_pass@1"] = {name: r["pass@1"] for name, r in bench["benchmarks"].items()}
        report["benchmarks_average_pass@1"] = bench["average"]["pass@1"]
        lines += ["", "| benchmark (after GRPO) | n | Pass@1 |", "|---|---|---|"]
        lines += [f"| {name} | {r['n']} | {r['pass@1']:.3f} |" for name, r in bench["benchmarks"].items()]
        lines.append(f"| average | | {bench['average']['pass@1']:.3f} |")
    lines += ["", f"Total time {total / 60:.1f} min; phases: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()),
              f"Run directory: {cfg.run_dir}", f"Plots: {cfg.run_dir / 'plots'}"]
    text = "\n".join(lines)
    (cfg.run_dir / "report.json").write_text(json.dumps(report, indent=1))
    (cfg.run_dir / "report.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return report
