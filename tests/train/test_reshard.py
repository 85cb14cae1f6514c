"""Resuming on another parallel layout (train/reshard.py): a chain of layouts, each loading the
previous one's saved model-space records, must hold the first layout's weights, fp32 main weights,
Adam moments and step count bit for bit, and take the same next step as the first layout does (to
the bf16 arithmetic's layout noise; exactly, back on the first layout), which a copy with fresh
optimizer moments does not.

The chain: one process (bf16, plain optimizer, two Adam steps) -> two processes: TP 2 with the
distributed optimizer -> DP 2 (distributed: each rank owns half of every shard's state) -> PP 2
with VPP 2 -> TP 2 with the plain optimizer -> one process again. And in fp32 with an untied
output layer: one process -> TP 2 -> DP 2 (both with the distributed optimizer) -> DP 2 with
overlapped gradient reduction in small buckets (other shards) -> one process.
"""

from __future__ import annotations

import pytest
import torch

from tests.train import _dist, _workers

pytestmark = pytest.mark.distributed

TWO_PROCESS = [
    ["tp2_distopt", {"tp": 2, "dist_opt": True, "load_from": "single"}],
    ["dp2_distopt", {"dist_opt": True, "load_from": "tp2_distopt"}],
    ["pp2_vpp2_distopt", {"pp": 2, "vpp": 2, "dist_opt": True, "load_from": "dp2_distopt"}],
    ["tp2_plain", {"tp": 2, "dist_opt": False, "load_from": "pp2_vpp2_distopt"}],
    # fp32 and an untied output layer: Megatron's FP32Optimizer, and distributed optimizers whose
    # main weights are the model's
    ["fp32_tp2_distopt", {"bf16": False, "tie": False, "tp": 2, "dist_opt": True, "load_from": "fp32_single"}],
    ["fp32_dp2_distopt", {"bf16": False, "tie": False, "dist_opt": True, "load_from": "fp32_tp2_distopt"}],
    # the same DP 2 with overlapped gradient reduction: the distributed optimizer shards each of the
    # ~3,000-parameter buckets instead of one buffer, so each rank holds other slices of the state
    ["fp32_dp2_distopt_buckets", {"bf16": False, "tie": False, "dist_opt": True, "bucket": 3000,
                                  "load_from": "fp32_dp2_distopt"}],
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reshard")

    def job(name, args):
        return [name, "reshard_stage", {"bf16": True, **args, "name": name, "dir": str(folder)}]

    first = _dist.run_workers("run_jobs", 1, {"jobs": [
        job("single", {"dist_opt": False}), job("fp32_single", {"bf16": False, "tie": False, "dist_opt": False})]})[0]
    two = _dist.run_workers("run_jobs", 2, {"jobs": [job(n, a) for n, a in TWO_PROCESS]})[0]
    last = _dist.run_workers("run_jobs", 1, {"jobs": [
        job("single_again", {"dist_opt": False, "load_from": "tp2_plain"}),
        job("fp32_single_again", {"bf16": False, "tie": False, "dist_opt": False,
                                  "load_from": "fp32_dp2_distopt_buckets"})]})[0]
    return {"folder": folder, **first, **two, **last}


STAGES = [name for name, _ in TWO_PROCESS] + ["single_again", "fp32_single_again"]


def _first(stage: str) -> str:
    return "fp32_single" if stage.startswith("fp32") else "single"


def _update(after: dict, before: dict) -> torch.Tensor:
    """One optimizer step's change of the fp32 main weights, all tensors flattened in name order."""
    assert sorted(after) == sorted(before)
    return torch.cat([(after[k].double() - before[k].double()).reshape(-1) for k in sorted(after)])


@pytest.mark.parametrize("stage", STAGES)
def test_a_resharded_load_holds_the_saved_state_bit_for_bit(chain, stage):
    ref, got = chain[_first(stage)]["saved"], chain[stage]["saved"]
    assert sorted(ref) == sorted(got) == ["exp_avg", "exp_avg_sq", "main", "scalars", "weight"]
    bf16 = not stage.startswith("fp32")
    assert ref["weight"]["model.embed_tokens.weight"].dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert ref["main"]["model.embed_tokens.weight"].dtype == torch.float32
    # embeddings, final norm, 9 tensors per layer, and lm_head where it is not tied (the fp32 chain)
    assert len(ref["weight"]) == 2 + 9 * 4 + (0 if bf16 else 1)
    for kind in ref:
        assert sorted(ref[kind]) == sorted(got[kind]), kind
        for name, t in ref[kind].items():
            assert torch.equal(t, got[kind][name]), (stage, kind, name)
    assert float(ref["scalars"]["step"]) == 2.0
    assert chain[stage]["counts"]["params"] > 0 and chain[stage]["counts"]["optimizer_shards"] > 0


@pytest.mark.parametrize("stage", STAGES)
def test_the_next_step_after_a_resharded_load_is_the_saved_layouts(chain, stage):
    """The step after the load, from the same state on another layout, against the step the first
    layout took: the relative difference of the two weight updates. bf16 arithmetic makes it
    layout-dependent (measured: DP 2 3e-7, PP 2 1e-4, TP 2 2e-2: Adam turns the bf16 noise of
    near-zero gradients into full-size updates of those few elements); in fp32 only the reduction
    order differs; back on the first layout it is exactly 0. Fresh moments instead of the carried ones give a relative difference above 1."""
    first = chain[_first(stage)]
    saved = first["saved"]["main"]
    ref = _update(first["next"]["main"], saved)
    same = ((_update(chain[stage]["next"]["main"], saved) - ref).norm() / ref.norm()).item()
    fresh = ((_update(chain[stage]["control"]["main"], saved) - ref).norm() / ref.norm()).item()
    assert ref.abs().max() > 1e-3  # the step changes the weights
    if stage.endswith("single_again"):  # the first stage's layout: the same arithmetic, the same step
        assert same == 0.0
        assert chain[stage]["metrics"]["loss"] == first["metrics"]["loss"]
    assert same <= (1e-4 if stage.startswith("fp32") else 0.05), (stage, same)  # fp32: reduction order only
    assert fresh >= 0.5, (stage, fresh)
    assert chain[stage]["metrics"]["loss"] == pytest.approx(first["metrics"]["loss"], rel=1e-2)
    assert float(chain[stage]["next"]["scalars"]["step"]) == 3.0


@pytest.mark.parametrize("stage", ["single", "fp32_single", *STAGES])
def test_the_records_add_only_names_and_numbers_to_a_checkpoint(chain, stage):
    """They reference the tensors the rank file holds anyway (torch.save stores a storage once)."""
    size = chain[stage]["bytes"]
    weights = sum(t.numel() * t.element_size() for t in chain[_first(stage)]["saved"]["weight"].values())
    assert size["without"] > weights  # the rank file itself holds tensors
    assert 0 < size["with"] - size["without"] < 64 * 1024, size


def test_overlap_buckets_give_other_shards_and_reshard_exactly(chain):
    """Same world, same DP 2 and distributed optimizer; only the gradient buckets differ, and with
    them the slices each rank's optimizer holds: the reason optim.overlap_grad_reduce and
    optim.ddp_bucket_size are layout keys (checkpoint.CONDITIONAL_KEYS) when the distributed
    optimizer is on."""
    one, many = chain["fp32_dp2_distopt"], chain["fp32_dp2_distopt_buckets"]
    assert one["world"] == many["world"] == 2
    assert one["shard_shapes"] != many["shard_shapes"]


def test_missing_or_old_records_are_refused(chain):
    from megatron_recycle.train.checkpoint import CheckpointError
    from megatron_recycle.train.reshard import SavedModelSpace

    cfg, _ = _workers.tiny_llama()
    rank0 = torch.load(chain["folder"] / "dp2_distopt_rank0.pt", map_location="cpu", weights_only=True)["model_space"]
    # the distributed optimizer's rank 0 owns only part of each shard's state: rank 1's file is needed
    saved = SavedModelSpace([rank0], cfg)
    saved.getter("weight")("model.layers.0.mlp.down_proj.weight")  # the weights are whole on each rank
    with pytest.raises(CheckpointError, match="do not cover its .* elements exactly once"):
        saved.getter("exp_avg")("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(CheckpointError, match="no rank of the checkpoint holds TP shard 1 of 2"):
        tp_rank0 = torch.load(chain["folder"] / "tp2_plain_rank0.pt", map_location="cpu", weights_only=True)["model_space"]
        SavedModelSpace([tp_rank0], cfg).getter("weight")("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(CheckpointError, match="no model-space records"):
        SavedModelSpace([rank0, None], cfg)


def test_a_fused_adams_per_group_step_count_is_carried_over():
    """apex's and transformer-engine's fused Adams keep the step count in each param group (an
    int), not in the per-parameter state: the records must carry it, and the load must put it back
    in the group. Else the resumed Adam starts its bias correction over (its next step is step 1,
    not 3): other step sizes than the saved run would have taken."""
    (out,) = _dist.run_workers("run_jobs", 1, {"jobs": [["fused", "fused_adam_step_reshard", {}],
                                                       ["capturable", "fused_adam_step_reshard", {"tensor_step": True}]]})
    for name, kind in (("fused", "int"), ("capturable", "Tensor")):  # a capturable one counts in a tensor
        got = out[name]
        assert got["saved_scalars"] == {"step": 2.0}
        assert got["group_steps"] == [2.0] and got["step_types"] == [kind]
        assert got["per_param_steps"] == 0  # kept where the fused optimizer reads it, not beside it
        assert got["moments_carried"]


def _one_norm_record(start: int, end: int, value: float) -> dict:
    """A rank's model-space records holding elements [start, end) of an 8-element final norm's state."""
    from megatron_recycle.train.reshard import RESHARD_FORMAT

    return {"format": RESHARD_FORMAT, "tp": 1, "tp_rank": 0, "params": {"decoder.final_layernorm.weight": {
        "weight": torch.zeros(8), "start": start, "end": end, "main": torch.full((end - start,), value), "state": {}}}}


def test_overlapping_or_repeated_dp_ranges_are_refused():
    """The distributed optimizer's DP ranges must cover a shard exactly once: two runs' rank files
    mixed (a rank listed twice) or ranges that overlap would otherwise load whichever came last."""
    from types import SimpleNamespace

    from megatron_recycle.train.checkpoint import CheckpointError
    from megatron_recycle.train.reshard import SavedModelSpace

    cfg = SimpleNamespace(tie_word_embeddings=True)
    halves = [_one_norm_record(0, 4, 1.0), _one_norm_record(4, 8, 2.0)]
    assert SavedModelSpace(halves, cfg).getter("main")("model.norm.weight").tolist() == [1.0] * 4 + [2.0] * 4
    for records in ([*halves, _one_norm_record(4, 8, 3.0)], [_one_norm_record(0, 6, 1.0), halves[1]]):
        with pytest.raises(CheckpointError, match="do not cover its 8 elements exactly once"):
            SavedModelSpace(records, cfg).getter("main")("model.norm.weight")


def test_cuda_rng_states_of_another_machine_shape_are_dropped():
    from megatron_recycle.train.checkpoint import capture_rng_state, restore_rng_state
    from megatron_recycle.train.reshard import rng_state_for_new_layout

    cuda = [torch.zeros(8, dtype=torch.uint8)] * 8  # saved by a process that saw 8 GPUs
    own = torch.ones(8, dtype=torch.uint8)
    state = {"python": (3, tuple(range(625)), None), "cuda": cuda, "cuda_current": own}
    assert rng_state_for_new_layout(state, 8)["cuda"] is cuda
    for devices in (4, 0, 16):  # fewer devices than the saving process saw, or more
        kept = rng_state_for_new_layout(state, devices)
        assert "cuda" not in kept and "cuda_current" not in kept and kept["python"] == state["python"]
    assert "cuda" in state and "cuda_current" in state  # the checkpoint's own dict is left as it was
    if torch.cuda.is_available() and torch.cuda.device_count() != 8:
        old = {k: v for k, v in capture_rng_state().items() if k != "cuda_current"}  # a checkpoint of before
        with pytest.raises(ValueError, match="CUDA device states"):  # what the resharded resume avoids
            restore_rng_state({**old, "cuda": cuda})


def test_a_resume_that_sees_other_devices_restores_its_own_device_generator():
    """Saved by a process that saw 8 GPUs, resumed by the same layout with one GPU per process
    (CUDA_VISIBLE_DEVICES): the saving process's own device's generator is restored, since that is
    the one its kernels drew from; all of them with as many devices; a checkpoint without it refused."""
    from megatron_recycle.train.checkpoint import cuda_states_to_restore

    cuda = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]
    own = cuda[3]
    assert cuda_states_to_restore({"cuda": cuda, "cuda_current": own}, 8) == ("all", cuda)
    for devices in (1, 2):
        how, states = cuda_states_to_restore({"cuda": cuda, "cuda_current": own}, devices)
        assert how == "current" and states is own
    with pytest.raises(ValueError, match="8 CUDA device states but 1 devices are visible, and not the saving process"):
        cuda_states_to_restore({"cuda": cuda}, 1)
