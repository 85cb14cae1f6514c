"""The Megatron GRPO/SFT training step: batch records, log-probs, gradients across TP/PP/DP layouts.

The distributed tests run the same seeded tiny Llama (tests/train/_workers.py: 4 layers, hidden
32, 4 heads / 2 KV heads, tied embeddings, vocab 96) on a seeded global batch of 8 ragged
sequences under several layouts. A single SGD step with lr 1 and no momentum turns the exported
(Hugging Face named, TP-gathered, PP-collected) weight change into the full gradient, so
gradients are compared directly. Tolerances (fp32 everywhere in the model):
  * gradients between layouts / micro-batch counts: max abs diff <= 1e-5 * max|grad|
    (measured: 3e-7 relative for PP/DP/micro-batching, 2e-6 with TP, which reorders sums);
  * gradient vs a float64 Hugging Face model + float64 reference loss: <= 1e-4 * max|grad|;
  * weights after three clipped Adam steps: max abs diff <= 2e-4 (each weight moved ~3e-2;
    Adam divides by sqrt(v), so near-zero gradients amplify fp32 noise; measured 7e-5 with TP);
  * compute_logprobs vs a float64 log_softmax of the model's own full-vocab logits: 5e-6.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megatron_recycle.train.batch import TrajectoryBatch, build_batch, shard_for_data_parallel
from megatron_recycle.train.step import GRPOLossConfig, grpo_train_step

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tests_train_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_dist = _load("_dist")
_workers = _load("_workers")

GRAD_RTOL = 1e-5
ADAM_ATOL = 2e-4


# ------------------------------------------------------------------------------ batch records
def test_build_batch_pads_and_aligns():
    b = build_batch([[5, 6, 7], [1, 2, 3, 4, 9]], [[0, 1, 1], [0, 0, 1, 1, 1]], advantages=[0.5, -1.0],
                    pad_token_id=0, pad_length_to_multiple_of=4, pad_rows_to_multiple_of=4)
    assert b.tokens.shape == (4, 8) and b.loss_mask.shape == (4, 8)
    assert b.tokens[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert b.loss_mask[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert b.advantages.tolist() == [0.5, -1.0, 0.0, 0.0]  # padding rows: no advantage, no tokens
    assert b.loss_mask[2:].sum() == 0
    # column j of the target mask scores tokens[:, j + 1]
    assert b.target_mask.shape == (4, 7)
    assert b.target_mask[0].tolist()[:3] == [1, 1, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.zeros(2, 4)), "loss_mask shape"),
        (dict(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.ones(2, 5)), r"loss_mask\[:, 0\]"),
        (dict(tokens=torch.zeros(2, 5), loss_mask=torch.zeros(2, 5)), "int64"),
        (dict(tokens=torch.zeros(2, 1, dtype=torch.long), loss_mask=torch.zeros(2, 1)), "at least 2"),
        (dict(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.zeros(2, 5),
              advantages=torch.zeros(3)), "advantages"),
        (dict(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.zeros(2, 5),
              old_logprobs=torch.zeros(2, 5)), r"L-1"),
        # a weight other than 0/1 would count as one token in the loss but as its value in the normalizer
        (dict(tokens=torch.zeros(1, 4, dtype=torch.long), loss_mask=torch.tensor([[0, 1, 0.5, 1]])),
         r"only 0 and 1 .* got values such as \[0.5\]"),
        # a loss token in a row's padding: the packed and padded routes would score it differently
        (dict(tokens=torch.zeros(2, 5, dtype=torch.long), loss_mask=torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]),
              lengths=torch.tensor([5, 3])), r"row 1 has loss tokens at or past its length 3"),
    ],
)
def test_batch_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrajectoryBatch(**kwargs)


def test_batch_to_a_device_keeps_every_field_and_checks_nothing_again(monkeypatch):
    """TrajectoryBatch.to: every tensor field moved (here to the CPU: the same tensors), the fields
    given set as given, unknown fields refused; the checks, which the batch passed when it was made,
    do not run again (on a GPU each would wait for the copies: a host sync per micro-batch)."""
    b = build_batch([[1, 2, 3], [4, 5]], [[0, 1, 1], [0, 1]], advantages=[1.0, -1.0], group_ids=[0, 0])
    b = b.replace(old_logprobs=torch.full((2, 2), -0.5))

    def no_checks(self):
        raise AssertionError("TrajectoryBatch checks ran again")

    monkeypatch.setattr(TrajectoryBatch, "__post_init__", no_checks)
    moved = b.to("cpu", non_blocking=True, select="sel")
    assert type(moved) is TrajectoryBatch and moved is not b
    for name in ("tokens", "loss_mask", "advantages", "old_logprobs", "group_ids", "lengths"):
        assert torch.equal(getattr(moved, name), getattr(b, name)), name
    assert moved.ref_logprobs is None and moved.packed is None and moved.select == "sel" and b.select is None
    with pytest.raises(TypeError, match=r"no field\(s\) \['mask'\]"):
        b.to("cpu", mask=None)


@pytest.mark.distributed
def test_missing_data_is_generated_once_under_torchrun(tmp_path):
    """`train` reads its data before the trainer sets up torch.distributed: ensure_data brings up the
    process group itself, rank 0 generates, the other rank waits for the files."""
    results = _dist.run_workers("ensure_data_once", 2, {"dir": str(tmp_path)})
    for r in results:
        assert not r["initialized_before"] and r["initialized_after"] and r["train_exists"]
        assert r["files"] == ["dev.jsonl", "generated_by_0", "test.jsonl", "train.jsonl"]


def test_build_batch_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 token sequences but 1 loss masks"):
        build_batch([[1, 2], [3, 4]], [[0, 1]])
    with pytest.raises(ValueError, match="sequence 0: 2 tokens but 3 mask"):
        build_batch([[1, 2]], [[0, 1, 1]])
    with pytest.raises(ValueError, match="3 advantages for 2"):
        build_batch([[1, 2], [3, 4]], [[0, 1], [0, 1]], advantages=[1.0, 2.0, 3.0])


def test_padded_micro_batches_are_length_grouped_and_cut():
    """Loss-position micro-batches of padded rows: longest first (stable), each cut to its own last
    loss position; every field follows its rows, and the other paths keep the batch as it is."""
    from megatron_recycle.train.step import _micro_batches

    # loss extents (last target + 1): 3, 7, 2 (no loss), 5, 7, 4
    masks = [[0, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0], [0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 0], [0, 1, 1, 1]]
    ids = [[10 * i + j + 1 for j in range(len(m))] for i, m in enumerate(masks)]
    b = build_batch(ids, masks, advantages=[float(i) for i in range(6)])
    b = b.replace(old_logprobs=torch.arange(6.0)[:, None].expand(6, b.seq_length - 1).clone())
    assert b.seq_length == 8 and b.loss_extent().tolist() == [3, 7, 2, 5, 7, 4]
    mbs, order = _micro_batches(b, 2, select=True, return_order=True)
    assert order.tolist() == [1, 4, 3, 5, 0, 2]
    assert [mb.seq_length for mb in mbs] == [7, 5, 3]
    for k, mb in enumerate(mbs):
        rows = order[2 * k: 2 * k + 2]
        assert mb.advantages.tolist() == [float(r) for r in rows]
        assert torch.equal(mb.tokens, b.tokens[rows, : mb.seq_length])
        assert torch.equal(mb.loss_mask, b.loss_mask[rows, : mb.seq_length])
        assert mb.old_logprobs.shape == (2, mb.seq_length - 1) and mb.old_logprobs[:, 0].tolist() == rows.tolist()
        assert mb.loss_mask[:, : mb.seq_length].sum() == b.loss_mask[rows].sum()  # no loss token is cut
    # all positions wanted (log-probs of every token): the batch's order and width
    plain, order = _micro_batches(b, 2, select=False, return_order=True)
    assert order is None and [mb.seq_length for mb in plain] == [8, 8, 8]
    # already sorted: no reordering, still cut
    sorted_b = b.take(torch.tensor([1, 4, 3, 5, 0, 2]))
    mbs, order = _micro_batches(sorted_b, 3, select=True, return_order=True)
    assert order is None and [mb.seq_length for mb in mbs] == [7, 4]
    with pytest.raises(ValueError, match="width=1 must be in"):
        b.truncate(1)


def test_shard_for_data_parallel_is_contiguous_and_checked():
    b = build_batch([[i, i + 1] for i in range(6)], [[0, 1]] * 6, advantages=list(range(6)))
    s = shard_for_data_parallel(b, 1, 3)
    assert s.tokens[:, 0].tolist() == [2, 3] and s.advantages.tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="do not split evenly over 4"):
        shard_for_data_parallel(b, 0, 4)
    with pytest.raises(ValueError, match="dp_rank=3"):
        shard_for_data_parallel(b, 3, 3)


def test_pad_rows_appends_rows_that_carry_nothing():
    b = build_batch([[5, 6, 7], [8, 9]], [[0, 1, 1], [0, 1]], advantages=[1.0, -1.0], group_ids=[0, 0])
    b = b.replace(old_logprobs=torch.ones(2, 2))
    assert b.pad_rows(2) is b
    p = b.pad_rows(4)
    assert p.num_sequences == 4 and p.seq_length == 3
    assert torch.equal(p.tokens[2:], b.tokens[:1].expand(2, -1)) and p.loss_mask[2:].sum() == 0
    assert p.advantages.tolist() == [1.0, -1.0, 0.0, 0.0] and p.old_logprobs[2:].sum() == 0
    assert p.group_ids.tolist() == [0, 0, 1, 2] and p.lengths.tolist() == [3, 2, 2, 2]
    assert p.ref_logprobs is None and torch.equal(p.take(slice(0, 2)).tokens, b.tokens)


def test_gloo_p2p_settings_for_every_pipelined_model(tmp_path, monkeypatch):
    """The policy's and the KL reference's configs get PLATFORM.md's gloo p2p settings."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from megatron_recycle.train.optim import gloo_p2p_settings

    if dist.is_initialized():
        pytest.skip("this process already holds a process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        one, two = (SimpleNamespace(batch_p2p_sync=True, batch_p2p_comm=True) for _ in range(2))
        gloo_p2p_settings(one, 1)
        gloo_p2p_settings(two, 2)
        assert (one.batch_p2p_sync, one.batch_p2p_comm) == (False, True)
        assert (two.batch_p2p_sync, two.batch_p2p_comm) == (False, False)
        # the KL reference model (built outside the optimizer's set-up) applies them too
        import megatron_recycle.model.build as build
        import megatron_recycle.model.convert as convert
        import megatron_recycle.model.hf_loading as hf_loading
        from megatron_recycle.config import Config
        from megatron_recycle.train.grpo import _reference_model

        shared = SimpleNamespace(batch_p2p_sync=True, batch_p2p_comm=True)
        chunks = [torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)]  # two virtual stages sharing one config
        for c in chunks:
            c.config = shared
        monkeypatch.setattr(build, "build_model_chunks", lambda *a, **k: chunks)
        monkeypatch.setattr(convert, "load_hf_weights", lambda *a, **k: None)
        monkeypatch.setattr(hf_loading, "resolve_model_folder", lambda path, **k: path)
        rt = SimpleNamespace(hf_config=None, cfg=Config(), model_path="m")
        assert _reference_model(rt) is chunks and not chunks[0].training
        assert (shared.batch_p2p_sync, shared.batch_p2p_comm) == (False, False)
    finally:
        dist.destroy_process_group()


