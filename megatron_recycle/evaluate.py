"""Pass@1 evaluation of the search agent on QA files: EM, F1, answer rate, searches and turns,
overall and per source (benchmark) and, for synthetic data, per template.

Pass@1 is the exact match of a greedy rollout (temperature 0), or the mean exact match over
``n_samples`` rollouts at a temperature. ``python -m megatron_recycle.evaluate --help`` runs it
from the command line (the ``megatron-recycle eval`` subcommand wraps the same function).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_recycle.agent.rollout import FINISH_REASONS, rollout
from megatron_recycle.agent.types import Retriever
from megatron_recycle.engines.base import Engine, SamplingParams

log = logging.getLogger(__name__)

_METRICS = ("pass@1", "em", "f1", "answer_rate", "searches", "turns", "response_tokens")


def evaluate(
    engine: Engine | None,
    retriever: Retriever | None,
    examples: Sequence[Any],
    n_samples: int = 1,
    temperature: float = 0.0,
    max_turns: int = 4,
    max_total_tokens: int = 2048,
    topk: int = 3,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    max_passage_words: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    output_path: str | Path | None = None,
    run_info: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = (0, 1),
    gather: Callable[[Any], list[Any] | None] | None = None,
) -> dict[str, Any] | None:
    """Roll out every example (objects with id, question, golden_answers, source, metadata) and
    aggregate. Writes the result as JSON (and per-example predictions as jsonl beside it) when
    ``output_path`` is given; prints a progress line per batch when ``progress``. ``run_info``
    (model, data file, machine...) is copied into the result's config.

    Sharded evaluation (several processes, each with its own engine): ``shard=(i, n)`` rolls out
    only batches i, i + n, i + 2n, ... of the examples (batch b holds examples b * batch_size
    onwards, generated with the same sampling seed as every batch), the very batches a
    single-process call makes, so the result does not depend on n. ``shard=None``: this process
    rolls out nothing (it holds no engine) but still takes part in ``gather``. ``gather`` (needed
    when n > 1) receives this process's part and returns every process's parts on the one process
    that aggregates, None on the others (``gather_on_rank0`` over torch.distributed); evaluate
    returns the result, and writes ``output_path``, on that process only, and None elsewhere.
    Several processes may hold the same shard (the ranks of one vLLM tensor-parallel engine): the
    first part of each shard is used. Every shard must be present, else RuntimeError. The merged
    ``rollout_stats`` add up the shards' counters (so their ``*_seconds`` are summed over the
    processes); ``seconds`` is the aggregating process's wall time, the gather included.
    """
    if not examples:
        raise ValueError("evaluate got no examples; check the dataset file")
    if n_samples < 1:
        raise ValueError(f"evaluate n_samples must be >= 1, got {n_samples}")
    if n_samples > 1 and temperature == 0:
        raise ValueError(
            f"evaluate n_samples={n_samples} at temperature 0 would repeat one greedy rollout; "
            "use n_samples=1 for greedy Pass@1 or set temperature > 0"
        )
    if batch_size < 1:
        raise ValueError(f"evaluate batch_size must be >= 1, got {batch_size}")
    if shard is None and gather is None:
        raise ValueError("evaluate shard=None: a process that rolls out nothing must pass gather to receive the parts")
    if shard is not None:
        index, count = shard
        if not (count >= 1 and 0 <= index < count):
            raise ValueError(f"evaluate shard={shard}: expected (index, count) with 0 <= index < count")
        if count > 1 and gather is None:
            raise ValueError(f"evaluate shard={shard}: a sharded evaluation needs gather to collect the parts")
        if engine is None or retriever is None:
            raise ValueError("evaluate: a process that rolls out a shard needs an engine and a retriever")
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    start = time.perf_counter()
    records: list[tuple[int, dict[str, Any]]] = []  # (example position, record)
    totals: dict[str, float] = {}
    mine = [] if shard is None else list(range(shard[0] * batch_size, len(examples), shard[1] * batch_size))
    share = sum(len(examples[first : first + batch_size]) for first in mine)
    for first in mine:
        chunk = examples[first : first + batch_size]
        questions = [(first + i, ex.question, list(ex.golden_answers)) for i, ex in enumerate(chunk)]
        batch = rollout(
            engine, retriever, questions, n_samples, params, max_turns, max_total_tokens, topk, reward_metric="em",
            max_passage_words=max_passage_words,
        )
        for key, value in batch.stats.as_dict().items():
            totals[key] = totals.get(key, 0) + value
        for i, ex in enumerate(chunk):
            records.append((first + i, _example_record(ex, batch[i * n_samples : (i + 1) * n_samples])))
        if progress:
            done, elapsed = len(records), time.perf_counter() - start
            eta = elapsed / done * (share - done)
            running = sum(r["em"] for _, r in records) / done
            where = "" if shard[1] == 1 else f" (shard {shard[0] + 1} of {shard[1]}: {share} of {len(examples)})"
            print(
                f"[eval] {done}/{share} examples{where}  EM {running:.3f}  "
                f"{elapsed:.0f} s elapsed  ETA {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    if gather is not None:
        parts = gather(None if shard is None else (shard, records, totals))
        if parts is None:
            return None
        records, totals = _merge_parts(parts, len(examples))
    records_only = [r for _, r in sorted(records, key=lambda pr: pr[0])]
    if len(records_only) != len(examples):
        raise RuntimeError(f"evaluate: {len(records_only)} records for {len(examples)} examples")

    result: dict[str, Any] = {
        "overall": _aggregate(records_only),
        "per_source": _grouped(records_only, "source"),
        "config": {
            "n_samples": n_samples,
            "temperature": temperature,
            "top_p": top_p,
            "max_turns": max_turns,
            "max_total_tokens": max_total_tokens,
            "max_new_tokens": max_new_tokens,
            "topk": topk,
            "max_passage_words": max_passage_words,
            "batch_size": batch_size,
            "seed": seed,
            **(run_info or {}),
        },
        "rollout_stats": totals,
        "seconds": time.perf_counter() - start,
    }
    if gather is not None:
        result["config"]["shards"] = len({p[0] for p in parts if p is not None})
    sources = result["per_source"]
    result["macro_average"] = {m: sum(s[m] for s in sources.values()) / len(sources) for m in ("pass@1", "em", "f1")}
    if any(r["template"] is not None for r in records_only):
        result["per_template"] = _grouped(records_only, "template")
    if output_path is not None:
        try:
            write_result(result, records_only, output_path)
        except OSError as e:  # (a disk that filled up meanwhile): the numbers are not lost with the file
            o = result["overall"]
            raise EvalOutputError(
                f"could not write the evaluation result {output_path} ({type(e).__name__}: {e}); its numbers: "
                f"Pass@1 {o['pass@1']:.4f}, EM {o['em']:.4f}, F1 {o['f1']:.4f} over {o['n']} questions"
            ) from e
    return result


class EvalOutputError(OSError):
    """An evaluation's result cannot be written where it was asked to go."""


