"""convert.write_hf_folder: the Hugging Face folder every export writes (--save-hf, SFT, final_hf,
`megatron-recycle export`) replaces the old one whole or not at all."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from megatron_recycle.model.convert import write_hf_folder

CFG = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)


def _tensors(n: int, value: float):
    for i in range(n):
        yield f"t{i}", torch.full((64,), value)


def _read(folder) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_new_export_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "hf"
    assert write_hf_folder(_tensors(6, 1.0), CFG, out, max_shard_bytes=256) == 6
    assert len(list(out.glob("*.safetensors"))) == 6  # one 256-byte tensor per file
    write_hf_folder(_tensors(2, 2.0), CFG, out, max_shard_bytes=10_000)
    # no stale shard of the larger old export is left beside the new one
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001.safetensors"]
    got = _read(out)
    assert sorted(got) == ["t0", "t1"] and all(bool((v == 2.0).all()) for v in got.values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"t0": "model-00001.safetensors", "t1": "model-00001.safetensors"}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or old folder left
    # readable as the umask allows, like the config and tokenizer files (safetensors makes them 0600)
    assert (out / "model-00001.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_a_failed_export_leaves_the_old_folder(tmp_path):
    out = tmp_path / "hf"
    write_hf_folder(_tensors(2, 1.0), CFG, out)

    def broken():
        yield "t0", torch.zeros(4)
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError, match="rank 1 died"):
        write_hf_folder(broken(), CFG, out)
    got = _read(out)
    assert sorted(got) == ["t0", "t1"] and all(bool((v == 1.0).all()) for v in got.values())
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_folder_that_is_not_a_model_is_not_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    consumed = []

    def stream():
        for name, t in _tensors(3, 1.0):
            consumed.append(name)
            yield name, t

    with pytest.raises(FileExistsError, match="not a model folder"):
        write_hf_folder(stream(), CFG, tmp_path)
    assert consumed == ["t0", "t1", "t2"]  # consumed all the same (a collective export must not stall)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert write_hf_folder(_tensors(1, 1.0), CFG, tmp_path / "empty_is_fine") == 1


def test_the_generation_config_goes_with_the_export_and_is_read_back(tmp_path):
    """The source model's stop ids (generation_config.json) travel into every export, where the
    engines that evaluate or continue from it read them (hf_loading.load_generation_config)."""
    from transformers import GenerationConfig

    from megatron_recycle.model.hf_loading import load_generation_config

    out = tmp_path / "hf"
    write_hf_folder(_tensors(1, 1.0), CFG, out)
    assert not (out / "generation_config.json").exists() and load_generation_config(out) is None
    write_hf_folder(_tensors(1, 1.0), CFG, out, generation_config=GenerationConfig(eos_token_id=[2, 7]))
    assert load_generation_config(out).eos_token_id == [2, 7]


def test_a_failure_after_the_tensors_leaves_no_hidden_copy(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    out = tmp_path / "hf"
    write_hf_folder(_tensors(2, 1.0), CFG, out)
    with pytest.raises(OSError, match="No space left"):
        write_hf_folder(_tensors(2, 2.0), CFG, out, tokenizer=BrokenTokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the full weights copy is gone
    assert all(bool((v == 1.0).all()) for v in _read(out).values())


def test_a_kill_between_the_renames_is_recovered_by_the_next_write(tmp_path):
    out = tmp_path / "hf"
    write_hf_folder(_tensors(2, 1.0), CFG, out)
    # what a kill between `final -> .old` and `.tmp -> final` leaves: no hf, its old copy, debris
    out.rename(tmp_path / ".hf.old-1234abcd")
    (tmp_path / ".hf.tmp-5678ef01").mkdir()
    (tmp_path / ".hf.tmp-5678ef01" / "model-00001.safetensors").write_bytes(b"partial")
    from megatron_recycle.model.convert import _recover_hf_folder

    _recover_hf_folder(out)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert all(bool((v == 1.0).all()) for v in _read(out).values())


def test_config_json_names_the_dtype_the_weights_are_in(tmp_path):
    # a bf16 source trained (and exported) in fp32: an "auto" loader must not round it to bf16
    bf16_source = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, dtype="bfloat16")
    write_hf_folder(_tensors(1, 1.0), bf16_source, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert bf16_source.dtype == torch.bfloat16  # the caller's config is left as it was

    def bf16_tensors():
        yield "t0", torch.ones(4, dtype=torch.bfloat16)

    write_hf_folder(bf16_tensors(), bf16_source, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_sharded_folder_is_read_through_its_index(tmp_path):
    from safetensors.torch import save_file

    from megatron_recycle.model.convert import _safetensors_getter

    out = tmp_path / "hf"
    write_hf_folder(_tensors(3, 1.0), CFG, out, max_shard_bytes=256)
    # a stray shard of some earlier save that holds a tensor of the same name: the index decides
    save_file({"t0": torch.full((64,), 9.0)}, str(out / "zz-stale.safetensors"))
    get = _safetensors_getter(out)
    assert sorted(get.keys()) == ["t0", "t1", "t2"]
    assert bool((get("t0") == 1.0).all())
    # an index that names a shard that is not there is an error, not a KeyError at some later tensor
    (out / "model-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002.safetensors"):
        _safetensors_getter(out)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable safetensors index"):
        _safetensors_getter(out)


def test_two_unindexed_files_with_the_same_tensor_are_refused(tmp_path):
    from safetensors.torch import save_file

    from megatron_recycle.model.convert import _safetensors_getter

    save_file({"w": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(4), "v": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="'w' is in both a.safetensors and b.safetensors"):
        _safetensors_getter(tmp_path)
    (tmp_path / "a.safetensors").unlink()
    assert sorted(_safetensors_getter(tmp_path).keys()) == ["v", "w"]


def test_recovery_finds_the_copies_of_a_folder_whose_name_holds_glob_characters(tmp_path):
    """A kill between write_hf_folder's two renames leaves .NAME.old-* and .NAME.tmp-*: recovery
    matched them with a glob built from NAME, so "ckpt[1]" found nothing (and "*" found others')."""
    from megatron_recycle.model.convert import _recover_hf_folder

    final = tmp_path / "ckpt[1]"
    old = tmp_path / ".ckpt[1].old-1234abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / ".ckpt[1].tmp-5678ef01").mkdir()
    other = tmp_path / ".ckpt1.old-00000000"  # another folder's copy, which "ckpt[1]" as a glob matches
    other.mkdir()
    (other / "config.json").write_text("{}")
    _recover_hf_folder(final)
    assert (final / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt1.old-00000000", "ckpt[1]"]