def test_loss_config_and_step_argument_errors():
    with pytest.raises(ValueError, match="agg='mean'"):
        GRPOLossConfig(agg="mean")
    with pytest.raises(ValueError, match="temperature"):
        GRPOLossConfig(temperature=0.0)
    b = build_batch([[1, 2, 3]], [[0, 1, 1]])  # no advantages
    with pytest.raises(ValueError, match="needs batch.advantages"):
        grpo_train_step([], None, None, b, 1)


# ------------------------------------------------------------------------- distributed runs
OVERLAP = {
    # overlapped gradient reduction (buckets of ~5,000 of the tiny model's ~34,000 parameters) vs
    # the reduction after the backward pass; 4 micro-batches of 2 sequences per step
    "dp2": (2, {"tp": 1, "pp": 1, "dist_opt": False, "mbs": 2, "bucket": 5000}),
    "dp2_distopt": (2, {"tp": 1, "pp": 1, "dist_opt": True, "mbs": 2, "bucket": 5000}),
    "pp2": (2, {"tp": 1, "pp": 2, "dist_opt": False, "mbs": 2, "bucket": 5000}),
    "vpp2_dp2_distopt": (4, {"tp": 1, "pp": 2, "vpp": 2, "dist_opt": True, "mbs": 2, "bucket": 3000}),
}
LAYOUTS = {
    # name: (world size, worker args); mbs chosen so that several layouts use several micro-batches
    "tp2": (2, {"tp": 2, "pp": 1, "dist_opt": False, "mbs_list": [4]}),
    "pp2": (2, {"tp": 1, "pp": 2, "dist_opt": False, "mbs_list": [2]}),
    "dp2_distopt": (2, {"tp": 1, "pp": 1, "dist_opt": True, "mbs_list": [2]}),
    # memory options: sequence parallelism with selective recomputation, full recomputation (block) with PP
    "tp2_sp_selective": (2, {"tp": 2, "pp": 1, "dist_opt": True, "mbs_list": [4], "sp": True,
                             "recompute": "selective"}),
    "pp2_recompute_block": (2, {"tp": 1, "pp": 2, "dist_opt": False, "mbs_list": [2], "recompute": "full",
                                "recompute_method": "block", "recompute_num_layers": 1}),
}