def check_writable(path: str | Path) -> None:
    """EvalOutputError now, before a model is loaded and questions are rolled out, when a result
    cannot be written at ``path`` (a read-only or missing disk, a file where its folder should be)."""
    path = Path(path)
    if path.is_dir():  # the probe below goes beside it and would pass
        raise EvalOutputError(f"cannot write the evaluation result {path}: it is a folder; name a .json file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EvalOutputError(f"cannot write the evaluation result {path}: {type(e).__name__}: {e}") from e


def _merge_parts(parts: Sequence[Any], n_examples: int) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, float]]:
    """Every shard's records and rollout counters, the first part of each shard taken."""
    by_shard: dict[tuple[int, int], tuple[list, dict]] = {}
    for part in parts:
        if part is None:
            continue
        shard, records, totals = part
        by_shard.setdefault(tuple(shard), (records, totals))
    counts = {count for _, count in by_shard}
    if len(counts) != 1:
        raise RuntimeError(f"evaluate: the processes disagree on the shard count ({sorted(by_shard)})")
    count = counts.pop()
    missing = sorted(set(range(count)) - {index for index, _ in by_shard})
    if missing:
        raise RuntimeError(f"evaluate: no process rolled out shard(s) {missing} of {count}")
    records = [pr for recs, _ in by_shard.values() for pr in recs]
    if sorted(i for i, _ in records) != list(range(n_examples)):
        raise RuntimeError(f"evaluate: the shards' records do not cover the {n_examples} examples exactly once")
    totals: dict[str, float] = {}
    for _, tot in by_shard.values():
        for key, value in tot.items():
            totals[key] = totals.get(key, 0) + value
    return records, totals


