"""Readers for question-answering files: FlashRAG jsonl and Search-R1 parquet.

FlashRAG rows: {"id", "question", "golden_answers": [...], "metadata": {...}} (our synthetic
files use the same layout). Search-R1 parquet rows: "prompt" (chat messages holding the
question), "reward_model": {"ground_truth": {"target": [...]}}, "data_source"; most also keep
the original "question" and "golden_answers" columns, which are preferred when present.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = (
    "nq",
    "triviaqa",
    "popqa",
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
)
# Other folder names the same benchmarks go by in FlashRAG / Search-R1 downloads.
BENCHMARK_ALIASES: dict[str, tuple[str, ...]] = {
    "nq": ("nq", "natural_questions", "nq_search"),
    "triviaqa": ("triviaqa", "trivia_qa", "triviaqa_search"),
    "popqa": ("popqa", "popqa_search"),
    "hotpotqa": ("hotpotqa", "hotpot_qa", "hotpotqa_search"),
    "2wikimultihopqa": ("2wikimultihopqa", "2wiki", "2wikimultihop", "2wikimultihopqa_search"),
    "musique": ("musique", "musique_search"),
    "bamboogle": ("bamboogle", "bamboogle_search"),
}
SPLIT_PREFERENCE: tuple[str, ...] = ("test", "dev", "val", "validation")
_SPLIT_NAMES = {"train", "test", "dev", "val", "validation"}
_FORMATS = (".jsonl", ".parquet", ".json")


class QAFormatError(ValueError):
    """A QA file or one of its rows does not have the expected fields."""


@dataclass
class QAExample:
    """One question with its accepted answers; ``source`` names the benchmark it came from."""

    id: str
    question: str
    golden_answers: list[str]
    source: str
    metadata: dict = field(default_factory=dict)


class QAExamples(list):
    """The examples of one file, plus how many malformed rows were skipped (and where)."""

    def __init__(self, items: list[QAExample], path: Path, skipped: list[str]) -> None:
        super().__init__(items)
        self.path = path
        self.skipped_rows = skipped  # "file:line: reason" for every skipped row

    @property
    def skipped(self) -> int:
        return len(self.skipped_rows)


def _source_from_path(path: Path) -> str:
    """Benchmark name from a path: nq/test.jsonl -> "nq", hotpotqa_dev.jsonl -> "hotpotqa"."""
    stem = path.stem.lower()
    if stem in _SPLIT_NAMES:
        return path.parent.name.lower() or stem
    return re.sub(r"[_-](train|test|dev|val|validation)$", "", stem)


def _as_answers(value: Any, field: str) -> list[str] | None:
    """A golden-answer field as a list of strings; None when the field is absent (None), and
    QAFormatError when it is there but holds no usable answer (so that no other field is read in
    its place): an answer must be text or a number, not a list or a mapping."""
    if value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays (and scalars) from parquet
        value = value.tolist()
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise QAFormatError(f"'{field}' must be a list of answers or one answer, got {type(value).__name__}")
    answers = []
    for a in value:
        if hasattr(a, "tolist"):
            a = a.tolist()
        if a is None:
            continue
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise QAFormatError(f"'{field}' holds a {type(a).__name__} ({str(a)[:60]}); answers must be text or numbers")
        if isinstance(a, float) and not math.isfinite(a):
            raise QAFormatError(f"'{field}' holds {a}; an answer must be text or a finite number")
        if isinstance(a, str) and _looks_like_a_list(a):
            raise QAFormatError(
                f"'{field}' holds the text of a list ({a[:60]}): the answers were written as a string (a CSV "
                "round trip?); store them as a JSON list"
            )
        # 1960.0 -> "1960"; past 2**53 a float's integer digits are not the number written
        text = str(int(a)) if isinstance(a, float) and a.is_integer() and abs(a) < 2**53 else str(a)
        if text.strip():
            answers.append(text.strip())
    if not answers:
        raise QAFormatError(f"'{field}' holds no non-empty answer")
    return answers


def _looks_like_a_list(text: str) -> bool:
    """True for the printed form of a list of answers ("['Paris', 'City of Light']")."""
    t = text.strip()
    if not (t.startswith("[") and t.endswith("]")):
        return False
    try:
        value = ast.literal_eval(t)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    return isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)


def _question_from_prompt(prompt: Any) -> str | None:
    """The question inside a Search-R1 prompt (chat messages or a string)."""
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        try:  # chat messages stored as a JSON string
            prompt = json.loads(prompt)
        except ValueError:
            pass
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    # Search-R1 embeds the question in its instruction as "... Question: <q>\n"
    if "Question:" in prompt:
        prompt = prompt.rsplit("Question:", 1)[1]
    return prompt.strip() or None


def _to_example(row: Any, index: int, default_source: str) -> QAExample:
    """Turn one raw row into a QAExample; QAFormatError with the reason when it cannot."""
    if not isinstance(row, dict):
        raise QAFormatError(f"expected a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        question = _question_from_prompt(row.get("prompt"))
    if not question:
        raise QAFormatError("no 'question' (or Search-R1 'prompt') field with text")
    # The first answer field present is the one read; a present but unusable one is an error.
    answers = _as_answers(row.get("golden_answers"), "golden_answers")
    if answers is None:
        reward = row.get("reward_model")
        if isinstance(reward, dict) and isinstance(reward.get("ground_truth"), dict):
            answers = _as_answers(reward["ground_truth"].get("target"), "reward_model.ground_truth.target")
    if answers is None:
        key = "answers" if row.get("answers") is not None else "answer"
        answers = _as_answers(row.get(key), key)
    if answers is None:
        raise QAFormatError(
            "no golden answers: expected a non-empty 'golden_answers' list or Search-R1 "
            "'reward_model.ground_truth.target'"
        )
    metadata = row.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    source = row.get("data_source") or row.get("source") or metadata.get("source") or default_source
    rid = row.get("id")
    if rid is None and isinstance(row.get("extra_info"), dict):
        rid = row["extra_info"].get("index")
    rid = str(rid) if rid is not None else f"{default_source}_{index}"
    return QAExample(rid, question.strip(), answers, str(source), metadata)


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; a row that is not valid JSON comes back as a QAFormatError."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        # A byte-order mark (written by some Windows tools) is not part of the first row; bytes that are
        # not UTF-8 come through as surrogates, so that a bad byte is that row's error, not the file's.
        with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError as e:
                    yield f"{path}:{lineno}", QAFormatError(f"not UTF-8 text (character {e.start + 1} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", QAFormatError(f"not valid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise QAFormatError(f"{path}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None
        except json.JSONDecodeError as e:
            raise QAFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise QAFormatError(f"{path}: a .json QA file must hold a list of rows")
        for i, row in enumerate(data):
            yield f"{path}[{i}]", row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow; install it with `pip install pyarrow`"
            ) from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i + 1}", row
    else:
        raise QAFormatError(f"{path}: unknown QA file type {suffix!r}; use .jsonl, .json or .parquet")


def read_qa_file(path: str | Path, skip_bad_rows: bool = False, source: str | None = None) -> QAExamples:
    """Read a FlashRAG jsonl / json or Search-R1 parquet QA file into QAExamples.

    A malformed row raises QAFormatError naming the file and line; with ``skip_bad_rows`` it is
    skipped, logged and counted (``result.skipped``). ``source`` overrides the benchmark name
    otherwise taken from the row ("data_source") or the path (nq/test.jsonl -> "nq").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    default_source = source or _source_from_path(path)
    examples: list[QAExample] = []
    skipped: list[str] = []
    for i, (where, row) in enumerate(_iter_rows(path)):
        try:
            if isinstance(row, QAFormatError):
                raise row
            example = _to_example(row, i, default_source)
            if source:
                example.source = source
            examples.append(example)
        except QAFormatError as e:
            if not skip_bad_rows:
                raise QAFormatError(f"{where}: {e} (pass skip_bad_rows=True to skip such rows)") from None
            skipped.append(f"{where}: {e}")
    if skipped:
        logger.warning(
            "%s: skipped %d malformed rows of %d (first: %s)",
            path,
            len(skipped),
            len(skipped) + len(examples),
            skipped[0],
        )
    if not examples:
        raise QAFormatError(f"{path}: no usable rows")
    return QAExamples(examples, path, skipped)