@pytest.fixture(scope="module")
def single_process_runs():
    """One process: the TP=1/PP=1/DP=1 reference (micro-batch sizes 8, 4, 1), six SFT steps, bf16."""
    jobs = [
        ["reference", "grpo_layout", {"tp": 1, "pp": 1, "dist_opt": False, "mbs_list": [8, 4, 1]}],
        ["sft", "sft_steps", {"steps": 6, "mbs": 4}],
        ["bf16", "grpo_bf16", {"mbs": 4}],
        ["seq_mean", "grpo_layout", {"mbs_list": [8, 2], "dist_opt": False, "agg": "seq-mean-token-mean"}],
        ["resume_bf16_distopt", "optimizer_resume", {"bf16": True, "dist_opt": True}],
        ["resume_bf16", "optimizer_resume", {"bf16": True, "dist_opt": False}],
        ["resume_fp32", "optimizer_resume", {"bf16": False, "dist_opt": False}],
        ["recompute_full", "grpo_layout", {"mbs_list": [8, 4], "dist_opt": False, "recompute": "full",
                                           "recompute_method": "uniform", "recompute_num_layers": 2}],
        ["recompute_selective", "grpo_layout", {"mbs_list": [8], "dist_opt": False, "recompute": "selective"}],
        ["length_grouping", "length_grouping", {}],
        ["schedule_resume", "schedule_resume", {}],
        ["uneven_micro_batches", "uneven_micro_batches", {}],
    ]
    return _dist.run_workers("run_jobs", 1, {"jobs": jobs})[0]


@pytest.fixture(scope="module")
def reference_run(single_process_runs):
    return single_process_runs["reference"]


@pytest.fixture(scope="module")
def two_process_runs():
    """TP=2, PP=2 and DP=2 (distributed optimizer) one after the other in the same two processes."""
    jobs = [[name, "grpo_layout", args] for name, (_, args) in sorted(LAYOUTS.items())]
    jobs.append(["resume_dp2_bf16_distopt", "optimizer_resume", {"bf16": True, "dist_opt": True}])
    jobs.append(["resume_tp2_bf16_distopt", "optimizer_resume", {"tp": 2, "bf16": True, "dist_opt": True}])
    jobs.append(["resume_pp2_bf16_distopt", "optimizer_resume", {"pp": 2, "bf16": True, "dist_opt": True}])
    jobs.append(["sp_padding_plain", "sequence_parallel_padding", {"tp": 2, "packed": False}])
    jobs.append(["sp_padding_packed", "sequence_parallel_padding", {"tp": 2, "packed": True, "recompute": "selective"}])
    jobs.append(["sp_padding_qwen3", "sequence_parallel_padding", {"tp": 2, "packed": False, "kind": "qwen3"}])
    jobs.append(["pp2_packing", "pipeline_packing", {"tp": 1, "pp": 2, "recompute_list": ["none", "full", "selective"]}])
    jobs.append(["vpp2_packing", "pipeline_packing", {"tp": 1, "pp": 2, "vpp": 2, "recompute_list": ["none", "full"]}])
    jobs.append(["vpp2_uneven", "uneven_micro_batches", {"tp": 1, "pp": 2, "vpp": 2}])
    jobs += [[f"overlap_{name}", "overlap_grad_reduce", args] for name, (world, args) in sorted(OVERLAP.items())
             if world == 2]
    return _dist.run_workers("run_jobs", 2, {"jobs": jobs})


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), f"different tensor names: {sorted(set(a) ^ set(b))}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _gmax(g: dict) -> float:
    return max(v.abs().max().item() for v in g.values())


@pytest.mark.distributed
def test_compute_logprobs_equals_float64_log_softmax(reference_run):
    lp, direct = reference_run["logprobs"], reference_run["direct_logprobs64"]
    assert lp.shape == (_workers.N_GLOBAL, _workers.SEQ - 1) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), direct, rtol=0, atol=5e-6)
    assert (lp < 0).all()


