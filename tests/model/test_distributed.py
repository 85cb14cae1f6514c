"""TP=2, PP=2 and PP=2 x VPP=2 sharded loading and export on 2 gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORKERS = str(Path(__file__).with_name("_workers.py"))

LAYOUTS = [
    dict(name="tp2_qwen2", tp=2, pp=1, kind="qwen2", tied=False, save="ckpt_tp2"),
    dict(name="tp2_llama_tied", tp=2, pp=1, kind="llama", tied=True),
    dict(name="pp2_qwen3_tied", tp=1, pp=2, kind="qwen3", tied=True, save="ckpt_pp2"),
    dict(name="pp2_vpp2_qwen3", tp=1, pp=2, vpp=2, kind="qwen3", tied=False, layers=4),
    dict(name="tp2_bf16_qwen3", tp=2, pp=1, kind="qwen3", tied=True, bf16=True),
    dict(name="pp2_bf16_qwen2", tp=1, pp=2, kind="qwen2", tied=False, bf16=True),
]


@pytest.fixture(scope="module")
def results(dist_launcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return out, dist_launcher.run_workers(f"{WORKERS}:sharded_roundtrip", 2, out, layouts=LAYOUTS)


@pytest.mark.distributed
def test_export_is_bit_identical_on_every_rank(results):
    _, per_rank = results
    for rank, res in enumerate(per_rank):
        for lay in LAYOUTS:
            r = res[lay["name"]]
            assert r["mismatched"] == [] and r["extra"] == [], (rank, lay["name"], r)
            assert r["n_exported"] == r["n_ref"] > 0


@pytest.mark.distributed
def test_tp2_shards_are_halves_and_logits_match(results):
    _, per_rank = results
    for res in per_rank:
        r = res["tp2_qwen2"]
        # 2 query groups x (2 q heads + k + v) x head 16 = 128 rows in full, 64 per TP rank.
        assert r["shapes"]["decoder.layers.0.self_attention.linear_qkv.weight"] == [64, 64]
        assert r["shapes"]["decoder.layers.0.self_attention.linear_qkv.bias"] == [64]
        assert r["shapes"]["decoder.layers.0.mlp.linear_fc1.weight"] == [96, 64]  # 2 x 96 / 2
        assert r["shapes"]["decoder.layers.0.self_attention.linear_proj.weight"] == [64, 32]
        assert r["shapes"]["embedding.word_embeddings.weight"] == [64, 64]  # vocab 128 / 2
        assert r["logit_err"] is not None and r["logit_err"] < 1e-5
        assert res["tp2_llama_tied"]["logit_err"] < 1e-5


@pytest.mark.distributed
def test_bf16_shards_gather_over_gloo(results):
    """bf16 (Float16Module) parameters: the export is the bf16 cast of the HF weights exactly."""
    _, per_rank = results
    for res in per_rank:
        assert res["tp2_bf16_qwen3"]["logit_err"] < 5e-2
        assert res["pp2_bf16_qwen2"]["mismatched"] == [] and res["pp2_bf16_qwen2"]["n_exported"] > 0


@pytest.mark.distributed
def test_pp2_stages_own_their_layers_and_logits_match(results):
    _, per_rank = results
    assert [res["pp2_qwen3_tied"]["local_layers"] for res in per_rank] == [[[0]], [[1]]]
    # Tied embeddings: the last stage holds its own copy of the output layer, loaded from the embedding.
    assert "output_layer.weight" in per_rank[1]["pp2_qwen3_tied"]["shapes"]
    assert "embedding.word_embeddings.weight" not in per_rank[1]["pp2_qwen3_tied"]["shapes"]
    for res in per_rank:
        assert res["pp2_qwen3_tied"]["logit_err"] < 1e-5
    # Interleaved: rank 0 holds layers 0 and 2, rank 1 holds 1 and 3 (one per virtual stage).
    assert [res["pp2_vpp2_qwen3"]["local_layers"] for res in per_rank] == [[[0], [2]], [[1], [3]]]


@pytest.mark.distributed
@pytest.mark.parametrize("ckpt,kind,tied", [("ckpt_tp2", "qwen2", False), ("ckpt_pp2", "qwen3", True)])
def test_sharded_save_loads_in_transformers(results, tiny, ckpt, kind, tied):
    import transformers

    out, _ = results
    back = transformers.AutoModelForCausalLM.from_pretrained(out / ckpt, local_files_only=True)
    ref = tiny.tiny_hf_model(kind, tied)
    for name, t in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


@pytest.mark.distributed
@pytest.mark.parametrize("group", ["default", "dp"])
def test_collective_timeout_applies_to_every_group(dist_launcher, tmp_path, group):
    """run.collective_timeout_min reaches torch's default group and megatron's groups: with 2 s, a
    rank whose peer is 6 s late fails after about 2 s instead of waiting (torch's NCCL default would
    be 10 minutes, megatron's groups 30)."""
    res = dist_launcher.run_workers(f"{WORKERS}:collective_timeout", 2, tmp_path, timeout_s=2.0, late_s=6.0,
                                    group=group)
    waiting = res[1]
    assert waiting["error"] is not None and "timed out" in waiting["error"].lower(), waiting
    assert waiting["waited_s"] < 5.0, waiting  # gave up before the late rank arrived


@pytest.mark.distributed
def test_default_collective_timeout_waits_for_a_late_rank(dist_launcher, tmp_path):
    res = dist_launcher.run_workers(f"{WORKERS}:collective_timeout", 2, tmp_path, timeout_s=None, late_s=3.0,
                                    group="dp")
    assert [r["error"] for r in res] == [None, None] and [r["value"] for r in res] == [2.0, 2.0]
    assert res[1]["waited_s"] > 2.0


@pytest.mark.distributed
def test_a_restart_on_one_node_is_seen_by_every_rank(dist_launcher, tmp_path):
    """After a worker fails, torchrun restarts every node's workers but only the failing node counts
    a restart (TORCHELASTIC_RESTART_COUNT): the resume decision takes the maximum over the world."""
    res = dist_launcher.run_workers(f"{WORKERS}:restart_counts", 2, tmp_path, counts=[None, "1"])
    assert [r["local"] for r in res] == [0, 1] and [r["anywhere"] for r in res] == [True, True]
    res = dist_launcher.run_workers(f"{WORKERS}:restart_counts", 2, tmp_path, counts=["0", "not-a-number"])
    assert [r["local"] for r in res] == [0, 0] and [r["anywhere"] for r in res] == [False, False]
