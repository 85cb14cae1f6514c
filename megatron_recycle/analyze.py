"""`megatron-recycle analyze RUN_DIR`: plots and a table of a run's recycling dynamics.

Reads <run_dir>/metrics.jsonl (written by train/metrics.py; one JSON object per step) and, when
present, <run_dir>/pool_history.csv, and draws into <run_dir>/plots/:

    recycled_share.png   recycled share of the effective batch per step, stacked recovery vs drift
    zero_variance.png    candidate groups per step: all-wrong / all-correct zero-variance vs signal
    batch_fill.png       effective batch / B, and rollouts spent per effective group
    reward.png           reward_mean, em_mean and the eval/... scores (pass@1, f1, answer rate)
    transitions.png      hard/signal/easy transition counts (transitions_total of the last step)
    flips.png            (with pool_history.csv) queries drawn and queries that flipped state
    pool.png             live weight mass, live queries and queries never drawn

It prints the same numbers as a table (every step, or every Nth for long runs, plus a summary
row) and returns them in a dict. Malformed lines are counted, reported with their line number
and skipped; lines of the same step are merged (a key logged twice keeps its last value).
Steps without the pool's metrics (an evaluation logged on its own) feed the reward plot only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from megatron_recycle.pool import STATES, binary_state
from megatron_recycle.train.metrics import METRICS_FILE, POOL_HISTORY_FILE, read_float

HISTORY_COLUMNS = ("query", "step", "successes", "k", "state")

# (column header, metrics key, format) of the printed table; a key missing from a step prints "-".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("step", "step", "d"),
    ("cand", "candidates", "d"),
    ("signal", "signal_groups", "d"),
    ("zv_wrong", "zv_all_wrong", "d"),
    ("zv_right", "zv_all_correct", "d"),
    ("eff", "effective_batch", "d"),
    ("fill", "batch_fill", ".2f"),
    ("recycled", "recycled_share", ".2f"),
    ("recovery", "recovery_share", ".2f"),
    ("drift", "drift_share", ".2f"),
    ("roll/eff", "rollouts_per_effective_group", ".1f"),
    ("reward", "reward_mean", ".3f"),
    ("em", "em_mean", ".3f"),
    ("live_w", "live_weight_mass", ".1f"),
    ("never", "never_drawn", "d"),
)
# Pool state after a step rather than a count per step: the summary row shows the last value.
STATE_KEYS = ("live_weight_mass", "never_drawn")


class AnalyzeError(RuntimeError):
    """The run directory cannot be analyzed (no metrics file, or not a single valid line)."""


# ----------------------------------------------------------------------------------- reading
def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]], int]:
    """(records sorted by step, [(line number, why it was skipped)], number of clashing lines).

    Lines with the same step are merged into one record (e.g. a step's metrics and an evaluation
    logged apart, as runs before 2026-12-01 logged the dev evaluation); a line that gives a key
    another value than an earlier line of its step counts as a clash, and the last value wins.
    """
    by_step: dict[int, dict[str, Any]] = {}
    bad: list[tuple[int, str]] = []
    clashes = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                bad.append((lineno, f"not JSON ({e.msg})"))
                continue
            if not isinstance(record, dict):
                bad.append((lineno, f"not a JSON object ({type(record).__name__})"))
                continue
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                bad.append((lineno, f"no integer 'step' (got {step!r})"))
                continue
            earlier = by_step.setdefault(step, {})
            if any(k in earlier and earlier[k] != v for k, v in record.items() if k not in ("step", "unix_time")):
                clashes += 1  # a key of this step logged again with another value: the last one wins
            earlier.update(record)
    return [by_step[s] for s in sorted(by_step)], bad, clashes


def _value(record: dict[str, Any], key: str) -> float | None:
    return read_float(record.get(key))


def _series(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """Values of ``key`` per record as float64, NaN where missing or not a scalar."""
    return np.array([(v if (v := _value(r, key)) is not None else np.nan) for r in records], dtype=np.float64)


def _has(records: list[dict[str, Any]], key: str) -> bool:
    return any(_value(r, key) is not None for r in records)


def read_pool_history(path: str | Path) -> tuple[dict[int, list[tuple[int, int, int, int]]], list[tuple[int, str]]]:
    """pool_history.csv -> ({query: [(step, successes, k, state), ...] in file order}, bad rows).

    state is the pool's (0 hard, 1 signal, 2 easy). Files written before the pool kept it (header
    query,step,successes,k) get the binary-reward rule from the success count (``binary_state``),
    which misreads continuous rewards (a spread with no success counts as hard).
    """
    draws: dict[int, list[tuple[int, int, int, int]]] = {}
    bad: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header not in (list(HISTORY_COLUMNS), list(HISTORY_COLUMNS[:4])):
            raise AnalyzeError(f"{path}: header {header!r}, expected {','.join(HISTORY_COLUMNS)}")
        with_state = len(header) == 5
        for lineno, row in enumerate(reader, 2):
            try:
                if len(row) != len(header):
                    raise ValueError(f"{len(row)} fields, expected {len(header)}")
                q, s, n, k = (int(x) for x in row[:4])
                if not 0 <= n <= k:
                    raise ValueError(f"successes {n} outside [0, k={k}]")
                if with_state:
                    if row[4] not in STATES:
                        raise ValueError(f"state {row[4]!r} is not one of {STATES}")
                    state = STATES.index(row[4])
                else:
                    state = binary_state(n, k)
            except ValueError as e:
                bad.append((lineno, f"{row!r}: {e}"))
                continue
            draws.setdefault(q, []).append((s, n, k, state))
    return draws, bad


def history_summary(draws: dict[int, list[tuple[int, int, int, int]]]) -> dict[str, Any]:
    """Queries drawn, queries that changed state between two of their draws, and when they first did."""
    first_flip: list[int] = []
    first_draw: list[int] = []
    for hist in draws.values():
        hist = sorted(hist, key=lambda t: t[0])
        first_draw.append(hist[0][0])
        states = [state for *_, state in hist]
        for (step, *_), a, b in zip(hist[1:], states, states[1:]):
            if a != b:
                first_flip.append(step)
                break
    drawn = len(draws)
    return {
        "queries_drawn": drawn,
        "draws": sum(len(h) for h in draws.values()),
        "queries_redrawn": sum(len(h) > 1 for h in draws.values()),
        "queries_flipped": len(first_flip),
        "flipped_share_of_drawn": len(first_flip) / drawn if drawn else 0.0,
        "first_draw_steps": sorted(first_draw),
        "first_flip_steps": sorted(first_flip),
    }


# ------------------------------------------------------------------------------------ plots
def _figure(nrows: int = 1, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * nrows), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without pyplot or any global backend switch
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", bbox_inches="tight")  # "tight" keeps the legends below the axes
    return path


def _legend(ax, ncol: int = 3) -> None:
    """Legend under the axes, where it never hides the data."""
    below = -0.25 if ax.get_xlabel() else -0.1  # clear of the x tick labels (and the x label, if any)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=ncol, fontsize=8, frameon=False)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, ncol: int) -> Path:
    """Labels, title, the legend under the axes and a light grid; then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, ncol=ncol)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _mark_epochs(ax, records: list[dict[str, Any]]) -> None:
    """Dotted vertical lines at the steps where the pool started a new epoch (weights reset to 1)."""
    resets = [r["step"] for r in records if r.get("epoch_reset") is True]
    for i, step in enumerate(resets):
        ax.axvline(step, color="gray", ls=":", lw=1, label="new pool epoch" if i == 0 else None)


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _rolling_ratio(num: np.ndarray, den: np.ndarray, window: int) -> np.ndarray:
    """sum(num) / sum(den) over the last ``window`` steps (NaN where the steps' den sums to 0):
    the same ratio of sums as the summary's shares, so that a step that trained one group
    weighs one group, not a full batch (a NaN step counts as 0)."""
    num = np.nan_to_num(num, nan=0.0, posinf=0.0, neginf=0.0)
    den = np.nan_to_num(den, nan=0.0, posinf=0.0, neginf=0.0)
    out = np.full(len(num), np.nan)
    for i in range(len(num)):
        lo = max(0, i - window + 1)
        total = den[lo: i + 1].sum()
        if total > 0:
            out[i] = num[lo: i + 1].sum() / total
    return out


