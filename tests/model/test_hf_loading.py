"""Offline HF loading: the packaged SmolLM2 GGUF, the fp32 cache, local folders, clear errors."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from megatron_recycle.model import hf_loading
from megatron_recycle.model.hf_loading import (
    load_hf_config,
    load_hf_model,
    resolve_model_folder,
    smollm2_gguf_path,
)


@pytest.mark.real_model
def test_smollm2_gguf_is_found():
    path = smollm2_gguf_path()
    assert path.endswith(".gguf") and os.path.getsize(path) > 50_000_000


def test_local_folder_roundtrip(tiny, tmp_path):
    hf = tiny.tiny_hf_model("qwen3", False)
    hf.save_pretrained(tmp_path / "m")
    back = load_hf_model(tmp_path / "m")
    assert not back.training
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert load_hf_config(tmp_path / "m").model_type == "qwen3"
    assert load_hf_model(tmp_path / "m", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model_folder("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_folder(tmp_path / "missing.gguf")


def test_gguf_cache_is_keyed_by_content(tiny, tmp_path, monkeypatch):
    """The GGUF is converted once per (contents, transformers version): the same file installed
    at another path (another venv, a fresh clone) or touched reuses the entry; new bytes of the
    same size, or another transformers, get a new one."""
    calls = []

    def fake_convert(gguf_path, folder):
        calls.append(gguf_path)
        tiny.tiny_hf_model("llama", True).save_pretrained(folder)

    monkeypatch.setattr(hf_loading, "_convert_gguf_to_cache", fake_convert)
    cache = tmp_path / "cache"
    gguf = tmp_path / "a" / "toy.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-not-really")
    first = resolve_model_folder(gguf, cache_dir=cache)
    second = resolve_model_folder(gguf, cache_dir=cache)
    assert first == second and len(calls) == 1
    assert load_hf_model(gguf, cache_dir=cache).config.model_type == "llama"

    other_install = tmp_path / "b" / "toy.gguf"
    other_install.parent.mkdir()
    other_install.write_bytes(gguf.read_bytes())
    os.utime(other_install, (1_000_000, 1_000_000))
    assert resolve_model_folder(other_install, cache_dir=cache) == first and len(calls) == 1

    gguf.write_bytes(b"GGUF-not-reall!")  # same size, new bytes: a new entry
    third = resolve_model_folder(gguf, cache_dir=cache)
    assert third != first and len(calls) == 2
    monkeypatch.setattr(hf_loading, "_transformers_version", lambda: "0.0.0-other")
    assert resolve_model_folder(gguf, cache_dir=cache) not in (first, third) and len(calls) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted({first.name, third.name,
                                                            resolve_model_folder(gguf, cache_dir=cache).name})


@pytest.mark.real_model
def test_smollm2_cache_is_plain_fp32():
    """The cached GGUF conversion (made on first use, ~25-45 s, shared with test_parity's
    real-model test through the default cache): plain fp32 safetensors, no quantizer left."""
    folder = resolve_model_folder("smollm2-135m")
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    source = json.loads((folder / "source.json").read_text())
    with open(smollm2_gguf_path(), "rb") as f:
        assert source["sha1"] == hashlib.sha1(f.read()).hexdigest()
    model = load_hf_model("smollm2-135m")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert hf_loading.load_tokenizer("smollm2-135m")("Paris").input_ids


def test_model_digest_follows_the_weights_not_the_path(tmp_path):
    """Evaluation results are reused by model digest: a folder written again with the same bytes
    keeps it (the final export of a resumed, finished run), other weights, tokenizer or stop ids
    under the same path change it (final_hf after more training)."""
    import time

    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    first = hf_loading.model_digest(folder)
    assert first is not None and len(first) == 40
    time.sleep(0.01)
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(folder / "model.safetensors"))  # same bytes, new mtime
    (folder / "README.md").write_text("notes")  # says nothing about what the model generates
    assert hf_loading.model_digest(folder) == first
    # the tokenizer (chat template) and the stop ids change what it generates: another digest
    (folder / "tokenizer.json").write_text('{"other": 1}')
    assert hf_loading.model_digest(folder) != first
    (folder / "tokenizer.json").write_text("{}")
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert hf_loading.model_digest(folder) != first
    (folder / "generation_config.json").unlink()
    assert hf_loading.model_digest(folder) == first
    save_file({"w": torch.arange(6, dtype=torch.float32) + 1}, str(folder / "model.safetensors"))
    changed = hf_loading.model_digest(folder)
    assert changed != first
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    assert hf_loading.model_digest(folder) not in (first, changed)
    assert hf_loading.model_digest(tmp_path / "nowhere") is None


@pytest.mark.real_model
def test_model_digest_of_the_embedded_model_is_its_gguf_file():
    assert hf_loading.model_digest("smollm2-135m") == hf_loading.file_digest(hf_loading.smollm2_gguf_path())


def test_a_local_folder_named_like_the_alias_is_that_folder(tiny, tmp_path, monkeypatch):
    """A download of SmolLM2-135M-Instruct into ./SmolLM2-135M-Instruct was silently replaced by the
    packaged 4-bit GGUF (and its digest), since the alias was looked up before the filesystem."""
    monkeypatch.chdir(tmp_path)
    tiny.tiny_hf_model("llama", True).save_pretrained(tmp_path / "SmolLM2-135M-Instruct")
    monkeypatch.setattr(hf_loading, "smollm2_gguf_path", lambda: pytest.fail("the packaged model was used"))
    assert resolve_model_folder("SmolLM2-135M-Instruct") == hf_loading.Path("SmolLM2-135M-Instruct")
    assert load_hf_config("SmolLM2-135M-Instruct").num_hidden_layers == 2
    assert hf_loading.model_digest("SmolLM2-135M-Instruct") == hf_loading.model_digest(
        tmp_path / "SmolLM2-135M-Instruct")


def test_a_folder_missing_weights_is_refused_not_filled_at_random(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny.tiny_hf_model("qwen3", False).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    sd = load_file(weights)
    sd.pop("lm_head.weight")
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(hf_loading.IncompleteModelError, match=r"lack 1 tensor\(s\) .*lm_head.weight"):
        load_hf_model(tmp_path / "m")


def test_the_gguf_cache_entry_is_readable_by_others_sharing_the_cache(tiny, tmp_path, monkeypatch):
    """mkdtemp's 0700 folder and safetensors' 0600 files made the shared entry the creator's alone."""
    import transformers

    class Tok:
        def save_pretrained(self, folder):
            (hf_loading.Path(folder) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: tiny.tiny_hf_model("llama", True))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"GGUF-not-really")
    old = os.umask(0o022)
    try:
        folder = resolve_model_folder(gguf, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()} == {
        f.name: 0o644 for f in folder.iterdir()}
    assert (folder / "model.safetensors").is_file()


def test_a_folder_with_tensors_its_config_has_no_place_for_is_refused(tiny, tmp_path):
    """transformers drops unexpected tensors with a log line: a 3-layer folder under a 2-layer config
    ran as a truncated model in the hf engine, where the Megatron loader refused it."""
    import json as _json

    model = tiny.tiny_hf_model("llama", True, layers=3)
    model.save_pretrained(tmp_path / "m")
    cfg = _json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(_json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(hf_loading.IncompleteModelError, match=r"hold \d+ tensor\(s\) the config has no place for .*layers\.2\."):
        load_hf_model(tmp_path / "m")
