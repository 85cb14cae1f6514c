"""Per-step metrics: metrics.jsonl (one JSON object per step) + TensorBoard, the one-line summary,
phase timers, and the per-query pool history as CSV.

metrics.jsonl is strict JSON, one object per line, flushed and fsync'ed after every line so a
crash loses nothing already logged. Non-finite floats (e.g. ``rollouts_per_effective_group``
of a step with an empty effective batch) are written as the strings "inf", "-inf" and "nan";
``read_float`` turns them back into floats. Nested dicts and lists (the 3x3 transition
matrices) stay nested in the JSON; only scalars go to TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
POOL_HISTORY_FILE = "pool_history.csv"
TENSORBOARD_DIR = "tensorboard"
PHASES = ("rollout", "logprob", "train", "sync")  # the phases of one GRPO step shown in the summary line

# Keys of RecyclingPool.stats(): logged flat, shown in TensorBoard under "pool/<key>".
POOL_KEYS = frozenset({
    "epoch", "epoch_reset", "gen_batches", "candidates", "rollouts", "signal_groups", "zero_variance",
    "zv_all_correct", "zv_all_wrong", "effective_batch", "batch_fill", "recycled", "recycled_share",
    "recovery", "drift", "recovery_share", "drift_share", "rollouts_per_effective_group", "transitions",
    "pool_step", "pool_epoch", "pool_queries", "live_weight_mass", "live_queries", "never_drawn", "flipped_queries",
    "transitions_total", "total_rollouts", "total_effective", "total_recycled_share",
})


# ------------------------------------------------------------------------------- JSON values
def _jsonable(value: Any) -> Any:
    """Tensors, numpy values and non-finite floats -> strict-JSON values (lists, numbers, strings)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch / numpy
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not a number, string, list or dict")


def read_float(value: Any) -> float | None:
    """A logged scalar as a float ("inf"/"nan" strings included); None when it is not a scalar."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(TensorBoard tag, value) for every finite-or-not scalar, nested dicts as "outer/inner"."""
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            yield from _scalars(value, f"{prefix}{key}/")
            continue
        x = read_float(value)
        if x is None:
            continue
        if prefix or "/" in key:
            tag = f"{prefix}{key}"
        elif key in POOL_KEYS:
            tag = f"pool/{key}"
        else:
            tag = f"train/{key}"
        yield tag, x


# ------------------------------------------------------------------------------------ writer
class MetricsWriter:
    """Append one JSON line per step to <run_dir>/metrics.jsonl and scalars to TensorBoard (rank 0 only).

    ``resume_step``: the step the run resumes at; lines with step >= it are dropped first, so a
    resumed run's file has no duplicate steps. Without it an existing metrics.jsonl belongs to an
    earlier run and is moved to metrics.jsonl.old (with a warning), and so is its
    pool_history.csv. With ``enabled=False`` (every rank but 0) all methods do nothing. ``filename`` gives a phase with its own step axis (e.g.
    the SFT warm-up: "sft_metrics.jsonl") its own file and TensorBoard run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        filename: str = METRICS_FILE,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.dropped_on_resume = 0
        self.malformed_on_resume: list[int] = []
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_for_resume(resume_step)
        else:
            # Files of an earlier run in this folder: moved aside, so that nothing mixes them with this
            # run's (the pool history goes with the step metrics it belongs to).
            earlier = [self.path] + ([self.run_dir / POOL_HISTORY_FILE] if filename == METRICS_FILE else [])
            for path in earlier:
                if path.exists() and path.stat().st_size > 0:
                    old = path.with_name(path.name + ".old")
                    os.replace(path, old)
                    log.warning("metrics: %s existed from an earlier run (not resuming); moved it to %s", path, old)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run logged at or after the resume step.
            tb_dir = self.run_dir / TENSORBOARD_DIR
            if filename != METRICS_FILE:  # e.g. sft_metrics.jsonl: its own TensorBoard run, own step axis
                tb_dir = tb_dir / Path(filename).stem
            self._tb = SummaryWriter(str(tb_dir), purge_step=resume_step)

    def _truncate_for_resume(self, resume_step: int) -> None:
        """Rewrite metrics.jsonl keeping only well-formed lines with step < resume_step (atomically)."""
        if not self.path.exists():
            return
        kept: list[str] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    step = record["step"]
                    if isinstance(step, bool) or not isinstance(step, int):
                        raise TypeError(step)
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        self.malformed_on_resume.append(lineno)  # e.g. a line torn by a crash
                    continue
                if step < resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    self.dropped_on_resume += 1
        if self.malformed_on_resume:
            log.warning("metrics: dropped %d malformed line(s) of %s on resume (line numbers %s)",
                        len(self.malformed_on_resume), self.path, self.malformed_on_resume[:10])
        if self.dropped_on_resume:
            log.info("metrics: dropped %d line(s) with step >= %d from %s (resuming)",
                     self.dropped_on_resume, resume_step, self.path)
        tmp = self.path.with_name(f".{self.path.name}.partial")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append {"step": step, "unix_time": seconds, **metrics} as one line; scalars to TensorBoard."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"metrics step must be an integer >= 0, got {step!r}")
        body = _jsonable(dict(metrics))
        inner = body.pop("step", None)
        if inner is not None and inner != step:
            body["metrics_step"] = inner  # e.g. a pool stats dict's own counter; kept, not overwritten
        record = {"step": step, "unix_time": round(time.time(), 3), **body}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for tag, value in _scalars(body):
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------- timer
class Timer:
    """Accumulates wall seconds per phase name: ``with timer("rollout"): ...``.

    ``cuda_sync=True`` synchronizes CUDA at both ends so asynchronous kernels are counted in
    the phase that launched them.
    """

    def __init__(self, cuda_sync: bool = False) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda_sync = cuda_sync

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """{"time/<phase>": seconds} for MetricsWriter.log and format_step_line."""
        return {f"{prefix}{k}": v for k, v in self.seconds.items()}

    def reset(self) -> None:
        self.seconds.clear()


def rss_gib() -> float | None:
    """This process's resident memory now (GiB); None where /proc is not there (not Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return None