def plot_recycled_share(records: list[dict[str, Any]], path: Path) -> Path:
    steps = _series(records, "step")
    recovery = np.nan_to_num(_series(records, "recovery_share"))
    drift = np.nan_to_num(_series(records, "drift_share"))
    fig, (ax,) = _figure()
    ax.stackplot(steps, recovery, drift, labels=["recovery (last zero-variance: all wrong)",
                                                 "drift (last zero-variance: all correct)"],
                 colors=["tab:green", "tab:orange"], alpha=0.7, step="mid")
    window = max(1, len(steps) // 10)
    ax.plot(steps, _rolling_ratio(_series(records, "recycled"), _series(records, "effective_batch"), window),
            color="black", lw=1.5, label=f"recycled share over the last {window} step(s)")
    _mark_epochs(ax, records)
    ax.set_ylim(0, 1.05)
    return _finish(fig, ax, path, "training step", "share of the effective batch",
                   "Recycled queries in the effective batch (recovery vs drift)", ncol=2)


def plot_zero_variance(records: list[dict[str, Any]], path: Path) -> Path:
    steps = _series(records, "step")
    wrong = np.nan_to_num(_series(records, "zv_all_wrong"))
    right = np.nan_to_num(_series(records, "zv_all_correct"))
    signal = np.nan_to_num(_series(records, "signal_groups"))
    fig, (ax,) = _figure()
    ax.stackplot(steps, wrong, right, signal, step="mid", alpha=0.75,
                 colors=["tab:red", "tab:blue", "tab:green"],
                 labels=["zero-variance, all wrong", "zero-variance, all correct", "signal-bearing"])
    _mark_epochs(ax, records)
    _integer_ticks(ax)
    return _finish(fig, ax, path, "training step", "candidate groups",
                   "Candidate groups per step: zero-variance split and signal-bearing", ncol=4)


def plot_batch_fill(records: list[dict[str, Any]], path: Path) -> Path:
    steps = _series(records, "step")
    fill = _series(records, "batch_fill")
    rpe = _series(records, "rollouts_per_effective_group")
    fig, (ax1, ax2) = _figure(nrows=2, height=3.0)
    ax1.plot(steps, fill, marker=".", color="tab:blue", label="effective batch / B")
    ax1.axhline(1.0, color="gray", ls="--", lw=1, label="full batch (B groups)")
    ax1.set_ylim(0, 1.1)
    ax1.set_ylabel("batch fill")
    ax1.set_title("Effective batch fill (effective batch / B)")
    _legend(ax1, ncol=2)
    ax1.grid(alpha=0.3)
    finite = np.where(np.isfinite(rpe), rpe, np.nan)
    ax2.plot(steps, finite, marker=".", color="tab:purple", label="rollouts per effective group")
    empty = np.isinf(rpe)
    if empty.any():
        top = np.nanmax(finite) if np.isfinite(finite).any() else 1.0
        ax2.plot(steps[empty], np.full(int(empty.sum()), top), "x", color="tab:red",
                 label="no effective group (infinite)")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("rollouts")
    ax2.set_title("Rollouts spent per effective group")
    _legend(ax2, ncol=2)
    ax2.grid(alpha=0.3)
    return _save(fig, path)


# The evaluation scores the reward plot draws (eval/<split>_<score>): the trainer logs every key of
# evaluate's ``overall`` (also n, turns, response_tokens, ...), which are not on a 0-1 scale.
EVAL_SCORES = ("pass@1", "em", "f1", "answer_rate")


def _eval_keys(records: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    keys = [k for k in keys if _has(records, k) and any(k.endswith("_" + score) for score in EVAL_SCORES)]
    # em equals pass@1 (single-sample exact match): draw it only when its pass@1 is not logged.
    return [k for k in keys if not (k.endswith("_em") and k[:-2] + "pass@1" in keys)]


def plot_reward(records: list[dict[str, Any]], path: Path) -> Path:
    steps = _series(records, "step")
    fig, (ax,) = _figure()
    for key, label, color in (("reward_mean", "reward (train rollouts)", "tab:blue"),
                              ("em_mean", "exact match (train rollouts)", "tab:green")):
        if _has(records, key):
            ax.plot(steps, _series(records, key), color=color, lw=1, alpha=0.8, label=label)
    eval_colors = ["tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    for i, key in enumerate(_eval_keys(records)):
        y = _series(records, key)
        keep = ~np.isnan(y)
        ax.plot(steps[keep], y[keep], marker="o", ls="--", color=eval_colors[i % len(eval_colors)], label=key)
    return _finish(fig, ax, path, "training step", "mean over rollouts / examples", "Reward and exact match", ncol=3)


def plot_transitions(matrix: np.ndarray, step: int, path: Path) -> Path:
    fig, (ax,) = _figure(height=5.0)
    fig.set_size_inches(6, 5)
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, label="draws")
    ax.set_xticks(range(3), [f"to {s}" for s in STATES])
    ax.set_yticks(range(3), [f"from {s}" for s in STATES])
    peak = matrix.max() if matrix.size else 0
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if peak and matrix[i, j] > 0.6 * peak else "black", fontsize=12)
    ax.set_title(f"State transitions between consecutive draws of a query\n(cumulative up to step {step})")
    return _save(fig, path)


def plot_flips(summary: dict[str, Any], last_step: int, path: Path) -> Path:
    steps = np.arange(0, last_step + 1)
    drawn = np.searchsorted(np.array(summary["first_draw_steps"]), steps, side="right")
    flipped = np.searchsorted(np.array(summary["first_flip_steps"]), steps, side="right")
    fig, (ax,) = _figure()
    ax.plot(steps, drawn, color="tab:blue", label="queries drawn at least once")
    ax.plot(steps, flipped, color="tab:red", label="queries that changed state (hard/signal/easy)")
    _integer_ticks(ax)
    return _finish(fig, ax, path, "training step", "queries (cumulative)",
                   "Pool coverage and queries that flipped state", ncol=2)


def plot_pool(records: list[dict[str, Any]], num_queries: float | None, path: Path) -> Path:
    steps = _series(records, "step")
    fig, (ax,) = _figure()
    # live queries solid and wide, the weight mass dashed on top: with consumed_weight 0 they coincide
    for key, label, color, style, width in (("live_queries", "live queries (w_q > 0)", "tab:green", "-", 3.0),
                                            ("live_weight_mass", "live weight mass (sum of w_q)", "tab:blue", "--", 1.5),
                                            ("never_drawn", "queries never drawn", "tab:gray", "-", 1.5)):
        if _has(records, key):
            ax.plot(steps, _series(records, key), color=color, ls=style, lw=width, label=label)
    if num_queries:
        ax.axhline(num_queries, color="black", ls="--", lw=1, label=f"pool size ({num_queries:.0f})")
    _mark_epochs(ax, records)
    ax.set_ylim(bottom=0)
    return _finish(fig, ax, path, "training step (after it)", "queries / weight",
                   "The pool after each step: live weight and coverage", ncol=2)


# ------------------------------------------------------------------------------------ table
def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return format(int(value), "d") if spec == "d" else format(value, spec)


def _sum(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for r in records if (v := _value(r, key)) is not None]
    return float(sum(vals)) if vals else None


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for r in records if (v := _value(r, key)) is not None and math.isfinite(v)]
    return float(sum(vals) / len(vals)) if vals else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    return num / den if den else math.inf if num else None


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for r in records if (v := _value(r, key)) is not None]
    return vals[-1] if vals else None


