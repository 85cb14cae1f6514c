"""NativeEngine (generation from the trainer's Megatron tensors) against HFEngine over transformers.

Both engines share DecodingBase's sampling, so with logits that agree to fp32 rounding they must
choose the same tokens: greedy and seeded sampling, prompts of different lengths, repeated
prompts (prefilled once), per-request token limits, stop strings, eos, and row compaction.
Log-probs agree to 1e-4 (measured ~1e-6 on these tiny models).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_recycle.engines.base import SamplingParams
from megatron_recycle.engines.hf import HFEngine
from megatron_recycle.engines.native import NativeEngine
from megatron_recycle.model.build import build_model_chunks
from megatron_recycle.model.convert import load_hf_weights

FAMILIES = [("llama", True), ("qwen3", False), ("qwen2", False), ("llama3_rope", True)]
EOS = 3


class CharTokenizer:
    """Token id i decodes to one letter, so stop strings are sequences of ids."""

    eos_token_id = EOS
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def _pair(tiny, kind, tied, compact_fraction=0.125):
    hf = tiny.tiny_hf_model(kind, tied)
    with torch.no_grad():  # a sharper distribution, so greedy choices are far from ties
        hf.get_input_embeddings().weight.mul_(8.0)
    hf.generation_config.eos_token_id = EOS
    model = build_model_chunks(hf.config, layer_spec="local")[0].eval()
    load_hf_weights([model], hf)
    tok = CharTokenizer()
    # the generation config both engines stop by (build_engine passes the folder's to NativeEngine)
    return (HFEngine(hf, tok), NativeEngine(model, hf.config, tok, compact_fraction=compact_fraction,
                                            generation_config=hf.generation_config), model)


def _prompts(n_groups=3, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(4, 128, (int(n),), generator=g).tolist() for n in torch.randint(3, 11, (n_groups,), generator=g)]
    return [p for p in base for _ in range(k)]


def _same(a, b, atol=1e-4):
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.finish_reason for x in a] == [x.finish_reason for x in b]
    assert [x.stop_str for x in a] == [x.stop_str for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("kind,tied", FAMILIES)
def test_greedy_and_sampled_match_hf(world1, tiny, kind, tied):
    hf_engine, native, _ = _pair(tiny, kind, tied)
    prompts = _prompts()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    _same(hf_engine.generate(prompts, greedy), native.generate(prompts, greedy))
    sampled = SamplingParams(temperature=4.0, top_p=0.95, max_new_tokens=12, seed=7)
    a, b = hf_engine.generate(prompts, sampled), native.generate(prompts, sampled)
    _same(a, b)
    # seeds differ per request, so a group's repeated prompt gives different samples
    assert len({tuple(x.token_ids) for x in b[:3]}) > 1


def test_ragged_limits_stops_and_compaction(world1, tiny):
    for frac in (0.0, 0.125, 1.0):  # compact at every finish, the default, only when all finished
        hf_engine, native, _ = _pair(tiny, "llama", True, compact_fraction=frac)
        prompts = _prompts(n_groups=4, k=2, seed=3)
        params = [SamplingParams(temperature=1.0, max_new_tokens=3 + 2 * i, seed=i, stop=("ab", "q"))
                  for i in range(len(prompts))]
        a, b = hf_engine.generate(prompts, params), native.generate(prompts, params)
        _same(a, b)
        assert {x.finish_reason for x in b} >= {"length"}
        for x, p in zip(b, params):
            assert 1 <= len(x.token_ids) <= p.max_new_tokens


def test_eos_and_stop_end_rows(world1, tiny):
    hf_engine, native, model = _pair(tiny, "llama", True)
    prompts = _prompts(n_groups=2, k=4, seed=5)
    # Make EOS likely: the engines must stop each row right after it, in the same place.
    with torch.no_grad():
        model.embedding.word_embeddings.weight[EOS].mul_(4.0)
        hf_engine.model.get_input_embeddings().weight[EOS].mul_(4.0)
    params = SamplingParams(temperature=1.5, max_new_tokens=20, seed=11)
    a, b = hf_engine.generate(prompts, params), native.generate(prompts, params)
    _same(a, b)
    assert any(x.finish_reason == "eos" and x.token_ids[-1] == EOS for x in b)


def test_stops_on_the_generation_configs_eos_ids_too(world1, tiny):
    """Qwen chat models list a second end-of-sequence id in generation_config.json only: HFEngine
    reads it from the transformers model, NativeEngine (a Megatron model has none) from the
    generation_config it is given, so both stop on it in the same place."""
    from transformers import GenerationConfig

    hf_engine, _, model = _pair(tiny, "llama", True)
    other = 13  # a second end-of-sequence id, made likely
    hf_engine.model.generation_config.eos_token_id = [EOS, other]
    with torch.no_grad():
        model.embedding.word_embeddings.weight[other].mul_(4.0)
        hf_engine.model.get_input_embeddings().weight[other].mul_(4.0)
    tok = CharTokenizer()
    hf_engine = HFEngine(hf_engine.model, tok)  # reads the generation config when built
    without = NativeEngine(model, hf_engine.model.config, tok)
    native = NativeEngine(model, hf_engine.model.config, tok, generation_config=GenerationConfig(eos_token_id=[EOS, other]))
    # no generation config given: config.json's id (LlamaConfig's default 2), as a transformers model
    assert without.eos_token_ids == {EOS, hf_engine.model.config.eos_token_id} == {EOS, 2}
    assert native.eos_token_ids == hf_engine.eos_token_ids == {EOS, other}
    # a folder without generation_config.json: config.json's ids, as a transformers model takes them
    import copy

    listed = copy.deepcopy(hf_engine.model.config)
    listed.eos_token_id = [EOS, other]
    assert NativeEngine(model, listed, tok).eos_token_ids == {EOS, other}
    prompts = _prompts(n_groups=2, k=4, seed=5)
    params = SamplingParams(temperature=1.5, max_new_tokens=20, seed=11)
    a, b = hf_engine.generate(prompts, params), native.generate(prompts, params)
    _same(a, b)
    assert any(x.finish_reason == "eos" and x.token_ids[-1] == other for x in b)


def test_sees_trainer_updates_without_sync(world1, tiny):
    _, native, model = _pair(tiny, "qwen3", False)
    prompts = _prompts(n_groups=1, k=1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = native.generate(prompts, greedy)[0]
    with torch.no_grad():  # what an optimizer step does: change the tensors in place
        model.output_layer.weight.add_(torch.randn_like(model.output_layer.weight))
    after = native.generate(prompts, greedy)[0]
    assert after.logprobs != before.logprobs
    with pytest.raises(RuntimeError, match="shares the trainer's weights"):
        native.load_weights([("x", torch.zeros(1))])


def test_bad_requests_are_clear_errors(world1, tiny):
    _, native, _ = _pair(tiny, "llama", True)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        native.generate([[5, 6], []], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        native.generate([[5, 999]], SamplingParams())
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        native.generate([[5], [6]], [SamplingParams()])
    fake = SimpleNamespace(config=SimpleNamespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=1),
                           decoder=object())
    with pytest.raises(ValueError, match="tp=2 pp=1; use rollout.engine=hf"):
        NativeEngine(fake, tiny.tiny_config("llama", True), CharTokenizer())


def test_prefix_store_reuses_the_previous_turn_and_gives_the_same_result(world1, tiny):
    """A second turn (the previous context + new tokens) prefills only the new tokens and
    generates exactly what an engine without the store generates; stale entries are dropped."""
    hf_engine, cached, model = _pair(tiny, "qwen3", False)
    plain = NativeEngine(model, hf_engine.model.config, CharTokenizer(), prefix_cache=False)
    prompts = _prompts(n_groups=2, k=3, seed=8)
    params = SamplingParams(temperature=2.0, max_new_tokens=5, seed=3)
    first = cached.generate(prompts, params)
    _same(first, plain.generate(prompts, params))
    assert cached.reused_tokens == 0
    # turn 2: each context plus an "information block"; one prompt with no history at all
    extra = [[7, 8, 9], [10, 11], [12], [13, 14, 15, 16], [17], [18, 19]]
    second = [p + g.token_ids + e for p, g, e in zip(prompts, first, extra)] + [[20, 21, 22]]
    params2 = SamplingParams(temperature=2.0, max_new_tokens=6, seed=4)
    a, b = cached.generate(second, params2), plain.generate(second, params2)
    _same(a, b)
    expected = sum(len(p) + len(g.token_ids) - 1 for p, g in zip(prompts, first))
    assert cached.reused_tokens == expected
    _same(a, hf_engine.generate(second, params2))  # and the ground truth agrees
    # a weight update in place (an optimizer step) makes the stored keys/values stale: a weight
    # the keys/values come from, so that reusing them would also change the tokens and log-probs
    third = [p + g.token_ids + [5] for p, g in zip(second, a)]
    with torch.no_grad():
        model.decoder.layers[0].self_attention.linear_qkv.weight.mul_(1.5)
    before = cached.reused_tokens
    _same(cached.generate(third, params2), plain.generate(third, params2))
    assert cached.reused_tokens == before
    cached.sleep()  # the trainer's phase: nothing kept
    assert cached._store == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernels: on a GPU the model and the engine are on CUDA")
def test_skinny_cpu_gemm_is_used_and_agrees_with_torch_matmul(world1, tiny):
    """Decode steps of 5+ rows go through engines/cpu_gemm (where it builds), attention through its
    one-call decode attention (Qwen3: with QK-norm); an engine with fast_gemm=False (PyTorch ops)
    chooses the same tokens with log-probs within 1e-5."""
    from megatron_recycle.engines import cpu_gemm

    hf_engine, fast, model = _pair(tiny, "qwen3", False)
    slow = NativeEngine(model, hf_engine.model.config, CharTokenizer(), fast_gemm=False)
    prompts = _prompts(n_groups=3, k=3, seed=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=2)
    before, att_before = cpu_gemm.calls, cpu_gemm.attention_calls
    a = slow.generate(prompts, params)
    assert (cpu_gemm.calls, cpu_gemm.attention_calls) == (before, att_before)
    b = fast.generate(prompts, params)
    if cpu_gemm.available():  # the skinny GEMM and the one-call decode attention both ran
        assert cpu_gemm.calls > before and cpu_gemm.attention_calls > att_before
    _same(a, b, atol=1e-5)


def test_prefix_store_is_not_reused_across_a_real_optimizer_step(world1, tiny):
    """Megatron's optimizers write the new weights through ``.data`` (and DDP's parameters are views
    of its buffer): no version counter moves. The engine watches the optimizer's steps instead, as
    setup_runtime arranges; without that it reused keys/values of the old weights."""
    from megatron_recycle.train.batch import build_batch
    from megatron_recycle.train.optim import torch_optimizers, wrap_model_and_build_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, grpo_train_step

    hf = tiny.tiny_hf_model("qwen3", False)
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(8.0)
    chunks = build_model_chunks(hf.config, layer_spec="local")
    load_hf_weights(chunks, hf)
    chunks, opt, sched = wrap_model_and_build_optimizer(chunks, lr=1e-2, total_steps=10, lr_decay_style="constant")
    model = chunks[0].module
    cached = NativeEngine(model, hf.config, CharTokenizer())
    cached.watch_optimizers(torch_optimizers(opt))
    plain = NativeEngine(model, hf.config, CharTokenizer(), prefix_cache=False)
    prompts = _prompts(n_groups=2, k=2, seed=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    first = cached.generate(prompts, params)
    versions = sum(p._version for p in model.parameters())
    seqs = [p + g.token_ids for p, g in zip(prompts, first)]
    batch = build_batch(seqs, [[0] * len(p) + [1] * len(g.token_ids) for p, g in zip(prompts, first)],
                        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), group_ids=[0, 0, 1, 1])
    grpo_train_step(chunks, opt, sched, batch, 4, GRPOLossConfig())
    grpo_train_step(chunks, opt, sched, batch, 4, GRPOLossConfig())
    assert sum(p._version for p in model.parameters()) == versions  # the counters did not see the step
    second = [s + [7, 8] for s in seqs]
    before = cached.reused_tokens
    _same(cached.generate(second, params), plain.generate(second, params))
    assert cached.reused_tokens == before  # nothing reused across the step