@pytest.mark.distributed
def test_microbatch_count_does_not_change_gradient(reference_run):
    grads, metrics = reference_run["grads"], reference_run["sgd_metrics"]
    g8 = grads[8]
    assert _gmax(g8) > 1e-2  # a real gradient, not a no-op step
    for mbs in (4, 1):
        assert _max_diff(grads[mbs], g8) <= GRAD_RTOL * _gmax(g8), f"micro_batch_size={mbs}"
        assert metrics[mbs]["num_microbatches"] == 8 // mbs
        assert metrics[mbs]["loss"] == pytest.approx(metrics[8]["loss"], rel=1e-6)
        assert metrics[mbs]["grad_norm"] == pytest.approx(metrics[8]["grad_norm"], rel=1e-6)
    m = metrics[8]
    assert m["tokens"] == _workers.global_batch()["loss_mask"][:, 1:].sum().item()
    assert 0 < m["clip_frac_low"] + m["clip_frac_high"] < 1  # the noise on old log-probs clips some tokens


@pytest.mark.distributed
def test_microbatch_count_does_not_change_gradient_seq_mean(single_process_runs, reference_run):
    """seq-mean-token-mean: the normalizer is the global sequence count, so micro-batching is exact too."""
    run = single_process_runs["seq_mean"]
    g8 = run["grads"][8]
    assert _max_diff(run["grads"][2], g8) <= GRAD_RTOL * _gmax(g8)
    assert run["sgd_metrics"][8]["sequences"] == _workers.N_GLOBAL
    assert run["sgd_metrics"][2]["loss"] == pytest.approx(run["sgd_metrics"][8]["loss"], rel=1e-6)
    # a different aggregation really was used: the loss differs from the token-mean one
    assert abs(run["sgd_metrics"][8]["loss"] - reference_run["sgd_metrics"][8]["loss"]) > 1e-4


