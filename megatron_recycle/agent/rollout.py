"""The multi-turn rollout loop: queries x K samples -> scored trajectories with loss masks.

Every round batches all unfinished trajectories into one engine call, then all their searches
into one retriever call. Token ids are only ever appended, never re-tokenized: the policy's
tokens are exactly what the engine returned (loss mask 1), and each <information> block is
tokenized on its own (loss mask 0).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from megatron_recycle.agent.protocol import (
    STOP_STRINGS,
    format_information,
    format_retrieval_error,
    observation_token_ids,
    parse_action,
    prompt_token_ids,
)
from megatron_recycle.agent.reward import score_response
from megatron_recycle.agent.types import RetrievalError, Retriever, Trajectory
from megatron_recycle.engines.base import Engine, SamplingParams
from megatron_recycle.pool import SUCCESS_THRESHOLD

log = logging.getLogger(__name__)

FINISH_REASONS = ("answer", "max_turns", "length", "no_answer")


@dataclass
class RolloutStats:
    """What one rollout() call did and cost; ``as_dict()`` is ready for a metrics line."""

    trajectories: int = 0
    engine_calls: int = 0
    turns: int = 0
    searches: int = 0
    retrieval_calls: int = 0
    retrieval_failures: int = 0  # searches the retriever failed (answered with an error observation)
    empty_searches: int = 0  # <search></search> with no query: the policy's error, told so, not searched
    bad_retrieval_results: int = 0  # retriever answers of the wrong shape (counted as failures too)
    tokens_generated: int = 0
    information_tokens: int = 0
    prompts_too_long: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    generate_seconds: float = 0.0
    retrieve_seconds: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        out = {k: v for k, v in asdict(self).items() if k != "finish_reasons"}
        for reason in FINISH_REASONS:
            out[f"finish_{reason}"] = self.finish_reasons.get(reason, 0)
        return out


class RolloutBatch(list):
    """A list of Trajectory (the K samples of a query adjacent, queries in input order) that
    also carries the batch's RolloutStats as ``.stats``."""

    def __init__(self, trajectories: Sequence[Trajectory], stats: RolloutStats) -> None:
        super().__init__(trajectories)
        self.stats = stats


@dataclass
class _State:
    """A trajectory under construction."""

    index: int
    query_id: int
    sample_index: int
    golds: list[str]
    token_ids: list[int]
    prompt_len: int
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    generated_text: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    turns: int = 0
    searches: int = 0
    retrieval_errors: int = 0
    finish: str | None = None


