"""Outcome rewards: exact match (default) and token F1 of the <answer> against golden answers."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_recycle.agent.protocol import extract_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, fold white space (the SQuAD/FlashRAG rule).

    Punctuation is ASCII's (``string.punctuation``), as in SQuAD, FlashRAG and Search-R1, so that
    exact match means what their published numbers mean: curly quotes, dashes other than "-" and
    other non-ASCII punctuation are kept, and "“Paris”" does not match "Paris".
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


_CLOSED_ANSWERS = ("yes", "no", "noanswer")


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Best token-level F1 over the golden answers, with HotpotQA's closed-answer rule that FlashRAG
    applies on the seven benchmarks: a yes/no/noanswer answer (prediction or gold, after
    normalization) earns nothing unless the other one is that same word ("yes they are" against
    "yes" is 0, not 0.5). One deliberate difference from FlashRAG: when prediction and gold both
    normalize to no tokens (the band "The The", the letter "A") F1 is 1, as in SQuAD 2.0 and as
    exact match says; FlashRAG scores that 0 (a question or two in thousands)."""
    pred = normalize_answer(prediction)
    pred_tokens = pred.split()
    best = 0.0
    for gold in golds:
        norm_gold = normalize_answer(gold)
        if (pred in _CLOSED_ANSWERS or norm_gold in _CLOSED_ANSWERS) and pred != norm_gold:
            continue
        gold_tokens = norm_gold.split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = Counter(pred_tokens) & Counter(gold_tokens)
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred_tokens), same / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


@dataclass
class RewardResult:
    reward: float
    em: float
    f1: float
    answer: str | None
    malformed: bool  # no complete <answer> tag (or none the trajectory ended on), or an empty one


@functools.cache
def load_reward_fn(spec: str) -> Callable[[str, list[str], bool], float]:
    """A custom reward ``fn(response, golden_answers, truncated) -> float`` named by
    ``"package.module:function"`` or ``"/path/to/file.py:function"`` (recipes: rollout.reward)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"custom reward {spec!r} must look like 'package.module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            module_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = _import_module(target)
        fn = getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError) as e:
        raise ValueError(f"cannot load the custom reward {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"custom reward {spec!r} is not callable")
    return fn


def _import_module(target: str) -> Any:
    """importlib.import_module, then once more with the working directory at the END of sys.path
    when the module is not found: the heavy commands run as ``python -P`` (the checkout's folders
    must not shadow installed packages), which leaves out a reward module beside the user."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != target.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(target)


def score_response(
    response: str, golds: Sequence[str], metric: str = "em", truncated: bool = False, answered: bool = True
) -> RewardResult:
    """Score a whole response. No answer, an empty answer or a truncated trajectory scores 0.

    ``metric`` is "em", "f1", or a custom reward spec (see load_reward_fn); EM and F1 are
    always computed for the metrics. ``answered=False`` says the trajectory did not end on a
    closed ``<answer>`` tag (the rollout's finish reason): it has no answer, even when the joined
    turns happen to hold an ``<answer>...</answer>`` pair across a search.
    """
    if isinstance(golds, str):
        golds = [golds]
    if not golds:
        raise ValueError("score_response needs at least one golden answer")
    custom = None
    if metric not in ("em", "f1"):
        if ":" not in metric:
            raise ValueError(f"reward metric must be 'em', 'f1' or 'module:function', got {metric!r}")
        custom = load_reward_fn(metric)
    answer = extract_answer(response) if answered else None
    # Empty raw content is malformed; content that normalizes to nothing ("the") is an answer,
    # compared as SQuAD does, so that a gold such as "The The" or "A" can be matched.
    malformed = answer is None or not answer.strip()
    em = f1 = 0.0
    if not malformed and not truncated:
        em, f1 = exact_match(answer, golds), f1_score(answer, golds)
    if custom is not None:
        value = float(custom(response, list(golds), truncated))
        if not math.isfinite(value):
            raise ValueError(f"custom reward {metric!r} returned {value} for a response; rewards must be finite")
        return RewardResult(value, em, f1, answer, malformed=malformed)
    return RewardResult(em if metric == "em" else f1, em, f1, answer, malformed=malformed)