def gather_on_rank0(part: Any, group: Any = None) -> list[Any] | None:
    """``gather`` for :func:`evaluate` over torch.distributed: every rank's part, on rank 0 (None
    on the others). Collective over ``group`` (default: the world); alone, [part]."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [part]
    rank = dist.get_rank(group)
    out: list[Any] | None = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(part, out, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return out


def _example_record(example: Any, trajectories: Sequence[Any]) -> dict[str, Any]:
    """One example's scores, averaged over its samples, plus the first sample's prediction."""
    n = len(trajectories)
    first = trajectories[0]
    return {
        "id": str(example.id),
        "source": str(example.source),
        "template": (getattr(example, "metadata", None) or {}).get("template"),
        "question": example.question,
        "golden_answers": list(example.golden_answers),
        "em": sum(t.em for t in trajectories) / n,
        "f1": sum(t.f1 for t in trajectories) / n,
        "answered": sum(t.finish_reason == "answer" and not t.extra.get("malformed") for t in trajectories) / n,
        "searches": sum(t.searches for t in trajectories) / n,
        "turns": sum(t.turns for t in trajectories) / n,
        "response_tokens": sum(len(t.token_ids) - t.prompt_len for t in trajectories) / n,
        "retrieval_errors": sum(t.retrieval_errors for t in trajectories),
        "finish_reasons": [t.finish_reason for t in trajectories],
        "answer": first.answer,
        "queries": first.extra.get("queries", []),
        "response": first.response_text,
    }


def _aggregate(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    n = len(records)
    out: dict[str, float] = {"n": n}
    out["em"] = sum(r["em"] for r in records) / n
    out["pass@1"] = out["em"]
    out["f1"] = sum(r["f1"] for r in records) / n
    out["answer_rate"] = sum(r["answered"] for r in records) / n
    out["searches"] = sum(r["searches"] for r in records) / n
    out["turns"] = sum(r["turns"] for r in records) / n
    out["response_tokens"] = sum(r["response_tokens"] for r in records) / n
    out["retrieval_errors"] = sum(r["retrieval_errors"] for r in records)
    reasons = [f for r in records for f in r["finish_reasons"]]
    for reason in FINISH_REASONS:
        out[f"finish_{reason}"] = reasons.count(reason) / len(reasons)
    return out


def _grouped(records: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r[key]), []).append(r)
    return {name: _aggregate(rs) for name, rs in sorted(groups.items())}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per source (and template), then the macro and micro averages."""
    header = f"{'source':<24} {'n':>6} {'Pass@1':>7} {'F1':>7} {'answer%':>8} {'searches':>9} {'turns':>6}"
    lines = [header, "-" * len(header)]

    def row(name: str, m: dict[str, float]) -> str:
        return (
            f"{name[:24]:<24} {int(m['n']):>6} {m['pass@1']:>7.3f} {m['f1']:>7.3f} "
            f"{100 * m['answer_rate']:>7.1f}% {m['searches']:>9.2f} {m['turns']:>6.2f}"
        )

    for name, m in result["per_source"].items():
        lines.append(row(name, m))
    if len(result["per_source"]) > 1:
        macro = result["macro_average"]
        lines.append(f"{'average over sources':<24} {'':>6} {macro['pass@1']:>7.3f} {macro['f1']:>7.3f}")
    lines.append(row("all", result["overall"]))
    if "per_template" in result:
        lines += ["", f"{'template':<24}" + header[24:], "-" * len(header)]
        lines += [row(name, m) for name, m in result["per_template"].items()]
    return "\n".join(lines)


