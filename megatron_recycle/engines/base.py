"""The generation-engine interface shared by the native (Megatron model, CPU), Hugging Face (CPU/GPU) and vLLM (GPU) engines.

Token ids in, token ids out: the rollout loop never re-tokenizes what an engine produced.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    """Sampling for one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # generation ends right after the first of these strings
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, as vLLM also accepts it (not its characters)
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN passes a "< 0" test
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # False for NaN too
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        # an integer: engines disagree on 2.7 (vLLM truncates it, a decode loop runs 3 steps)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral):
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not 0 <= self.seed < 2**63):  # a torch.Generator seed's range
            raise ValueError(f"SamplingParams.seed must be an integer in [0, 2**63) or None, got {self.seed!r}")


@dataclass
class Generation:
    """What one request produced: only the new tokens (a matched stop string included)."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string matched), "eos", or "length"
    stop_str: str | None = None
    logprobs: list[float] | None = field(default=None)  # sampling log-prob per new token


class Engine(Protocol):
    """A generation backend. Implementations: engines.hf.HFEngine, engines.vllm.VLLMEngine."""

    tokenizer: object

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the engine's model in place."""

    def sleep(self) -> None:
        """Release generation memory (KV cache) while the trainer runs; no-op where meaningless."""

    def wake(self) -> None:
        """Undo sleep()."""
