"""Records that travel between the agent's parts: passages, retrievers, trajectories.

These are the contracts that the retrievers, the rollout loop, the rewards and the trainer
agree on. Keep them small and plain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class RetrievalError(RuntimeError):
    """A retriever could not answer (timeout, server error, bad response) after its retries."""


@dataclass
class Passage:
    """One retrieved passage in the Search-R1 layout: ``contents`` is ``"title\\ntext"``."""

    id: str
    contents: str
    score: float = 0.0

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0]

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) > 1 else ""


class Retriever(Protocol):
    """Batch of queries -> top-k passages per query, best first. Raises RetrievalError."""

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]: ...


@dataclass
class Trajectory:
    """One rollout of the multi-turn search protocol, ready for training.

    ``token_ids`` is prompt + response exactly as the engine produced it (no re-tokenization);
    ``loss_mask`` has the same length and is 1 exactly on policy-generated tokens (0 on the
    prompt and on every ``<information>`` block the environment inserted).
    """

    query_id: int
    sample_index: int
    token_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    response_text: str = ""
    answer: str | None = None
    reward: float = 0.0
    em: float = 0.0
    f1: float = 0.0
    turns: int = 0
    searches: int = 0
    finish_reason: str = ""  # "answer" | "max_turns" | "length" | "no_answer"
    retrieval_errors: int = 0
    rollout_logprobs: list[float] | None = None  # per response token, when the engine gives them
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.loss_mask):
            raise ValueError(
                f"Trajectory(query_id={self.query_id}): token_ids has {len(self.token_ids)} ids "
                f"but loss_mask has {len(self.loss_mask)} entries; they must be equal"
            )