def summarize_benchmarks(results: dict[str, dict[str, Any]], model: str) -> dict[str, Any]:
    """One row per benchmark and the averages the papers report: ``average`` is the unweighted
    mean over the rows (the "average over the seven benchmarks" of Search-R1-style tables),
    ``all_questions`` weights every question equally. ``results`` maps a file's name to its
    ``evaluate`` result; a file is one row, or one row per source ("file:source") when its
    questions come from several (Search-R1's combined test.parquet, by ``data_source``)."""
    if not results:
        raise ValueError("summarize_benchmarks: no results")
    rows = {}
    for name, res in results.items():
        sources = res.get("per_source") or {}
        parts = [(f"{name}:{src}", o) for src, o in sources.items()] if len(sources) > 1 else [(name, res["overall"])]
        for row_name, o in parts:
            rows[row_name] = {k: o[k] for k in ("n", "pass@1", "f1", "answer_rate", "searches", "turns")}
    n_all = sum(r["n"] for r in rows.values())
    return {
        "model": str(model),
        "benchmarks": rows,
        "average": {m: sum(r[m] for r in rows.values()) / len(rows) for m in ("pass@1", "f1")},
        "all_questions": {
            "n": n_all,
            **{m: sum(r[m] * r["n"] for r in rows.values()) / n_all for m in ("pass@1", "f1")},
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The benchmarks side by side: a row each, then their average and the per-question mean."""
    header = f"{'benchmark':<24} {'n':>6} {'Pass@1':>7} {'F1':>7} {'answer%':>8} {'searches':>9}"
    lines = [header, "-" * len(header)]
    for name, r in summary["benchmarks"].items():
        lines.append(f"{name[:24]:<24} {int(r['n']):>6} {r['pass@1']:>7.3f} {r['f1']:>7.3f} "
                     f"{100 * r['answer_rate']:>7.1f}% {r['searches']:>9.2f}")
    lines.append("-" * len(header))
    avg, every = summary["average"], summary["all_questions"]
    lines.append(f"{'average (benchmarks)':<24} {'':>6} {avg['pass@1']:>7.3f} {avg['f1']:>7.3f}")
    lines.append(f"{'all questions':<24} {int(every['n']):>6} {every['pass@1']:>7.3f} {every['f1']:>7.3f}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write the result JSON at ``path`` and the per-example records at ``<path stem>.predictions.jsonl``
    (each through a temporary name, so a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The predictions first: the result JSON is what a resumed run checks and reuses, so it is
    # written last, and a crash between the two never leaves a new result beside old predictions.
    predictions = path.with_name(path.stem + ".predictions.jsonl")
    _atomic_write(predictions, "".join(json.dumps(r) + "\n" for r in records))
    _atomic_write(path, json.dumps(result, indent=1, sort_keys=True))


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(summary, indent=1))  # the benchmarks in their order


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no temporary file left beside the result
        raise


def _int_at_least(low: int, below: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {value}")
        return value

    return parse


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line evaluation: model + retriever + QA file -> table on stdout, JSON on disk."""
    ap = argparse.ArgumentParser(prog="python -m megatron_recycle.evaluate", description=main.__doc__)
    ap.add_argument("--data", required=True, help="QA file (FlashRAG jsonl/json or Search-R1 parquet)")
    ap.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', a model folder or a .gguf file")
    ap.add_argument("--retriever", default="bm25", choices=("bm25", "dense", "http"))
    ap.add_argument("--retriever-url", default=None)
    ap.add_argument("--source", default=None, help="name the rows' source (e.g. synthetic-test) instead of the file's")
    ap.add_argument("--limit", type=_int_at_least(1), default=None, help="evaluate only the first N examples")
    ap.add_argument("--n-samples", type=_int_at_least(1), default=1)
    ap.add_argument("--temperature", type=_nonnegative_float, default=0.0)
    ap.add_argument("--max-turns", type=_int_at_least(0), default=4)
    ap.add_argument("--max-total-tokens", type=_int_at_least(1), default=2048)
    ap.add_argument("--max-new-tokens", type=_int_at_least(1), default=256)
    ap.add_argument("--topk", type=_int_at_least(1), default=3)
    ap.add_argument("--batch-size", type=_int_at_least(1), default=32)
    ap.add_argument("--seed", type=_int_at_least(0, 2**63), default=0, help="sampling seed, in [0, 2**63)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default="runs/eval/result.json", help="result JSON ('' to write nothing)")
    args = ap.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(
            "python -m megatron_recycle.evaluate runs in one process; under torchrun use "
            "`megatron-recycle eval --config RECIPE --data FILE`, which shards the questions over the ranks"
        )

    from megatron_recycle.agent.retrievers import build_retriever
    from megatron_recycle.data.datasets import read_qa_file
    from megatron_recycle.engines.hf import HFEngine
    from megatron_recycle.model.hf_loading import load_hf_model, load_tokenizer

    examples = list(read_qa_file(args.data, source=args.source))
    if args.limit is not None:
        examples = examples[: args.limit]
    if args.output:
        check_writable(args.output)  # before the model is loaded and the questions rolled out
    engine = HFEngine(load_hf_model(args.model), load_tokenizer(args.model), device=args.device)
    retriever = build_retriever(args.retriever, url=args.retriever_url)
    result = evaluate(
        engine,
        retriever,
        examples,
        n_samples=args.n_samples,
        temperature=args.temperature,
        max_turns=args.max_turns,
        max_total_tokens=args.max_total_tokens,
        topk=args.topk,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        output_path=args.output or None,
        run_info={"data": str(args.data), "model": str(args.model), "retriever": args.retriever, "limit": args.limit},
    )
    print(format_table(result))
    written = f"; result written to {args.output}" if args.output else " (--output '': nothing written)"
    print(f"{len(examples)} examples in {result['seconds']:.0f} s{written}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