def memory_metrics() -> dict[str, float]:
    """Process memory for the step's metrics: current and peak RSS, and peak CUDA memory when used (GiB)."""
    import resource

    out: dict[str, float] = {}
    if (rss := rss_gib()) is not None:
        out["memory/rss_gib"] = rss
    # ru_maxrss is KiB on Linux (bytes on macOS, where this reads 1024x too high)
    out["memory/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["memory/cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


# ---------------------------------------------------------------------------- summary line
def _get(metrics: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        node: Any = metrics
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None and key in metrics:
            node = metrics[key]
        x = read_float(node)
        if x is not None:
            return x
    return None


def format_step_line(metrics: Mapping[str, Any]) -> str:
    """The one-line summary of a step; parts whose metrics are missing are left out.

    e.g. ``step 12 | reward 0.412 | EM 0.375 | eff 6/8 | recycled 50% (recovery 2, drift 1)
    | zero-var 3 all-correct / 5 all-wrong | s: rollout 12.3 logprob 1.2 train 4.5 sync 0.8``
    """
    parts: list[str] = []
    step = metrics.get("step")
    if isinstance(step, int):
        parts.append(f"step {step}")
    reward = _get(metrics, "reward_mean", "reward")
    if reward is not None:
        parts.append(f"reward {reward:.3f}")
    em = _get(metrics, "em_mean", "em")
    if em is not None:
        parts.append(f"EM {em:.3f}")
    eff = _get(metrics, "effective_batch")
    if eff is not None:
        b = _get(metrics, "batch_size")
        fill = _get(metrics, "batch_fill")
        if b is None and fill and math.isfinite(fill):
            b = round(eff / fill)
        parts.append(f"eff {eff:.0f}/{b:.0f}" if b is not None else f"eff {eff:.0f}")
    share = _get(metrics, "recycled_share")
    if share is not None and not math.isnan(share):  # NaN: nothing trained this step
        text = f"recycled {100 * share:.0f}%"
        rec, drift = _get(metrics, "recovery"), _get(metrics, "drift")
        if rec is not None and drift is not None:
            text += f" (recovery {rec:.0f}, drift {drift:.0f})"
        parts.append(text)
    zc, zw = _get(metrics, "zv_all_correct"), _get(metrics, "zv_all_wrong")
    if zc is not None and zw is not None:
        parts.append(f"zero-var {zc:.0f} all-correct / {zw:.0f} all-wrong")
    failed = _get(metrics, "retriever/failed_queries")
    if failed:  # the searches that got an error observation instead of passages
        sent = _get(metrics, "retriever/queries")
        timeouts = _get(metrics, "retriever/timeouts")
        parts.append(f"retrieval failed {failed:.0f}/{sent or 0:.0f} queries"
                     + (f" ({timeouts:.0f} timeouts)" if timeouts else ""))
    times = [(p, _get(metrics, f"time/{p}", f"time_{p}")) for p in PHASES]
    times = [(p, s) for p, s in times if s is not None]
    if times:
        parts.append("s: " + " ".join(f"{p} {s:.1f}" for p, s in times))
    return " | ".join(parts) if parts else "(no metrics)"


# ---------------------------------------------------------------------------- pool history
def write_pool_history(run_dir: str | Path, pool_history_table: Mapping[str, Any]) -> Path:
    """Write RecyclingPool.history_table() as <run_dir>/pool_history.csv, atomically: one row per
    draw, query,step,successes,k,state (state: hard, signal or easy, as the pool decided it)."""
    from megatron_recycle.pool import STATES

    columns = ("query", "step", "successes", "k", "state")
    missing = [c for c in columns if c not in pool_history_table]
    if missing:
        raise ValueError(f"pool history table lacks columns {missing}; pass RecyclingPool.history_table()")
    cols = []
    for c in columns:
        v = pool_history_table[c]
        cols.append(v.tolist() if hasattr(v, "tolist") else list(v))
    lengths = {c: len(v) for c, v in zip(columns, cols)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"pool history columns differ in length: {lengths}")
    bad = sorted({int(x) for x in cols[-1]} - set(range(len(STATES))))
    if bad:
        raise ValueError(f"pool history states must be 0..{len(STATES) - 1} ({', '.join(STATES)}), got {bad}")
    path = Path(run_dir) / POOL_HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{POOL_HISTORY_FILE}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(",".join(columns) + "\n")
        for *row, state in zip(*cols):
            f.write(",".join(str(int(x)) for x in row) + f",{STATES[int(state)]}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