class BenchmarkFiles(dict):
    """Benchmark name -> the file chosen for it (a dict), plus ``missing``: the names not found."""

    def __init__(self, found: dict[str, Path], missing: list[str]) -> None:
        super().__init__(found)
        self.missing = missing

    @property
    def found(self) -> dict[str, Path]:
        return dict(self)


def find_benchmark_files(
    data_dir: str | Path,
    names: tuple[str, ...] = BENCHMARKS,
    splits: tuple[str, ...] = SPLIT_PREFERENCE,
) -> BenchmarkFiles:
    """Locate the benchmarks in the FlashRAG/Search-R1 layout and say which are missing.

    Looks for ``<dir>/<name>/<split>.{jsonl,parquet,json}`` and ``<dir>/<name>_<split>.<ext>``
    (folder names as in BENCHMARK_ALIASES, case-insensitive), taking the first split of
    ``splits`` that exists (test before dev, as FlashRAG evaluates).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"benchmark folder {data_dir} does not exist")
    entries = {p.name.lower(): p for p in data_dir.iterdir()}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        if name not in BENCHMARK_ALIASES and name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        aliases = BENCHMARK_ALIASES.get(name, (name,))
        choice = None
        for split in splits:
            for alias in aliases:
                folder = entries.get(alias)
                candidates = []
                if folder is not None and folder.is_dir():
                    inner = {p.name.lower(): p for p in folder.iterdir()}
                    candidates += [inner.get(f"{split}{ext}") for ext in _FORMATS]
                candidates += [entries.get(f"{alias}_{split}{ext}") for ext in _FORMATS]
                choice = next((c for c in candidates if c is not None and c.is_file()), None)
                if choice:
                    break
            if choice:
                break
        if choice:
            found[name] = choice
        else:
            missing.append(name)
    if missing:
        logger.info("benchmarks not found under %s: %s", data_dir, ", ".join(missing))
    return BenchmarkFiles(found, missing)