@pytest.mark.distributed
def test_gradient_matches_float64_reference(reference_run):
    """SGD weight delta == grad of (HF Llama in float64 + the kernels' float64 reference GRPO loss)."""
    from megatron_recycle_kernels import reference as kref
    from transformers import LlamaForCausalLM

    cfg, sd = _workers.tiny_llama()
    gb = _workers.global_batch()
    model = LlamaForCausalLM(cfg).double()
    model.load_state_dict({k: v.double() for k, v in sd.items()}, strict=False)
    model.tie_weights()
    logits = model(input_ids=gb["tokens"]).logits
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = logp_all.gather(-1, gb["tokens"][:, 1:, None]).squeeze(-1)
    mask = gb["loss_mask"][:, 1:]
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum()
    # Same loss knobs as the worker: GRPOLossConfig(kl_beta=0.05, clip_c=3.0), token-mean over the batch.
    loss, _ = kref.grpo_loss_reference(
        lp, reference_run["old_logprobs"].double(), gb["advantages"].double(), mask,
        ref_logprobs=reference_run["ref_logprobs"].double(), clip_c=3.0, kl_beta=0.05,
    )
    loss.backward()
    ref_grads = {k: p.grad.float() for k, p in model.named_parameters() if k in reference_run["grads"][8]}
    g = reference_run["grads"][8]
    assert sorted(ref_grads) == sorted(g)
    assert _max_diff(g, ref_grads) <= 1e-4 * _gmax(ref_grads)
    assert reference_run["sgd_metrics"][8]["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    assert reference_run["sgd_metrics"][8]["entropy"] == pytest.approx(entropy.item(), rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_give_the_same_gradient_and_weights(reference_run, two_process_runs, layout):
    world, args = LAYOUTS[layout]
    results = [r[layout] for r in two_process_runs]
    run = results[0]
    (mbs, grads), = run["grads"].items()
    ref_g = reference_run["grads"][8]
    assert _max_diff(grads, ref_g) <= GRAD_RTOL * _gmax(ref_g)
    ref_m, m = reference_run["sgd_metrics"][8], run["sgd_metrics"][mbs]
    for key in ("loss", "grad_norm", "tokens", "clip_frac_low", "clip_frac_high", "ratio_mean", "ref_kl", "entropy"):
        assert m[key] == pytest.approx(ref_m[key], rel=1e-5, abs=1e-7), key
    # layout counters are global too: every replica's micro-batches, not rank 0's alone
    assert m["num_microbatches"] == _workers.N_GLOBAL // mbs, (layout, mbs)
    # Full batch of log-probs (gathered over DP) and the same answer on every rank of a replica.
    torch.testing.assert_close(run["logprobs"], reference_run["logprobs"], rtol=0, atol=1e-5)
    if args.get("tp", 1) * args.get("pp", 1) == len(results):
        for r in results[1:]:
            torch.testing.assert_close(r["rank_logprobs"], run["rank_logprobs"], rtol=0, atol=0)
    # Three clipped Adam steps (distributed optimizer where asked), weights exported to HF names.
    assert _max_diff(run["adam_weights"], reference_run["adam_weights"]) <= ADAM_ATOL
    for a, b in zip(run["adam_metrics"], reference_run["adam_metrics"]):
        assert a["lr"] == pytest.approx(b["lr"]) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert [a["lr"] for a in run["adam_metrics"]][0] == 0.0  # warm-up starts at 0 (Megatron's schedule)


@pytest.fixture(scope="module")
def four_process_runs():
    """PP=2 x VPP=2 x DP=2 (distributed optimizer), then TP=2 x PP=2 with sequence parallelism and
    full recomputation (padded and group-packed rows), then PP=2 x VPP=2 x DP=2 with and without
    overlapped gradient reduction, in the same four processes."""
    jobs = [
        ["vpp", "grpo_layout", {"tp": 1, "pp": 2, "vpp": 2, "dist_opt": True, "mbs_list": [2]}],
        ["tp2_pp2_sp", "grpo_layout", {"tp": 2, "pp": 2, "dist_opt": True, "mbs_list": [2], "sp": True,
                                       "recompute": "full", "recompute_num_layers": 2}],
        ["tp2_pp2_sp_packing", "pipeline_packing", {"tp": 2, "pp": 2, "sp": True, "recompute_list": ["full"]}],
    ]
    jobs += [[f"overlap_{name}", "overlap_grad_reduce", args] for name, (world, args) in sorted(OVERLAP.items())
             if world == 4]
    return _dist.run_workers("run_jobs", 4, {"jobs": jobs})


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_pp2_sequence_parallel_with_full_recomputation(reference_run, four_process_runs):
    """4 processes: TP=2 x PP=2, sequence parallelism (pipeline stages exchange 1/tp of the
    sequence), full recomputation, distributed optimizer."""
    run = four_process_runs[0]["tp2_pp2_sp"]
    ref_g = reference_run["grads"][8]
    assert _max_diff(run["grads"][2], ref_g) <= GRAD_RTOL * _gmax(ref_g)
    assert _max_diff(run["adam_weights"], reference_run["adam_weights"]) <= ADAM_ATOL
    calls = run["calls"][2]
    # length-grouped micro-batches of 2 (widths 12, 11, 10, 9, padded to a multiple of tp; the
    # stages exchange their shapes), each TP rank holding half of the sequence
    assert calls["layer_inputs"] == [(10 // 2, 2, 32), (_workers.SEQ // 2, 2, 32)] and calls["layers"] == 2 * 2 * 4


@pytest.mark.distributed
@pytest.mark.slow
def test_interleaved_pipeline_with_data_parallel_distributed_optimizer(reference_run, four_process_runs):
    """4 processes: PP=2 with 2 virtual stages each, DP=2, distributed optimizer."""
    run = four_process_runs[0]["vpp"]
    ref_g = reference_run["grads"][8]
    assert _max_diff(run["grads"][2], ref_g) <= GRAD_RTOL * _gmax(ref_g)
    assert _max_diff(run["adam_weights"], reference_run["adam_weights"]) <= ADAM_ATOL
    # virtual stages keep one fixed shape: every micro-batch at the batch's width
    assert run["calls"][2]["layer_inputs"] == [(_workers.SEQ, 2, 32)]


# ------------------------------------------------------------- overlapped gradient reduction
def _check_overlap(ranks: list[dict], reference_run: dict, dist_opt: bool, pipelined: bool, interleaved: bool) -> None:
    """Overlap on vs off in the same processes: the same gradient and the same Adam steps, and each
    bucket group's reduction dispatched where Megatron's overlap puts it."""
    ref_g = reference_run["grads"][8]
    for r in ranks:
        off, on = r[False], r[True]
        for k in off["grads"]:  # the plain optimizer's SGD step: identical sums, bit for bit
            assert torch.equal(on["grads"][k], off["grads"][k]), k
        assert _max_diff(on["grads"], ref_g) <= GRAD_RTOL * _gmax(ref_g)
        # the distributed optimizer shards each bucket, so the grad norm's partial sums (and with
        # them the clipping factor) are added in another order: fp32 rounding, no more
        weights_diff = _max_diff(on["adam_weights"], off["adam_weights"])
        assert weights_diff <= (1e-6 if dist_opt else 0.0)
        assert _max_diff(on["adam_weights"], reference_run["adam_weights"]) <= ADAM_ATOL
        for a, b in zip(on["adam_metrics"], off["adam_metrics"]):
            for key in ("loss", "grad_norm"):
                # a sum of ~34,000 fp32 squares in another order: 1.4e-6 relative seen on an
                # AVX-512 Xeon (under 1e-6 on an AMD EPYC), so 1e-5
                assert a[key] == (pytest.approx(b[key], rel=1e-5) if dist_opt else b[key]), key
        assert on["describe"].startswith("overlapped grad reduction (") and off["describe"] == ""
        groups = on["bucket_groups"]
        if r["first_stage"]:
            assert groups > off["bucket_groups"]  # really several buckets (off: one per model chunk)
        # without overlap: every group once per step, after the schedule (finalize_model_grads)
        assert off["starts"] == [["finish"] * off["bucket_groups"]] * 3
        if interleaved:
            # the interleaved schedule dispatches each chunk's groups when its last backward is done
            assert on["starts"] == [["schedule"] * groups] * 3
        elif pipelined and not r["first_stage"]:
            # later stages reduce in the pipeline bubble, after their last backward pass
            assert on["starts"] == [["schedule"] * groups] * 3
        else:
            # the first step learns which gradients each bucket waits for and reduces at the end;
            # from then on every bucket starts inside the last micro-batch's backward pass
            assert on["starts"] == [["finish"] * groups] + [["backward"] * groups] * 2


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n, (world, _) in sorted(OVERLAP.items()) if world == 2])
def test_overlapped_grad_reduction_gives_the_same_steps(reference_run, two_process_runs, name):
    args = OVERLAP[name][1]
    _check_overlap([r[f"overlap_{name}"] for r in two_process_runs], reference_run, args["dist_opt"],
                   pipelined=args["pp"] > 1, interleaved=False)


@pytest.mark.distributed
@pytest.mark.slow
def test_overlapped_grad_reduction_interleaved_pipeline_data_parallel(reference_run, four_process_runs):
    """4 processes: PP=2 x VPP=2 x DP=2 with the distributed optimizer, overlap on vs off."""
    _check_overlap([r["overlap_vpp2_dp2_distopt"] for r in four_process_runs], reference_run, True,
                   pipelined=True, interleaved=True)


# ------------------------------------------------------- activation recomputation, sequence parallel
N_LAYERS = 4  # _workers.tiny_llama


@pytest.mark.distributed
def test_recomputation_gives_the_identical_gradient(single_process_runs, reference_run):
    """Full (uniform, 2 layers per unit) and selective recomputation: the same gradient and Adam
    weights bit for bit, and the layers (full) or core attentions (selective) really run twice."""
    ref_calls = reference_run["calls"][8]
    assert ref_calls["layers"] == ref_calls["cores"] == N_LAYERS  # one micro-batch, nothing recomputed
    full, sel = single_process_runs["recompute_full"], single_process_runs["recompute_selective"]
    for run, mbs_list in ((full, (8, 4)), (sel, (8,))):
        for mbs in mbs_list:
            assert _max_diff(run["grads"][mbs], reference_run["grads"][mbs]) == 0.0
            assert run["sgd_metrics"][mbs]["loss"] == reference_run["sgd_metrics"][mbs]["loss"]
        assert _max_diff(run["adam_weights"], reference_run["adam_weights"]) == 0.0
    for mbs in (8, 4):
        micro = 8 // mbs
        assert full["calls"][mbs] | {"layer_inputs": None} == {
            "layers": 2 * N_LAYERS * micro, "cores": 2 * N_LAYERS * micro, "group_calls": 0,
            "layer_inputs": None}
    assert sel["calls"][8]["layers"] == N_LAYERS and sel["calls"][8]["cores"] == 2 * N_LAYERS


@pytest.mark.distributed
def test_memory_options_in_layouts_really_apply(two_process_runs):
    """Sequence parallelism hands each layer 1/tp of the sequence; block recomputation with PP 2
    recomputes the first layer of each stage (2 layers per stage, 4 micro-batches)."""
    sp = two_process_runs[0]["tp2_sp_selective"]["calls"][4]
    # length-grouped micro-batches of 4 rows (loss extents 12, 12, 11, 11 | 10, 10, 9, 9): widths 12
    # and 10, of which each TP rank holds half
    assert sp["layer_inputs"] == [(10 // 2, 4, 32), (_workers.SEQ // 2, 4, 32)]
    assert sp["cores"] == 2 * sp["layers"] == 2 * N_LAYERS * 2  # 2 micro-batches, attention recomputed
    for r in two_process_runs:
        calls = r["pp2_recompute_block"]["calls"][2]
        assert calls["layers"] == (2 + 1) * 4 and calls["cores"] == calls["layers"]
        # PP 2: length-grouped micro-batches of 2 too (extents 12, 12 | 11, 11 | 10, 10 | 9, 9),
        # the stages exchanging each one's shape (config.variable_seq_lengths)
        assert calls["layer_inputs"] == [(w, 2, 32) for w in (9, 10, 11, 12)]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["plain", "packed", "qwen3"])
def test_sequence_parallel_pads_the_sequence_and_keeps_results(two_process_runs, kind):
    """Length 11 on TP 2: with sequence parallelism the forward pads to 12 and hands each rank 6
    positions; log-probs (all positions and loss positions only) and the gradient equal TP 2
    without it (plain rows, group-packed rows with selective recomputation, and a Qwen3 whose
    per-head q/k norms see the whole sequence)."""
    for r in two_process_runs:
        run = r[f"sp_padding_{kind}"]
        off, on = run[False], run[True]
        assert "SequenceParallelRMSNorm" in on["norm_types"] and "SequenceParallelRMSNorm" not in off["norm_types"]
        assert off["lp_all"].shape == on["lp_all"].shape == (_workers.N_GLOBAL, _workers.SEQ - 2)
        torch.testing.assert_close(on["lp_all"], off["lp_all"], rtol=0, atol=2e-6)
        mask = _workers.global_batch()["loss_mask"][:, 1 : _workers.SEQ - 1].clone()
        mask[:, :2] = 0.0
        assert mask.sum() > 0
        torch.testing.assert_close(on["lp_loss"][mask.bool()], off["lp_all"][mask.bool()], rtol=0, atol=2e-6)
        assert _max_diff(on["grads"], off["grads"]) <= GRAD_RTOL * _gmax(off["grads"])
        assert _gmax(off["grads"]) > 1e-2
        assert on["metrics"]["loss"] == pytest.approx(off["metrics"]["loss"], rel=1e-5)
        widths = {s[0] for s in off["calls"]["layer_inputs"]}
        assert {s[0] for s in on["calls"]["layer_inputs"]} == {-(-w // 2) for w in widths}
        if kind in ("plain", "qwen3"):  # length-grouped micro-batches: 11 (odd: padded to 12) and 10
            assert widths == {_workers.SEQ - 1, _workers.SEQ - 2}
        if kind == "qwen3":
            assert "HeadRMSNorm" in on["norm_types"] and "HeadRMSNorm" not in off["norm_types"]
            qk = {k: v for k, v in off["grads"].items() if k.endswith(("q_norm.weight", "k_norm.weight"))}
            assert len(qk) == 2 * N_LAYERS and _gmax(qk) > 1e-4
        if kind == "packed":
            assert on["metrics"]["packed_saved_tokens"] > 0
            # recomputed attention uses the group plan too (not the dense masked fallback)
            assert on["calls"]["cores"] == 2 * on["calls"]["layers"] == on["calls"]["group_calls"]
            assert off["calls"]["group_calls"] == off["calls"]["cores"] == 2 * off["calls"]["layers"]


@pytest.mark.distributed
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_group_packing_under_pipeline_parallelism(two_process_runs, recompute):
    """PP 2, 4 micro-batches of one 2-member group each: group-packed rows give the padded rows'
    log-probs, loss and gradient (fp32 rounding), and every attention call of the packed step,
    recomputed ones included, takes its own micro-batch's group plan: under 1F1B, stage 0 runs
    micro-batch 1's forward before micro-batch 0's backward recomputes micro-batch 0's attention
    (with one plan at a time those recomputations fell back to the dense mask: 10 of 16 calls)."""
    for r in two_process_runs:
        run = r["pp2_packing"]
        _check_packed_equals_padded(run[(recompute, False)], run[(recompute, True)])
        calls, plain = run[(recompute, True)]["calls"], run[("none", True)]["calls"]
        assert calls["cores"] == (plain["cores"] if recompute == "none" else 2 * plain["cores"])


@pytest.mark.distributed
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_group_packing_on_virtual_pipeline_stages(two_process_runs, recompute):
    """PP 2 x VPP 2 (one layer per model chunk): the interleaved schedule exchanges one tensor
    shape for every micro-batch, so the packed micro-batches are padded to the largest packed
    shape; the padded rows' log-probs, loss and gradient, and each attention call (several
    micro-batches' forwards run before the first backward) takes its own micro-batch's plan."""
    for r in two_process_runs:
        run = r["vpp2_packing"]
        _check_packed_equals_padded(run[(recompute, False)], run[(recompute, True)])
        shapes = run[(recompute, True)]["calls"]["layer_inputs"]
        assert len(shapes) == 1 and shapes[0][1] == 1, shapes  # one [width, rows, hidden] for all: one row each


@pytest.mark.distributed
def test_virtual_pipeline_stages_take_any_micro_batch_count(single_process_runs, two_process_runs):
    """PP 2 x VPP 2 runs micro-batches in groups of PP: batches of 3 and 1 micro-batches (a GRPO
    step's row count follows its signal-bearing groups) are padded with all-masked rows, and the
    log-probs, the GRPO gradient, the loss and the SFT loss equal one process's."""
    ref = single_process_runs["uneven_micro_batches"]
    for r in two_process_runs:
        run = r["vpp2_uneven"]
        for rows in (6, 2):
            a, b = run[rows], ref[rows]
            assert a["logprobs"].shape == (rows, _workers.SEQ - 1)
            torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=0, atol=5e-6)
            assert _gmax(b["grads"]) > 1e-2
            assert _max_diff(a["grads"], b["grads"]) <= GRAD_RTOL * _gmax(b["grads"])
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["sft_loss"] == pytest.approx(b["sft_loss"], rel=1e-5)
            # the schedule's padding is logged: 6 rows -> 8, 2 rows -> 4 (micro-batches of 2, PP 2)
            assert (a["pad_rows"], a["sft_pad_rows"], b["pad_rows"]) == ({6: 2.0, 2: 2.0}[rows],) * 2 + (0.0,)


def _check_packed_equals_padded(padded: dict, packed: dict) -> None:
    assert packed["metrics"]["packed_saved_tokens"] > 0 and padded["metrics"]["packed_saved_tokens"] == 0
    # log-probs near -5 (vocab 96): 5e-6 is about 10 fp32 ulps (the attention sums in another order)
    torch.testing.assert_close(packed["lp_all"], padded["lp_all"], rtol=0, atol=5e-6)
    mask = _workers.global_batch()["loss_mask"][:, 1 : _workers.SEQ - 1].clone()
    mask[:, :2] = 0.0
    torch.testing.assert_close(packed["lp_loss"][mask.bool()], padded["lp_all"][mask.bool()], rtol=0, atol=5e-6)
    assert _gmax(padded["grads"]) > 1e-2
    assert _max_diff(packed["grads"], padded["grads"]) <= GRAD_RTOL * _gmax(padded["grads"])
    assert packed["metrics"]["loss"] == pytest.approx(padded["metrics"]["loss"], rel=1e-5)
    calls = packed["calls"]
    assert calls["group_calls"] == calls["cores"] > 0 and padded["calls"]["group_calls"] == 0
    assert packed["plans_left"] == 0  # the step drops every plan it set


@pytest.mark.distributed
@pytest.mark.slow
def test_group_packing_tp2_pp2_sequence_parallel_full_recomputation(four_process_runs):
    """Group packing on TP 2 x PP 2 with sequence parallelism (packed rows padded to a multiple of
    tp) and full recomputation: the padded rows' log-probs, loss and gradient; each layer runs
    twice and every attention call takes its micro-batch's plan."""
    for r in four_process_runs:
        run = r["tp2_pp2_sp_packing"]
        _check_packed_equals_padded(run[("full", False)], run[("full", True)])
        calls = run[("full", True)]["calls"]
        assert calls["cores"] == calls["layers"] == 2 * 4 * 2  # 2 layers per stage x 4 micro-batches x 2


@pytest.mark.distributed
def test_length_grouped_micro_batches_keep_the_results(single_process_runs):
    """Rows of 4 to 12 tokens in micro-batches of 2: longest first, each cut to its own length, the
    decoder sees micro-batches of widths 12, 9, 7 and 5 instead of four of 12; the loss-position
    log-probs and the gradient are the batch-wide width's (fp32 rounding)."""
    run = single_process_runs["length_grouping"]
    on, off = run[True], run[False]
    mask = run["mask"][:, 1:].bool()
    assert mask.sum() > 20
    torch.testing.assert_close(on["lp"][mask], off["lp"][mask], rtol=0, atol=2e-6)
    assert _max_diff(on["grads"], off["grads"]) <= GRAD_RTOL * _gmax(off["grads"])
    assert _gmax(off["grads"]) > 1e-2
    for key in ("loss", "tokens", "entropy", "clip_frac_low", "clip_frac_high", "ref_kl"):
        assert on["metrics"][key] == pytest.approx(off["metrics"][key], rel=1e-5, abs=1e-7), key
    assert off["layer_inputs"] == [(_workers.SEQ, 2, 32)]
    assert on["layer_inputs"] == [(w, 2, 32) for w in (5, 7, 9, 12)]
    # the positions not trained, logged as train/length_cut_tokens: 2 rows x (12 - w) per micro-batch
    assert on["metrics"]["length_cut_tokens"] == 2 * ((12 - 9) + (12 - 7) + (12 - 5))
    assert off["metrics"]["length_cut_tokens"] == 0


@pytest.mark.distributed
def test_sft_step_lowers_the_loss(single_process_runs):
    metrics = single_process_runs["sft"]
    losses = [m["loss"] for m in metrics]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0]
    assert metrics[0]["tokens"] == _workers.global_batch()["loss_mask"][:, 1:].sum().item()
    assert metrics[0]["num_microbatches"] == 2


@pytest.mark.distributed
def test_bf16_step_runs_close_to_fp32(single_process_runs, reference_run):
    run = single_process_runs["bf16"]
    assert run["param_dtypes"] == ["torch.bfloat16"]
    # bf16 weights and activations: log-probs within bf16 resolution of the fp32 ones
    assert run["logprobs"].dtype == torch.float32
    torch.testing.assert_close(run["logprobs"], reference_run["logprobs"], rtol=0, atol=0.1)
    for m in run["metrics"]:
        assert m["update_successful"] == 1.0 and 0 < m["grad_norm"] < float("inf")
    assert run["metrics"][0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # old == current at step 1


# ------------------------------------------------------------ optimizer state across a resume
def _check_optimizer_resume(r: dict, distributed: bool) -> None:
    # the step after a resume is the step the uninterrupted run took, bit for bit
    assert r["resumed_metrics"]["loss"] == r["metrics"]["loss"]
    assert r["resumed_metrics"]["grad_norm"] == r["metrics"]["grad_norm"]
    assert _max_diff(r["resumed_weights"], r["weights"]) == 0.0
    # and the optimizer state is what makes it so: the weights alone give another step
    assert _max_diff(r["weights_only_weights"], r["weights"]) > 1e-4
    # a state saved before any step (Megatron's DistributedOptimizer.state_dict() asserts there)
    assert _max_diff(r["first_after_load_weights"], r["first_weights"]) == 0.0
    if distributed:
        assert "lacks the Adam moments" in r["legacy"], r["legacy"]
    else:
        assert r["legacy"] == "loaded"


@pytest.mark.parametrize("name", ["resume_bf16_distopt", "resume_bf16", "resume_fp32"])
def test_optimizer_state_survives_a_resume(single_process_runs, name):
    """Found by a CPU run of the Qwen3 recipe (bf16, distributed optimizer): its first checkpoint
    failed in Megatron's DistributedOptimizer.state_dict() (no step yet), and a resume loaded Adam
    moments made by torch.empty and, with bf16, fp32 main weights from the start of the run."""
    _check_optimizer_resume(single_process_runs[name], distributed="distopt" in name)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2"])
def test_distributed_optimizer_state_survives_a_resume_on_two_ranks(two_process_runs, layout):
    for rank in two_process_runs:  # each rank saves and loads its own shard
        _check_optimizer_resume(rank[f"resume_{layout}_bf16_distopt"], distributed=True)


def test_schedule_differences_names_what_a_resume_keeps():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_recycle.train.optim import schedule_differences

    def sched(max_lr: float, decay_steps: int) -> OptimizerParamScheduler:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
        return OptimizerParamScheduler(opt, init_lr=0.0, max_lr=max_lr, min_lr=0.0, lr_warmup_steps=2,
                                       lr_decay_steps=decay_steps, lr_decay_style="cosine", start_wd=0.0,
                                       end_wd=0.0, wd_incr_steps=decay_steps, wd_incr_style="constant")

    saved = sched(1e-6, 100).state_dict()
    assert schedule_differences(sched(1e-6, 100), saved) == []
    got = schedule_differences(sched(2e-6, 300), saved)
    assert got == ["max_lr 1e-06 (this config: 2e-06)", "lr_decay_steps 100 (this config: 300)"]


@pytest.mark.parametrize("kwargs,message", [({}, "'lr'"), ({"lr": 1e-3, "lr_decy_style": "cosine"}, "lr_decy_style")])
def test_setup_refuses_bad_optimizer_arguments_before_building(kwargs, message):
    """setup_model_and_optimizer passes its optimizer arguments through to
    wrap_model_and_build_optimizer; a missing lr or a misspelled key is a TypeError naming it
    before any model is built (hf_config=None would fail the build otherwise)."""
    from megatron_recycle.train.optim import setup_model_and_optimizer

    with pytest.raises(TypeError, match=message):
        setup_model_and_optimizer(None, **kwargs)


def test_worker_results_come_back_on_the_cpu_whole():
    """_workers._on_cpu (applied to every rank's result before it is saved, so runs on a GPU and on
    the CPU compare): every tensor detached and on the CPU, dicts, lists, tuples and named tuples
    kept as they were, other values untouched."""
    import collections

    pair = collections.namedtuple("pair", "a b")
    w = torch.ones(2, requires_grad=True)
    got = _workers._on_cpu({"g": [pair(w * 2, (1, w))], "n": 3, "s": "x"})
    (p,) = got["g"]
    assert type(p) is pair and p.b[0] == 1 and got["n"] == 3 and got["s"] == "x"
    assert all(t.device.type == "cpu" and not t.requires_grad for t in (p.a, p.b[1]))
    assert torch.equal(p.a, torch.full((2,), 2.0))


@pytest.mark.parametrize("warmup,total", [(5, 5), (6, 5), (-1, 5), (0, 0)])
def test_wrap_refuses_a_schedule_megatron_would_assert_on(warmup, total):
    # checked before any model is touched: Megatron's scheduler asserts warmup < decay steps
    from megatron_recycle.train.optim import wrap_model_and_build_optimizer

    with pytest.raises(ValueError, match="need 0 <= warmup_steps < total_steps"):
        wrap_model_and_build_optimizer([], lr=1e-3, warmup_steps=warmup, total_steps=total)


@pytest.mark.distributed
def test_a_resume_continues_the_saved_schedule_and_optimizer_settings_on_any_layout(single_process_runs):
    """A config that changed lr, warm-up, weight decay and beta2: the same-layout and the resharded
    resume both take the next updates with the saved run's lr, weight decay and betas."""
    run = single_process_runs["schedule_resume"]
    straight = run["straight"]
    assert straight[0][0][0] < 1e-3 and len({row[0][0] for row in straight}) == 3  # still warming up
    for name in ("same_layout", "resharded"):
        for got, want in zip(run[name], straight):
            assert len(got) == len(want)
            for (lr, wd, betas), (lr0, wd0, betas0) in zip(got, want):
                assert lr == pytest.approx(lr0, rel=1e-12) and wd == pytest.approx(wd0) and betas == betas0, name