def rollout(
    engine: Engine,
    retriever: Retriever,
    questions: Sequence[tuple[int, str, Sequence[str]]],
    num_samples: int,
    params: SamplingParams,
    max_turns: int,
    max_total_tokens: int,
    topk: int,
    reward_metric: str = "em",
    max_passage_words: int = 0,
) -> RolloutBatch:
    """Roll out ``num_samples`` trajectories per (query_id, question, golden answers) and score them.

    ``max_turns`` bounds the searches per trajectory; ``max_total_tokens`` bounds prompt plus
    response (information blocks included); ``params.max_new_tokens`` bounds each turn. The
    stop strings of the protocol are always added to ``params.stop``. With ``params.seed``
    set, every (trajectory, turn) gets its own derived seed, so a rollout is reproducible.
    """
    _validate(questions, num_samples, max_turns, max_total_tokens, topk, reward_metric)
    start = time.perf_counter()
    tokenizer = engine.tokenizer
    stats = RolloutStats()
    stops = tuple(dict.fromkeys(STOP_STRINGS + tuple(params.stop)))

    states: list[_State] = []
    for query_id, question, golds in questions:
        prompt_ids = prompt_token_ids(tokenizer, question)
        for k in range(num_samples):
            s = _State(len(states), int(query_id), k, list(golds), list(prompt_ids), len(prompt_ids))
            s.loss_mask = [0] * len(prompt_ids)
            if len(prompt_ids) >= max_total_tokens:
                s.finish = "length"
                stats.prompts_too_long += 1
            states.append(s)
    if stats.prompts_too_long:
        log.warning(
            "rollout: %d trajectories have a prompt of at least max_total_tokens=%d tokens and were "
            "ended before generating (reward 0); raise max_total_tokens",
            stats.prompts_too_long,
            max_total_tokens,
        )

    active = [s for s in states if s.finish is None]
    while active:
        requests = []
        for s in active:
            budget = max_total_tokens - len(s.token_ids)
            seed = None if params.seed is None else _derive_seed(params.seed, s.index, s.turns)
            requests.append(replace(params, stop=stops, max_new_tokens=min(params.max_new_tokens, budget), seed=seed))
        t0 = time.perf_counter()
        generations = engine.generate([s.token_ids for s in active], requests)
        stats.generate_seconds += time.perf_counter() - t0
        stats.engine_calls += 1
        if len(generations) != len(active):
            raise RuntimeError(
                f"rollout: engine returned {len(generations)} generations for {len(active)} prompts; "
                "an Engine must return exactly one Generation per prompt"
            )

        searching: list[tuple[_State, str]] = []
        for s, gen in zip(active, generations):
            s.token_ids.extend(gen.token_ids)
            s.loss_mask.extend([1] * len(gen.token_ids))
            if s.logprobs is not None and gen.logprobs is not None and len(gen.logprobs) == len(gen.token_ids):
                s.logprobs.extend(gen.logprobs)
            else:
                s.logprobs = None
            s.turns += 1
            stats.turns += 1
            stats.tokens_generated += len(gen.token_ids)
            text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
            s.generated_text.append(text)
            kind, content = parse_action(text) if gen.finish_reason == "stop" else (None, None)
            if gen.finish_reason == "length":
                s.finish = "length"
            elif kind == "answer" and gen.stop_str == "</answer>":
                s.finish = "answer"
            elif kind == "search" and gen.stop_str == "</search>":
                if s.searches >= max_turns:
                    s.finish = "max_turns"
                else:
                    searching.append((s, content))
            else:  # end of sequence, a caller's own stop string, or a closing tag without its opening
                s.finish = "no_answer"

        if searching:
            observations = _retrieve(retriever, [q for _, q in searching], topk, stats, max_passage_words)
            for (s, query), (obs, failed) in zip(searching, observations):
                s.searches += 1
                s.queries.append(query)
                stats.searches += 1
                s.retrieval_errors += failed
                info_ids = observation_token_ids(tokenizer, obs)
                if len(s.token_ids) + len(info_ids) >= max_total_tokens:
                    s.finish = "length"  # no room left to read the results and continue
                    continue
                s.token_ids.extend(info_ids)
                s.loss_mask.extend([0] * len(info_ids))
                if s.logprobs is not None:
                    s.logprobs.extend([0.0] * len(info_ids))
                stats.information_tokens += len(info_ids)
        active = [s for s in states if s.finish is None]

    trajectories = [_finish(s, tokenizer, reward_metric) for s in states]
    stats.trajectories = len(trajectories)
    stats.finish_reasons = dict(Counter(t.finish_reason for t in trajectories))
    stats.seconds = time.perf_counter() - start
    return RolloutBatch(trajectories, stats)


def _retrieve(
    retriever: Retriever, queries: list[str], topk: int, stats: RolloutStats, max_passage_words: int = 0
) -> list[tuple[str, bool]]:
    """(observation text, failed) per query; failures become error observations (counted, logged).
    An empty query is the policy's mistake, not the retriever's: it gets an error observation and
    counts as an empty search, not as a failed retrieval."""
    observations: list[tuple[str, bool] | None] = [None] * len(queries)
    asked = [i for i, q in enumerate(queries) if q.strip()]
    for i, q in enumerate(queries):
        if not q.strip():
            observations[i] = (format_retrieval_error("the search query was empty"), False)
            stats.empty_searches += 1
    if asked:
        t0 = time.perf_counter()
        stats.retrieval_calls += 1
        try:
            # a retriever with search_each (HTTP) keeps a failure to the queries it concerns
            each = getattr(retriever, "search_each", None)
            asked_queries = [queries[i] for i in asked]
            results = each(asked_queries, topk) if each is not None else retriever.search(asked_queries, topk)
            if len(results) != len(asked):
                stats.bad_retrieval_results += 1
                raise RetrievalError(f"retriever returned {len(results)} result lists for {len(asked)} queries")
            failed = [err for err in results if isinstance(err, RetrievalError)]
            if failed:
                log.warning("rollout: retrieval failed for %d of %d queries: %s", len(failed), len(asked), failed[0])
                stats.retrieval_failures += len(failed)
            for i, passages in zip(asked, results):
                if isinstance(passages, RetrievalError):
                    observations[i] = (format_retrieval_error(str(passages)), True)
                else:
                    observations[i] = (format_information(passages[:topk], max_passage_words), False)
        except RetrievalError as err:
            log.warning("rollout: retrieval failed for %d queries: %s", len(asked), err)
            for i in asked:
                observations[i] = (format_retrieval_error(str(err)), True)
            stats.retrieval_failures += len(asked)
        finally:
            stats.retrieve_seconds += time.perf_counter() - t0
    return observations  # type: ignore[return-value]


