"""Outcome rewards: exact match (default) and token F1 of the <answer> against golden answers."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_recycle.agent.protocol import extract_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, fold white space (the SQuAD/FlashRAG rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Best token-level F1 over the golden answers."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
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
    malformed: bool  # no complete <answer> tag, or an empty one


def score_response(
    response: str, golds: Sequence[str], metric: str = "em", truncated: bool = False
) -> RewardResult:
    """Score a whole response. No answer, an empty answer or a truncated trajectory scores 0."""
    if metric not in ("em", "f1"):
        raise ValueError(f"reward metric must be 'em' or 'f1', got {metric!r}")
    if isinstance(golds, str):
        golds = [golds]
    if not golds:
        raise ValueError("score_response needs at least one golden answer")
    answer = extract_answer(response)
    if answer is None or not normalize_answer(answer) or truncated:
        return RewardResult(0.0, 0.0, 0.0, answer, malformed=answer is None or not normalize_answer(answer))
    em, f1 = exact_match(answer, golds), f1_score(answer, golds)
    return RewardResult(em if metric == "em" else f1, em, f1, answer, malformed=False)