def summarize(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """One summary row: counts summed over steps, shares and rollouts/effective group over the sums,
    batch fill, reward and EM averaged over steps, the pool's state (STATE_KEYS) after the last step."""
    eff = _sum(records, "effective_batch")
    return {
        "step": None,
        "candidates": _sum(records, "candidates"),
        "signal_groups": _sum(records, "signal_groups"),
        "zv_all_wrong": _sum(records, "zv_all_wrong"),
        "zv_all_correct": _sum(records, "zv_all_correct"),
        "effective_batch": eff,
        "batch_fill": _mean(records, "batch_fill"),
        "recycled_share": _ratio(_sum(records, "recycled"), eff),
        "recovery_share": _ratio(_sum(records, "recovery"), eff),
        "drift_share": _ratio(_sum(records, "drift"), eff),
        "rollouts_per_effective_group": _ratio(_sum(records, "rollouts"), eff),
        "reward_mean": _mean(records, "reward_mean"),
        "em_mean": _mean(records, "em_mean"),
        **{key: _last(records, key) for key in STATE_KEYS},
    }


def build_table(records: list[dict[str, Any]], every: int) -> list[list[float | None]]:
    """Rows of COLUMNS for every ``every``-th record and always the last one (raw logged values)."""
    picked = list(range(0, len(records), every))
    if picked[-1] != len(records) - 1:
        picked.append(len(records) - 1)
    return [[_value(records[i], key) for _, key, _ in COLUMNS] for i in picked]


def format_table(rows: list[list[float | None]], summary: dict[str, float | None]) -> str:
    header = [name for name, _, _ in COLUMNS]
    body = [[_fmt(v, spec) for v, (_, _, spec) in zip(row, COLUMNS)] for row in rows]
    last = [_fmt(summary[key], spec) for _, key, spec in COLUMNS]
    last[0] = "all"
    widths = [max(len(h), *(len(r[i]) for r in [*body, last])) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body), rule, line(last)])