def _finish(s: _State, tokenizer, reward_metric: str) -> Trajectory:
    """Score a finished state; the reward reads only policy-generated text, never a passage."""
    generated = "".join(s.generated_text)
    result = score_response(generated, s.golds, metric=reward_metric, truncated=s.finish == "length",
                            answered=s.finish == "answer")
    return Trajectory(
        query_id=s.query_id,
        sample_index=s.sample_index,
        token_ids=s.token_ids,
        loss_mask=s.loss_mask,
        prompt_len=s.prompt_len,
        response_text=tokenizer.decode(s.token_ids[s.prompt_len :], skip_special_tokens=True),
        answer=result.answer,
        reward=result.reward,
        em=result.em,
        f1=result.f1,
        turns=s.turns,
        searches=s.searches,
        finish_reason=s.finish or "length",
        retrieval_errors=s.retrieval_errors,
        rollout_logprobs=s.logprobs,
        extra={"queries": s.queries, "malformed": result.malformed, "golden_answers": s.golds},
    )


def _derive_seed(seed: int, trajectory: int, turn: int) -> int:
    """A distinct, reproducible seed per (run seed, trajectory, turn)."""
    return ((seed * 1_000_003 + trajectory) * 10_007 + turn) % (2**63)


def _validate(questions, num_samples, max_turns, max_total_tokens, topk, reward_metric) -> None:
    if num_samples < 1:
        raise ValueError(f"rollout num_samples must be >= 1, got {num_samples}")
    if max_turns < 0:
        raise ValueError(f"rollout max_turns must be >= 0 (0 forbids searching), got {max_turns}")
    if max_total_tokens < 2:
        raise ValueError(f"rollout max_total_tokens must be >= 2, got {max_total_tokens}")
    if topk < 1:
        raise ValueError(f"rollout topk must be >= 1, got {topk}")
    if reward_metric not in ("em", "f1") and ":" not in reward_metric:
        raise ValueError(f"rollout reward_metric must be 'em', 'f1' or 'module:function', got {reward_metric!r}")
    for item in questions:
        if len(item) != 3:
            raise ValueError(f"rollout questions are (query_id, question, golden_answers) triples, got {item!r}")
        qid, question, golds = item
        if isinstance(golds, str) or not golds:
            raise ValueError(
                f"rollout: query {qid} needs a non-empty list of golden answers, got {golds!r}"
            )


def trajectory_record(t: Trajectory) -> dict:
    """What rollout_metrics needs of one trajectory: a few numbers, cheap to gather across ranks."""
    return {"query_id": t.query_id, "reward": t.reward, "em": t.em, "f1": t.f1,
            "answered": t.finish_reason == "answer" and not t.extra.get("malformed", False),
            "finish_reason": t.finish_reason, "searches": t.searches, "turns": t.turns,
            "response_tokens": len(t.token_ids) - t.prompt_len, "generated_tokens": sum(t.loss_mask),
            "retrieval_errors": t.retrieval_errors}


def rollout_metrics(trajectories: Sequence[Trajectory | dict]) -> dict[str, float]:
    """Mean reward, EM, F1, answer rate, searches, turns, lengths, generated tokens (mean and
    total), finish-reason shares and, for groups of several samples, the all-correct / all-wrong /
    mixed split by query. Takes trajectories or their ``trajectory_record``s (a trainer gathers
    the records of every data-parallel replica, so that the metrics cover the whole batch)."""
    records = [t if isinstance(t, dict) else trajectory_record(t) for t in trajectories]
    n = len(records)
    if n == 0:
        return {"trajectories": 0}
    generated = sum(r["generated_tokens"] for r in records)
    out: dict[str, float] = {
        "trajectories": n,
        "reward_mean": sum(r["reward"] for r in records) / n,
        "em_mean": sum(r["em"] for r in records) / n,
        "f1_mean": sum(r["f1"] for r in records) / n,
        "answer_rate": sum(r["answered"] for r in records) / n,
        "searches_mean": sum(r["searches"] for r in records) / n,
        "turns_mean": sum(r["turns"] for r in records) / n,
        "response_tokens_mean": sum(r["response_tokens"] for r in records) / n,
        "generated_tokens_mean": generated / n,
        "generated_tokens": generated,
        "retrieval_errors": sum(r["retrieval_errors"] for r in records),
    }
    reasons = Counter(r["finish_reason"] for r in records)
    for reason in FINISH_REASONS:
        out[f"finish_{reason}"] = reasons.get(reason, 0) / n
    groups: dict[int, list[float]] = {}
    for r in records:
        groups.setdefault(r["query_id"], []).append(r["reward"])
    if any(len(g) > 1 for g in groups.values()):
        multi = [g for g in groups.values() if len(g) > 1]
        out["groups"] = len(multi)
        # Equal rewards split by the pool's success rule (a constant F1 of 0.3 is all-wrong there).
        same = [g[0] for g in multi if len(set(g)) == 1]
        out["groups_all_correct"] = sum(r >= SUCCESS_THRESHOLD for r in same) / len(multi)
        out["groups_all_wrong"] = sum(r < SUCCESS_THRESHOLD for r in same) / len(multi)
        out["groups_mixed"] = (len(multi) - len(same)) / len(multi)
    return out
