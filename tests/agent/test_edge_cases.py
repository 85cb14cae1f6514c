"""Edge cases of rollouts, the QA reader and SFT tokenization that mutants showed untested: the
token budget, a custom reward told of truncation, policy-token counts, max_turns 0, the success
threshold, top-k, chat prompts, sources, null answers, and where an oracle trajectory is cut."""

from __future__ import annotations

import json

import pytest

from megatron_recycle.agent.rollout import rollout, rollout_metrics, trajectory_record
from megatron_recycle.agent.types import Passage
from megatron_recycle.engines.base import SamplingParams
from tests.agent.test_rollout import FakeEngine, FakeRetriever, chars, prompt_ids, smollm2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def test_prompt_exactly_at_the_budget_never_reaches_the_engine(tok):  # R01
    q = "Capital of France?"
    engine = FakeEngine(tok, {"France": [chars(tok, "<answer> Paris </answer>")]})
    (t,) = rollout(engine, FakeRetriever(), [(0, q, ["Paris"])], 1, SamplingParams(max_new_tokens=50), 2,
                   len(prompt_ids(tok, q)), 3)
    assert t.finish_reason == "length" and engine.calls == []


def test_a_custom_reward_is_told_a_trajectory_was_truncated(tok, tmp_path):  # R11
    f = tmp_path / "rw.py"
    f.write_text("def fn(response, golds, truncated):\n    return 1.0 if truncated else 0.25\n")
    engine = FakeEngine(tok, {"France": [chars(tok, "<think>" + "x" * 60 + "</think><answer> Paris </answer>")]})
    q = "Capital of France?"
    (t,) = rollout(engine, FakeRetriever(), [(0, q, ["Paris"])], 1, SamplingParams(max_new_tokens=500), 2,
                   len(prompt_ids(tok, q)) + 30, 3, reward_metric=f"{f}:fn")
    assert t.finish_reason == "length" and t.reward == 1.0


def test_generated_tokens_count_only_policy_tokens(tok):  # R14
    engine = FakeEngine(tok, {"France": [chars(tok, "<search> q </search>"), chars(tok, "<answer> Paris </answer>")]})
    (t,) = rollout(engine, FakeRetriever(), [(0, "Capital of France?", ["Paris"])], 1,
                   SamplingParams(max_new_tokens=100), 2, 4096, 3)
    rec = trajectory_record(t)
    assert rec["generated_tokens"] == sum(t.loss_mask) < rec["response_tokens"]


def test_max_turns_zero_forbids_searching(tok):  # R15
    engine = FakeEngine(tok, {"France": [chars(tok, "<search> q </search>")]})
    retriever = FakeRetriever()
    (t,) = rollout(engine, retriever, [(0, "Capital of France?", ["Paris"])], 1, SamplingParams(max_new_tokens=100),
                   0, 4096, 3)
    assert t.finish_reason == "max_turns" and retriever.calls == []


def test_equal_rewards_at_the_success_threshold_are_all_correct():  # R09
    from megatron_recycle.pool import SUCCESS_THRESHOLD

    recs = [{"query_id": 0, "reward": SUCCESS_THRESHOLD, "em": 0.0, "f1": SUCCESS_THRESHOLD, "answered": True,
             "searches": 0, "turns": 1, "response_tokens": 1, "generated_tokens": 1, "retrieval_errors": 0,
             "finish_reason": "answer"}] * 2
    assert rollout_metrics(recs)["groups_all_correct"] == 1.0


def test_only_topk_passages_are_shown(tok):  # R07
    class Generous(FakeRetriever):
        def search(self, queries, topk):
            return [[Passage(f"d{i}", f"T{i}\ntext {i}", 1.0) for i in range(topk + 3)] for q in queries]

    engine = FakeEngine(tok, {"France": [chars(tok, "<search> q </search>"), chars(tok, "<answer> Paris </answer>")]})
    (t,) = rollout(engine, Generous(), [(0, "Capital of France?", ["Paris"])], 1, SamplingParams(max_new_tokens=100),
                   2, 4096, 2)
    text = tok.decode(t.token_ids)
    assert "text 1" in text and "text 2" not in text


# ----------------------------------------------------------------------------------- datasets
from megatron_recycle.data.datasets import read_qa_file  # noqa: E402


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_is_the_last_user_message_and_after_the_last_marker(tmp_path):  # D03, D04
    prompt = [{"role": "user", "content": "Example. Question: what is 1+1?"},
              {"role": "assistant", "content": "2"},
              {"role": "user", "content": "Answer as before. Question: real one? Question: the real question?"}]
    (ex,) = read_qa_file(_jsonl(tmp_path / "x.jsonl", [{"prompt": prompt, "golden_answers": ["a"]}]))
    assert ex.question == "the real question?"


def test_source_argument_overrides_the_rows_data_source(tmp_path):  # D05
    (ex,) = read_qa_file(_jsonl(tmp_path / "x.jsonl", [{"question": "q", "golden_answers": ["a"],
                                                         "data_source": "other"}]), source="nq")
    assert ex.source == "nq"


def test_null_entries_in_an_answer_list_are_skipped(tmp_path):  # D07
    (ex,) = read_qa_file(_jsonl(tmp_path / "x.jsonl", [{"question": "q", "golden_answers": ["Paris", None]}]))
    assert ex.golden_answers == ["Paris"]


def test_a_blank_question_falls_back_to_the_prompt(tmp_path):  # D13
    row = {"question": "   ", "prompt": [{"role": "user", "content": "Question: X?"}], "golden_answers": ["a"]}
    (ex,) = read_qa_file(_jsonl(tmp_path / "x.jsonl", [row]))
    assert ex.question == "X?"


# ---------------------------------------------------------------------------------------- sft
def test_a_cut_oracle_trajectory_keeps_its_prompt(tok):  # S04
    from megatron_recycle.agent.protocol import prompt_token_ids
    from megatron_recycle.train.sft import tokenize_oracle

    row = {"question": "Who?", "turns": [{"generated": "<answer> " + "x " * 200 + "</answer>"}]}
    full, full_mask = tokenize_oracle(row, tok, 100_000)
    p = len(prompt_token_ids(tok, "Who?"))
    ids, mask = tokenize_oracle(row, tok, p + 5)
    assert ids == full[: p + 5] and mask == [0] * p + [1] * 5