# ------------------------------------------------------------------------------------- main
def analyze(run_dir: str | Path, every: int | None = None, plots: bool = True,
            out: TextIO | None = None) -> dict[str, Any]:
    """Plot and tabulate one run's metrics; returns what it drew and computed (see the module doc)."""
    out = sys.stdout if out is None else out
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        hint = "" if run_dir.is_dir() else " (the run directory itself does not exist)"
        raise AnalyzeError(f"{path} not found{hint}: pass a run directory written by `megatron-recycle train`")
    records, bad, clashes = read_metrics(path)
    for lineno, why in bad[:20]:
        print(f"warning: {path}:{lineno}: skipped: {why}", file=out)
    if len(bad) > 20:
        print(f"warning: {len(bad) - 20} more malformed lines skipped", file=out)
    if clashes:
        print(f"warning: {clashes} line(s) logged a step's metric again with another value; the last value was kept",
              file=out)
    if not records:
        raise AnalyzeError(f"{path}: no valid metrics line ({len(bad)} malformed)")
    if every is None:
        every = 1 if len(records) <= 50 else math.ceil(len(records) / 40)
    if every < 1:
        raise ValueError(f"every must be >= 1 (print every Nth step), got {every}")

    # The pool's plots and table read the steps that logged the pool's metrics; a line with only an
    # evaluation (older runs logged the dev evaluation on a line of its own) feeds the reward plot.
    all_records = records
    records = [r for r in all_records if _value(r, "candidates") is not None]
    if not records:
        sft = " (an SFT run: its loss is in the same file, but it has no pool)" if any(
            "loss" in r or "train/loss" in r for r in all_records) else ""
        raise AnalyzeError(f"{path} holds no GRPO step with pool metrics{sft}; pass a run directory written by "
                           "`megatron-recycle train` or `run`")
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "metrics_file": str(path), "steps": len(records),
        "first_step": records[0]["step"], "last_step": records[-1]["step"],
        "bad_lines": [{"line": n, "reason": why} for n, why in bad], "duplicate_steps": clashes,
        "plots": {}, "skipped": {},
    }

    # Transition matrix: the last step that logged a well-formed 3x3 transitions_total.
    transitions = None
    for r in reversed(records):
        m = r.get("transitions_total")
        try:
            arr = np.asarray(m, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if arr.shape == (3, 3) and np.isfinite(arr).all():
            transitions = {"step": r["step"], "matrix": arr.astype(np.int64).tolist()}
            break
    result["transitions"] = transitions

    history = None
    hist_path = run_dir / POOL_HISTORY_FILE
    if hist_path.is_file():
        draws, hist_bad = read_pool_history(hist_path)
        for lineno, why in hist_bad[:20]:
            print(f"warning: {hist_path}:{lineno}: skipped: {why}", file=out)
        history = history_summary(draws)
        history["bad_rows"] = [{"line": n, "reason": why} for n, why in hist_bad]
    result["history"] = history

    if plots:
        plot_dir = run_dir / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        wanted = [
            ("recycled_share", ("recycled_share",), plot_recycled_share),
            ("zero_variance", ("zv_all_wrong", "zv_all_correct", "signal_groups"), plot_zero_variance),
            ("batch_fill", ("batch_fill",), plot_batch_fill),
        ]
        for name, keys, fn in wanted:
            missing = [k for k in keys if not _has(records, k)]
            if missing:
                result["skipped"][name] = f"no step logged {missing}"
                continue
            result["plots"][name] = str(fn(records, plot_dir / f"{name}.png"))
        if _has(all_records, "reward_mean") or _has(all_records, "em_mean") or _eval_keys(all_records):
            result["plots"]["reward"] = str(plot_reward(all_records, plot_dir / "reward.png"))
        else:
            result["skipped"]["reward"] = "no step logged reward_mean, em_mean or eval/..."
        if _has(records, "live_weight_mass") or _has(records, "never_drawn"):
            result["plots"]["pool"] = str(plot_pool(records, _last(records, "pool_queries"), plot_dir / "pool.png"))
        else:
            result["skipped"]["pool"] = "no step logged live_weight_mass or never_drawn"
        if transitions is not None:
            result["plots"]["transitions"] = str(plot_transitions(
                np.array(transitions["matrix"]), transitions["step"], plot_dir / "transitions.png"))
        else:
            result["skipped"]["transitions"] = "no step logged a 3x3 transitions_total"
        if history is not None and history["queries_drawn"]:
            last = max(records[-1]["step"], *(history["first_draw_steps"] or [0]))
            result["plots"]["flips"] = str(plot_flips(history, last, plot_dir / "flips.png"))
        else:
            result["skipped"]["flips"] = f"no {POOL_HISTORY_FILE} (or it is empty)"

    rows = build_table(records, every)
    summary = summarize(records)
    result["table"] = {"columns": [key for _, key, _ in COLUMNS], "every": every, "rows": rows}
    result["summary"] = summary
    tail = records[-max(1, len(records) // 10):]
    result["final_window"] = {"steps": len(tail), **{k: v for k, v in summarize(tail).items() if k != "step"}}

    print(f"# {path}: {len(records)} steps ({records[0]['step']}..{records[-1]['step']})"
          + (f", showing every {every} steps and the last" if every > 1 else ""), file=out)
    print(format_table(rows, summary), file=out)
    print("# all: counts summed over steps; recycled/recovery/drift and roll/eff over the summed counts; "
          "fill, reward, em averaged over steps", file=out)
    fw = result["final_window"]
    print(f"# last {fw['steps']} step(s): recycled share {_fmt(fw['recycled_share'], '.2f')} "
          f"(recovery {_fmt(fw['recovery_share'], '.2f')}, drift {_fmt(fw['drift_share'], '.2f')}), "
          f"batch fill {_fmt(fw['batch_fill'], '.2f')}", file=out)
    if transitions is not None:
        m = transitions["matrix"]
        cells = ", ".join(f"{a}->{b} {m[i][j]}" for i, a in enumerate(STATES) for j, b in enumerate(STATES))
        print(f"# transitions up to step {transitions['step']}: {cells}", file=out)
    if history is not None:
        print(f"# pool history: {history['queries_drawn']} queries drawn ({history['draws']} draws), "
              f"{history['queries_flipped']} flipped state at least once "
              f"({100 * history['flipped_share_of_drawn']:.1f}% of drawn)", file=out)
        logged = _last(records, "flipped_queries")
        if logged is not None and int(logged) != history["queries_flipped"]:
            print(f"warning: {hist_path.name} says {history['queries_flipped']} queries flipped, the metrics' last "
                  f"step (step {records[-1]['step']}) says {int(logged)}: the history is from another point of "
                  "the run (it is written at each checkpoint) or from another run", file=out)
    for name, p in result["plots"].items():
        print(f"# plot {name}: {p}", file=out)
    for name, why in result["skipped"].items():
        print(f"# plot {name} skipped: {why}", file=out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``analyze RUN_DIR [--every N] [--no-plots]``; returns the exit status."""
    p = argparse.ArgumentParser(prog="megatron-recycle analyze",
                                description="Plots and tables of a run's recycling dynamics from its metrics.jsonl.")
    p.add_argument("run_dir", help="a run directory (runs/NAME) with metrics.jsonl")
    p.add_argument("--every", type=int, default=None, help="print every Nth step (default: all up to 50 steps)")
    p.add_argument("--no-plots", action="store_true", help="only print the table")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        analyze(args.run_dir, every=args.every, plots=not args.no_plots)
    except (AnalyzeError, ValueError) as e:
        print(f"analyze: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
