"""Worker functions for the training-step tests; each runs on every rank under tests/train/_dist.py.

Usage (by the launcher): ``python _workers.py <fn> <outdir> <json args>``; rank r's return value
is saved to ``<outdir>/rank<r>.pt``. Everything is deterministic from fixed seeds, so runs with
different TP/PP/DP layouts start from the same weights and see the same global batch.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")

LR_SGD = 1.0  # SGD without momentum and lr 1: the weight change of one step IS the gradient
N_GLOBAL, SEQ = 8, 12


def tiny_llama(tie: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny Llama-shaped HF config (GQA, tied embeddings) and seeded random fp32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, initializer_range=0.2,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # non-trivial norm weights so that their gradients are checked too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_qwen3() -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny Qwen3-shaped HF config (per-head q/k norms, GQA, tied) and seeded random fp32 weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2,
    )
    torch.manual_seed(4321)
    model = Qwen3ForCausalLM(cfg).float()
    with torch.no_grad():  # non-trivial norm weights (the q/k norms included) so their gradients count
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def global_batch() -> dict[str, torch.Tensor]:
    """Seeded global batch: ragged lengths (right padding), prompts of 2-4 tokens, some zero advantages."""
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, 96, (N_GLOBAL, SEQ), generator=g)
    mask = torch.zeros(N_GLOBAL, SEQ)
    for i in range(N_GLOBAL):
        prompt = 2 + i % 3
        length = SEQ - (i % 4)
        mask[i, prompt:length] = 1.0
        tokens[i, length:] = 0
    adv = torch.randn(N_GLOBAL, generator=g)
    adv[3] = 0.0
    return {
        "tokens": tokens, "loss_mask": mask, "advantages": adv,
        "old_noise": 0.3 * torch.randn(N_GLOBAL, SEQ - 1, generator=g),
        "ref_noise": 0.2 * torch.randn(N_GLOBAL, SEQ - 1, generator=g),
    }


def _dp_all_gather(t: torch.Tensor) -> torch.Tensor:
    """The data-parallel ranks' ``t`` concatenated, on the CPU (gathered on the GPU under NCCL)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_recycle.pool import _comm_device  # the GPU under NCCL, else the CPU

    if ps.get_data_parallel_world_size() == 1:
        return t.cpu()
    group = ps.get_data_parallel_group()
    t = t.to(_comm_device(group)).contiguous()
    out = [torch.empty_like(t) for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather(out, t, group=group)
    return torch.cat(out, 0).cpu()


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (dicts, lists and tuples walked), so that what a
    rank returns compares with any other rank's result, CPU or GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple takes its fields positionally
        return type(obj)(*(_on_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _direct_logprobs64(chunks: list, batch: Any) -> torch.Tensor | None:
    """float64 log_softmax over the FULL vocabulary of the model's own logits (TP shards gathered).

    Only possible without PP (one stage holds the whole model); returns None with PP > 1.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_recycle.model.build import unwrap_model

    if ps.get_pipeline_model_parallel_world_size() > 1:
        return None
    model = unwrap_model(chunks[0])
    dev = next(model.parameters()).device  # the GPU when there is one; the batch is on the CPU
    b, seq = batch.tokens.shape
    tokens = batch.tokens.to(dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(b, seq)
    with torch.no_grad():
        logits = model(tokens, pos, None)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    lsm = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    return lsm.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()


def _model_options(args: dict) -> dict:
    """model.build.memory_options from the job's "recompute", "recompute_method",
    "recompute_num_layers" and "sp" (sequence parallelism)."""
    from megatron_recycle.model.build import memory_options

    return memory_options(args.get("recompute", "none"), args.get("recompute_method", "uniform"),
                          args.get("recompute_num_layers", 1), args.get("sp", False))


class _CallCounter:
    """Counts the forward calls of every decoder layer, of every core attention (recomputation
    calls them again in the backward pass) and of the group-packed block attention."""

    def __init__(self, chunks: list) -> None:
        from megatron_recycle.model import attention
        from megatron_recycle.model.build import unwrap_model

        self.layers = self.cores = self.group_calls = 0
        self._group_attention = attention.group_attention

        def counted(*a, **k):  # the block attention over group-packed rows (the plan's path)
            self.group_calls += 1
            return self._group_attention(*a, **k)

        attention.group_attention = counted
        self.layer_inputs: set[tuple[int, ...]] = set()
        self.handles = []
        for chunk in chunks:
            for layer in unwrap_model(chunk).decoder.layers:
                self.handles.append(layer.register_forward_pre_hook(self._layer, with_kwargs=True))
                self.handles.append(layer.self_attention.core_attention.register_forward_pre_hook(self._core))

    def _layer(self, module, args, kwargs):
        self.layers += 1
        hidden = args[0] if args else kwargs["hidden_states"]
        self.layer_inputs.add(tuple(hidden.shape))

    def _core(self, module, args):
        self.cores += 1

    def counts(self) -> dict:
        from megatron_recycle.model import attention

        attention.group_attention = self._group_attention
        for h in self.handles:
            h.remove()
        return {"layers": self.layers, "cores": self.cores, "group_calls": self.group_calls,
                "layer_inputs": sorted(self.layer_inputs)}


def _dp_share() -> tuple[Any, dict, dict, Any, slice, Any]:
    """(HF config, weights, global batch, this DP rank's contiguous share, its rows of the global
    batch, a load_weights callable) for the tiny Llama under the current parallel layout."""
    from megatron.core import parallel_state as ps

    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch, shard_for_data_parallel

    cfg, sd = tiny_llama()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gb = global_batch()
    local = shard_for_data_parallel(TrajectoryBatch(gb["tokens"], gb["loss_mask"], gb["advantages"]), dp_rank, dp)
    share = N_GLOBAL // dp
    return cfg, sd, gb, local, slice(dp_rank * share, (dp_rank + 1) * share), lambda c: load_hf_weights(c, sd, cfg)


def grpo_layout(args: dict) -> dict:
    """One layout: log-probs, one SGD GRPO step per micro-batch size (-> gradient), three clipped Adam steps.

    With "recompute"/"sp" in ``args`` the model recomputes activations / runs sequence parallel;
    ``out["calls"][mbs]`` then counts the layer and core-attention calls of the SGD step."""
    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    cfg, sd, gb, local, rows, load = _dp_share()
    loss_cfg = GRPOLossConfig(kl_beta=0.05, clip_c=3.0, compute_entropy=True, agg=args.get("agg", "token-mean"))
    out: dict[str, Any] = {"grads": {}, "sgd_metrics": {}, "calls": {}}
    options = _model_options(args)

    for mbs in args["mbs_list"]:
        chunks, opt, sched = setup_model_and_optimizer(
            # megatron's distributed optimizer supports Adam only: the SGD gradient probe uses the
            # plain one; DDP's gradient reduction (the part under test) is the same for both.
            cfg, lr=LR_SGD, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0, lr_decay_style="constant",
            use_distributed_optimizer=False, load_weights=load, model_options=options,
        )
        lp = compute_logprobs(chunks, local, mbs)
        if mbs == args["mbs_list"][0]:
            out["logprobs"] = _dp_all_gather(lp)
            direct = _direct_logprobs64(chunks, local)
            out["direct_logprobs64"] = None if direct is None else _dp_all_gather(direct)
            lp_full = out["logprobs"]
            old_full = lp_full + gb["old_noise"]
            ref_full = lp_full + gb["ref_noise"]
            out.update(old_logprobs=old_full, ref_logprobs=ref_full)
        step_batch = local.replace(old_logprobs=out["old_logprobs"][rows], ref_logprobs=out["ref_logprobs"][rows])
        counter = _CallCounter(chunks)
        metrics = grpo_train_step(chunks, opt, sched, step_batch, mbs, loss_cfg)
        out["calls"][mbs] = counter.counts()
        w1 = export_hf_state_dict_to_cpu(chunks, cfg)
        out["grads"][mbs] = {k: (sd[k] - w1[k]) / LR_SGD for k in w1}
        out["sgd_metrics"][mbs] = metrics

    # Two Adam steps with gradient clipping active and a warm-up schedule.
    mbs = args["mbs_list"][0]
    chunks, opt, sched = setup_model_and_optimizer(
        cfg, lr=1e-2, clip_grad=0.05, weight_decay=0.01, warmup_steps=1, total_steps=4,
        use_distributed_optimizer=args["dist_opt"], load_weights=load, model_options=options,
    )
    step_batch = local.replace(old_logprobs=out["old_logprobs"][rows], ref_logprobs=out["ref_logprobs"][rows])
    out["adam_metrics"] = [grpo_train_step(chunks, opt, sched, step_batch, mbs, loss_cfg) for _ in range(3)]
    out["adam_weights"] = export_hf_state_dict_to_cpu(chunks, cfg)
    out["rank_logprobs"] = lp
    return out


def sequence_parallel_padding(args: dict) -> dict:
    """TP 2 with and without sequence parallelism on a batch whose length (11) is not a multiple of
    tp, in grouped (group-packed) and plain form, with selective or no recomputation, on the tiny
    Llama or (``kind="qwen3"``) a tiny Qwen3 with per-head q/k norms: log-probs (every position, and
    only the loss positions) and the SGD gradient of one GRPO step."""
    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu, load_hf_weights
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    cfg, sd = tiny_qwen3() if args.get("kind") == "qwen3" else tiny_llama()
    gb = global_batch()
    batch = _paired_batch(args["packed"])  # pairs share their first 3 (loss-free) tokens: a packed prefix
    loss_cfg = GRPOLossConfig(kl_beta=0.05, clip_c=3.0)
    out: dict[str, Any] = {}
    for sp in (False, True):
        chunks, opt, sched = setup_model_and_optimizer(
            cfg, lr=LR_SGD, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0, lr_decay_style="constant",
            load_weights=lambda c: load_hf_weights(c, sd, cfg),
            model_options=_model_options({"sp": sp, "recompute": args.get("recompute", "none")}),
        )
        lp_all = compute_logprobs(chunks, batch, 4)
        lp_loss = compute_logprobs(chunks, batch, 4, only_loss_positions=True)
        step_batch = batch.replace(old_logprobs=lp_all + gb["old_noise"][:, : SEQ - 2],
                                   ref_logprobs=lp_all + gb["ref_noise"][:, : SEQ - 2])
        counter = _CallCounter(chunks)
        metrics = grpo_train_step(chunks, opt, sched, step_batch, 4, loss_cfg)
        w1 = export_hf_state_dict_to_cpu(chunks, cfg)
        out[sp] = {
            "lp_all": lp_all, "lp_loss": lp_loss, "metrics": metrics, "calls": counter.counts(),
            "grads": {k: (sd[k] - w1[k]) / LR_SGD for k in w1},
            "norm_types": sorted({type(m).__name__ for c in chunks for n, m in c.named_modules() if "norm" in n}),
        }
    return out


def _paired_batch(packed: bool, length: int = SEQ - 1) -> Any:
    """The global batch cut to ``length`` with pairs of rows sharing their first 3 (loss-free)
    tokens: GRPO groups of 2 whose shared prompt group packing computes once (group ids only
    when ``packed``)."""
    from megatron_recycle.train.batch import TrajectoryBatch

    gb = global_batch()
    tokens, mask = gb["tokens"][:, :length].clone(), gb["loss_mask"][:, :length].clone()
    tokens[1::2, :3] = tokens[0::2, :3]
    mask[:, :3] = 0.0
    group_ids = torch.arange(N_GLOBAL) // 2
    return TrajectoryBatch(tokens, mask, gb["advantages"], group_ids=group_ids if packed else None)


def pipeline_packing(args: dict) -> dict:
    """Group-packed vs padded rows on this pipeline layout (4 micro-batches of 2 sequences, so
    1F1B runs a later micro-batch's forward before an earlier one's backward), without and with
    each recomputation in ``args["recompute_list"]`` (and sequence parallelism with ``args["sp"]``):
    log-probs (all positions, loss positions only), the SGD gradient of one GRPO step, its
    metrics and the attention call counts."""
    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu, load_hf_weights
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    loss_cfg = GRPOLossConfig(kl_beta=0.05, clip_c=3.0)
    out: dict[str, Any] = {}
    for recompute in args["recompute_list"]:
        for packed in (False, True):
            batch = _paired_batch(packed)
            chunks, opt, sched = setup_model_and_optimizer(
                cfg, lr=LR_SGD, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0, lr_decay_style="constant",
                load_weights=lambda c: load_hf_weights(c, sd, cfg),
                model_options=_model_options({"recompute": recompute, "recompute_num_layers": 1,
                                              "sp": args.get("sp", False)}),
            )
            lp_all = compute_logprobs(chunks, batch, 2)
            lp_loss = compute_logprobs(chunks, batch, 2, only_loss_positions=True)
            width = batch.seq_length - 1
            step_batch = batch.replace(old_logprobs=lp_all + gb["old_noise"][:, :width],
                                       ref_logprobs=lp_all + gb["ref_noise"][:, :width])
            counter = _CallCounter(chunks)
            metrics = grpo_train_step(chunks, opt, sched, step_batch, 2, loss_cfg)
            w1 = export_hf_state_dict_to_cpu(chunks, cfg)
            out[(recompute, packed)] = {
                "lp_all": lp_all, "lp_loss": lp_loss, "metrics": metrics, "calls": counter.counts(),
                "grads": {k: (sd[k] - w1[k]) / LR_SGD for k in w1},
                "plans_left": sum("group_plans" in m.__dict__ for c in chunks for m in c.modules()),
            }
    return out


def overlap_grad_reduce(args: dict) -> dict:
    """The same layout with and without Megatron DDP's overlapped gradient reduction (buckets of
    ``args["bucket"]`` parameters, several micro-batches): the SGD gradient of one GRPO step, the
    weights and metrics of three clipped Adam steps, and, per step, where each bucket group's
    reduction was dispatched: "backward" (by a gradient hook while autograd runs), "finish" (by
    finalize_model_grads after the schedule) or "schedule" (by the pipeline schedule in between)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import param_and_grad_buffer as pgb

    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu
    from megatron_recycle.train.optim import describe_grad_reduction, setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    cfg, sd, gb, local, rows, load = _dp_share()
    loss_cfg = GRPOLossConfig(kl_beta=0.05, clip_c=3.0)
    mbs = args["mbs"]

    starts: list[str] = []  # one entry per bucket-group reduction dispatched
    group_cls = pgb._ParamAndGradBucketGroup
    original_start, original_finish = group_cls.start_grad_sync, group_cls.finish_grad_sync
    finishing = [False]

    def start(self, *a, **k):
        if not (self.is_first_batch and self.grad_reduce_handle is not None):  # else Megatron's no-op
            in_backward = torch._C._current_graph_task_id() != -1
            starts.append("backward" if in_backward else "finish" if finishing[0] else "schedule")
        return original_start(self, *a, **k)

    def finish(self, *a, **k):
        finishing[0] = True
        try:
            return original_finish(self, *a, **k)
        finally:
            finishing[0] = False

    group_cls.start_grad_sync, group_cls.finish_grad_sync = start, finish
    out: dict[str, Any] = {}
    try:
        for overlap in (False, True):
            kw = {"overlap_grad_reduce": overlap, "ddp_bucket_size": args["bucket"] if overlap else None}
            chunks, opt, sched = setup_model_and_optimizer(
                cfg, lr=LR_SGD, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0, lr_decay_style="constant",
                load_weights=load, **kw,
            )
            lp = _dp_all_gather(compute_logprobs(chunks, local, mbs))
            step_batch = local.replace(old_logprobs=(lp + gb["old_noise"])[rows], ref_logprobs=(lp + gb["ref_noise"])[rows])
            grpo_train_step(chunks, opt, sched, step_batch, mbs, loss_cfg)
            w1 = export_hf_state_dict_to_cpu(chunks, cfg)
            res = {"grads": {k: (sd[k] - w1[k]) / LR_SGD for k in w1}}
            chunks, opt, sched = setup_model_and_optimizer(
                cfg, lr=1e-2, clip_grad=0.05, weight_decay=0.01, warmup_steps=1, total_steps=4,
                use_distributed_optimizer=args["dist_opt"], load_weights=load, **kw,
            )
            res["bucket_groups"] = sum(len(m.bucket_groups) for m in chunks)
            res["describe"] = describe_grad_reduction(chunks)
            res["adam_metrics"], res["starts"] = [], []
            for _ in range(3):
                starts.clear()
                res["adam_metrics"].append(grpo_train_step(chunks, opt, sched, step_batch, mbs, loss_cfg))
                res["starts"].append(list(starts))
            res["adam_weights"] = export_hf_state_dict_to_cpu(chunks, cfg)
            out[overlap] = res
    finally:
        group_cls.start_grad_sync, group_cls.finish_grad_sync = original_start, original_finish
    out["first_stage"] = ps.is_pipeline_first_stage(ignore_virtual=True)
    return out


def length_grouping(args: dict) -> dict:
    """Padded rows of very different lengths (4 to 12 tokens), micro-batches of 2: loss-position
    log-probs and the SGD gradient of one GRPO step with length-grouped micro-batches (the
    default) and with every micro-batch at the batch's width (step.LENGTH_GROUPING off), and the
    decoder-layer input shapes of each."""
    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu, load_hf_weights
    from megatron_recycle.train import step as step_mod
    from megatron_recycle.train.batch import TrajectoryBatch
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    tokens, mask = gb["tokens"].clone(), gb["loss_mask"].clone()
    lengths = [12, 5, 9, 4, 12, 7, 6, 10]  # interleaved long and short rows
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
        mask[i, n:] = 0.0
        mask[i, :2] = 0.0
    batch = TrajectoryBatch(tokens, mask, gb["advantages"])
    loss_cfg = GRPOLossConfig(kl_beta=0.05, clip_c=3.0, compute_entropy=True)
    out: dict[str, Any] = {}
    try:
        for grouping in (True, False):
            step_mod.LENGTH_GROUPING = grouping
            chunks, opt, sched = setup_model_and_optimizer(
                cfg, lr=LR_SGD, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0, lr_decay_style="constant",
                load_weights=lambda c: load_hf_weights(c, sd, cfg),
            )
            lp = compute_logprobs(chunks, batch, 2, only_loss_positions=True)
            step_batch = batch.replace(old_logprobs=lp + gb["old_noise"], ref_logprobs=lp + gb["ref_noise"])
            counter = _CallCounter(chunks)
            metrics = grpo_train_step(chunks, opt, sched, step_batch, 2, loss_cfg)
            calls = counter.counts()
            w1 = export_hf_state_dict_to_cpu(chunks, cfg)
            out[grouping] = {"lp": lp, "metrics": metrics, "layer_inputs": calls["layer_inputs"],
                             "grads": {k: (sd[k] - w1[k]) / LR_SGD for k in w1}}
    finally:
        step_mod.LENGTH_GROUPING = True
    out["mask"] = mask
    return out


def uneven_micro_batches(args: dict) -> dict:
    """Batches of the first 6 and 2 rows with micro-batch size 2 (3 and 1 micro-batches, a GRPO
    step's row count varies with its signal-bearing groups): log-probs, the SGD gradient of one
    GRPO step and one SFT step's loss. Under PP=2 x VPP=2 the interleaved schedule takes only a
    multiple of PP micro-batches, so the step pads with all-masked rows; one process is the reference."""
    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu, load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step, sft_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    out: dict[int, Any] = {}
    for rows in (6, 2):
        batch = TrajectoryBatch(gb["tokens"][:rows], gb["loss_mask"][:rows], gb["advantages"][:rows])
        chunks, opt, sched = setup_model_and_optimizer(
            cfg, lr=LR_SGD, clip_grad=0.0, optimizer="sgd", sgd_momentum=0.0, lr_decay_style="constant",
            load_weights=lambda c: load_hf_weights(c, sd, cfg), model_options=_model_options(args),
        )
        lp = compute_logprobs(chunks, batch, 2)
        step_batch = batch.replace(old_logprobs=lp + gb["old_noise"][:rows], ref_logprobs=lp + gb["ref_noise"][:rows])
        metrics = grpo_train_step(chunks, opt, sched, step_batch, 2, GRPOLossConfig(kl_beta=0.05))
        w1 = export_hf_state_dict_to_cpu(chunks, cfg)
        sft = sft_train_step(chunks, opt, sched, batch, 2)
        out[rows] = {"logprobs": lp, "grads": {k: (sd[k] - w1[k]) / LR_SGD for k in w1},
                     "loss": metrics["loss"], "sft_loss": sft["loss"], "pad_rows": metrics["schedule_pad_rows"],
                     "sft_pad_rows": sft["schedule_pad_rows"]}
    return out


def sft_steps(args: dict) -> dict:
    """A few SFT steps on one tiny batch: the masked next-token loss must go down."""
    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import sft_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    batch = TrajectoryBatch(gb["tokens"], gb["loss_mask"])
    chunks, opt, sched = setup_model_and_optimizer(
        cfg, lr=3e-3, clip_grad=1.0, lr_decay_style="constant", load_weights=lambda c: load_hf_weights(c, sd, cfg)
    )
    return [sft_train_step(chunks, opt, sched, batch, args.get("mbs", 4)) for _ in range(args["steps"])]


def grpo_bf16(args: dict) -> dict:
    """bf16 parameters (Float16Module, fp32 main weights), distributed optimizer: log-probs and two steps."""
    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch
    from megatron_recycle.train.optim import setup_model_and_optimizer
    from megatron_recycle.train.step import compute_logprobs, grpo_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    batch = TrajectoryBatch(gb["tokens"], gb["loss_mask"], gb["advantages"])
    chunks, opt, sched = setup_model_and_optimizer(
        cfg, lr=1e-2, bf16=True, use_distributed_optimizer=True, lr_decay_style="constant",
        load_weights=lambda c: load_hf_weights(c, sd, cfg),
    )
    lp = compute_logprobs(chunks, batch, args.get("mbs", 4))
    metrics = [grpo_train_step(chunks, opt, sched, batch.replace(old_logprobs=lp), args.get("mbs", 4))
               for _ in range(2)]
    return {"logprobs": lp, "metrics": metrics, "param_dtypes": sorted({str(p.dtype) for p in chunks[0].parameters()})}


def optimizer_resume(args: dict) -> dict:
    """Save the optimizer state as a checkpoint does (train.step.optimizer_state_dict) before any
    step and after two Adam steps, load it into freshly built optimizers, and take the next step
    on both sides. Also a run that resumes the weights but not the optimizer (what a resume with
    Megatron's DistributedOptimizer.state_dict() alone amounted to), to show the state matters."""
    import copy
    import io

    from megatron.core import parallel_state as ps

    from megatron_recycle.model.convert import export_hf_state_dict_to_cpu, load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch, shard_for_data_parallel
    from megatron_recycle.train.optim import (
        load_optimizer_state_dict,
        optimizer_state_dict,
        setup_model_and_optimizer,
    )
    from megatron_recycle.train.step import compute_logprobs, grpo_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    full = TrajectoryBatch(gb["tokens"], gb["loss_mask"], gb["advantages"])
    local = shard_for_data_parallel(full, dp_rank, dp)
    mbs = 2

    def build():
        return setup_model_and_optimizer(
            cfg, lr=1e-2, clip_grad=1.0, weight_decay=0.01, bf16=args["bf16"], lr_decay_style="constant",
            use_distributed_optimizer=args["dist_opt"], load_weights=lambda c: load_hf_weights(c, sd, cfg),
            overlap_grad_reduce=bool(args.get("bucket")), ddp_bucket_size=args.get("bucket"),
        )

    def step(chunks, opt, sched):
        lp = compute_logprobs(chunks, local, mbs)
        return grpo_train_step(chunks, opt, sched, local.replace(old_logprobs=lp + 0.1), mbs)

    def through_bytes(obj):  # the checkpoint's path: torch.save, then torch.load(weights_only=True)
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    out: dict[str, Any] = {}
    chunks, opt, sched = build()
    never_stepped = through_bytes(optimizer_state_dict(opt))
    for _ in range(2):
        step(chunks, opt, sched)
    saved_model = copy.deepcopy([c.state_dict() for c in chunks])
    saved_opt = through_bytes(optimizer_state_dict(opt))
    saved_sched = copy.deepcopy(sched.state_dict())
    out["metrics"] = step(chunks, opt, sched)
    out["weights"] = export_hf_state_dict_to_cpu(chunks, cfg)

    for name, with_opt in (("resumed", True), ("weights_only", False)):
        chunks, opt, sched = build()
        for c, s in zip(chunks, saved_model):
            c.load_state_dict(s)
        if with_opt:
            load_optimizer_state_dict(opt, saved_opt)
        sched.load_state_dict(saved_sched)
        out[f"{name}_metrics"] = step(chunks, opt, sched)
        out[f"{name}_weights"] = export_hf_state_dict_to_cpu(chunks, cfg)

    # a state saved before the first step loads and gives the first step of a fresh optimizer
    chunks, opt, sched = build()
    first = step(chunks, opt, sched)
    out["first_weights"] = export_hf_state_dict_to_cpu(chunks, cfg)
    chunks, opt, sched = build()
    load_optimizer_state_dict(opt, never_stepped)
    out["first_after_load_metrics"] = step(chunks, opt, sched)
    out["first_after_load_weights"] = export_hf_state_dict_to_cpu(chunks, cfg)
    out["first_metrics"] = first
    try:  # Megatron's own state_dict() alone, as checkpoints held it before
        legacy = opt.state_dict()
        load_optimizer_state_dict(opt, legacy)
        out["legacy"] = "loaded"
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["legacy"] = f"{type(e).__name__}: {e}"
    return out


def schedule_resume(args: dict) -> dict:
    """Resume a checkpoint (resume.restore_checkpoint) on the same layout and as a resharded one,
    with a config that changed the learning rate, warm-up, weight decay and Adam's beta2: both
    must continue the saved run's schedule and settings, update for update. Before, the
    resharded path ran at the new config's lr and betas, a warm-up continued from this config's
    start value, and the first update used this config's weight decay."""
    import io
    from types import SimpleNamespace

    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch
    from megatron_recycle.train.checkpoint import LayoutChanged
    from megatron_recycle.train.optim import setup_model_and_optimizer, torch_optimizers
    from megatron_recycle.train.resume import checkpoint_parts, restore_checkpoint
    from megatron_recycle.train.step import compute_logprobs, grpo_train_step

    cfg, sd = tiny_llama()
    gb = global_batch()
    batch = TrajectoryBatch(gb["tokens"], gb["loss_mask"], gb["advantages"])

    def build(lr, warmup, wd, beta2):
        chunks, opt, sched = setup_model_and_optimizer(
            cfg, lr=lr, weight_decay=wd, warmup_steps=warmup, total_steps=10, lr_decay_style="cosine",
            adam_beta2=beta2, load_weights=lambda c: load_hf_weights(c, sd, cfg))
        return SimpleNamespace(chunks=chunks, optimizer=opt, scheduler=sched, hf_config=cfg, is_rank0=True,
                               layout=SimpleNamespace(rank=0))

    def settings(rt):
        return [(g["lr"], g["weight_decay"], tuple(g["betas"]))
                for inner in torch_optimizers(rt.optimizer) for g in inner.param_groups]

    def updates(rt, n=3):
        seen = []
        for _ in range(n):
            seen.append(settings(rt))  # what the next update runs with
            lp = compute_logprobs(rt.chunks, batch, 2)
            grpo_train_step(rt.chunks, rt.optimizer, rt.scheduler, batch.replace(old_logprobs=lp + 0.1), 2)
        return seen

    rt = build(1e-3, 4, 0.01, 0.999)
    updates(rt, 2)  # stopped in the warm-up
    buf = io.BytesIO()
    torch.save(checkpoint_parts(rt), buf)
    out = {"straight": updates(rt)}

    class Ckpt:
        def __init__(self, resharded):
            self.resharded = resharded

        def _parts(self):
            buf.seek(0)
            return torch.load(buf, weights_only=True)

        def load(self, step):
            if self.resharded:
                raise LayoutChanged("another layout", step, {"world_size": 2}, {"world_size": 1})
            return {}, self._parts()

        def load_all(self, step):
            return {}, [self._parts()]

    for name, resharded in (("same_layout", False), ("resharded", True)):
        other = build(5e-3, 0, 0.1, 0.95)
        restore_checkpoint(Ckpt(resharded), other, 2, "train")
        out[name] = updates(other)
    return out


def _full_model_space(files: list[Path], cfg: Any) -> dict[str, Any]:
    """Every kind of saved tensor (weights, fp32 main weights, Adam moments, step) by HF name, from
    the model-space records of a layout's rank files (train/reshard.py's reading side)."""
    from megatron_recycle.train.reshard import SavedModelSpace

    saved = SavedModelSpace([torch.load(f, map_location="cpu", weights_only=True)["model_space"] for f in files], cfg)
    full = {kind: {hf: saved.getter(kind)(hf).clone() for hf in sorted(saved.owner_of)}
            for kind in ["weight", "main", *saved.state_keys]}
    full["scalars"] = {k: v.clone() for k, v in saved.scalar_state().items()}
    return full


def reshard_stage(args: dict) -> dict:
    """One layout of a resharding chain (tests/train/test_reshard.py): either take two Adam steps
    from the seeded weights (the first stage) or load the previous stage's saved model-space
    records with train.reshard.load_resharded; then save this layout's own records, and take one
    more step (also from a copy with the weights but fresh optimizer moments, as a control).
    ``args["bucket"]``: overlapped gradient reduction with buckets of that many parameters.
    Rank 0 returns the full saved state and the main weights after the next step, by HF name."""
    import io

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.train.batch import TrajectoryBatch, shard_for_data_parallel
    from megatron_recycle.train.optim import (
        optimizer_state_dict,
        setup_model_and_optimizer,
        torch_optimizers,
    )
    from megatron_recycle.train.reshard import load_resharded, model_space_records
    from megatron_recycle.train.step import compute_logprobs, grpo_train_step

    cfg, sd = tiny_llama(tie=args.get("tie", True))
    gb = global_batch()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = shard_for_data_parallel(TrajectoryBatch(gb["tokens"], gb["loss_mask"], gb["advantages"]), dp_rank, dp)
    folder = Path(args["dir"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    def build():
        return setup_model_and_optimizer(
            cfg, lr=1e-2, clip_grad=1.0, weight_decay=0.01, bf16=args["bf16"], lr_decay_style="constant",
            use_distributed_optimizer=args["dist_opt"], load_weights=lambda c: load_hf_weights(c, sd, cfg),
            overlap_grad_reduce=bool(args.get("bucket")), ddp_bucket_size=args.get("bucket"),
        )

    def step(chunks, opt, sched):
        lp = compute_logprobs(chunks, local, 2)  # ratios near 1, away from the clip edges
        return grpo_train_step(chunks, opt, sched, local.replace(old_logprobs=lp + 0.1), 2)

    def save(chunks, opt, name):
        torch.save({"model_space": model_space_records(chunks, opt)}, folder / f"{name}_rank{rank}.pt")
        if dist.is_initialized():
            dist.barrier()
        files = sorted(folder.glob(f"{name}_rank*.pt"))
        return _full_model_space(files, cfg) if rank == 0 else None

    def load(chunks, opt):
        files = sorted(folder.glob(f"{args['load_from']}_rank*.pt"))
        records = [torch.load(f, map_location="cpu", weights_only=True, mmap=True)["model_space"] for f in files]
        return load_resharded(chunks, opt, cfg, records)

    out: dict[str, Any] = {"world": world}
    chunks, opt, sched = build()
    # this rank's optimizer shards (with the distributed optimizer: its slices of the buckets)
    out["shard_shapes"] = [tuple(p.shape) for inner in torch_optimizers(opt) for g in inner.param_groups
                           for p in g["params"]]
    if args.get("load_from"):
        out["counts"] = load(chunks, opt)
    else:
        for _ in range(2):
            step(chunks, opt, sched)
    out["saved"] = save(chunks, opt, args["name"])
    out["bytes"] = {}  # what the records add to a checkpoint's rank file
    for key, with_records in (("without", False), ("with", True)):
        buf = io.BytesIO()
        part = {"model": [c.state_dict() for c in chunks], "optimizer": optimizer_state_dict(opt)}
        if with_records:
            part["model_space"] = model_space_records(chunks, opt)
        torch.save(part, buf)
        out["bytes"][key] = buf.tell()
    out["metrics"] = step(chunks, opt, sched)
    out["next"] = save(chunks, opt, args["name"] + "_next")
    if args.get("load_from"):
        chunks, opt, sched = build()
        load(chunks, opt)
        for inner in torch_optimizers(opt):
            inner.state.clear()  # the weights and main weights, but new moments and step count
        step(chunks, opt, sched)
        out["control"] = save(chunks, opt, args["name"] + "_control")
    return out


def ensure_data_once(args: dict) -> dict:
    """ensure_data on every rank of a torchrun world that no one has set up yet (what `train` does
    before the trainer), with the generator replaced by one that records who ran it and writes the
    three files slowly: only rank 0 may run it, and every rank must return after the files exist."""
    import time

    from megatron_recycle.config import Config
    from megatron_recycle.train import runtime as rtm

    folder = Path(args["dir"])

    def fake_generate(cfg):
        (folder / f"generated_by_{os.environ['RANK']}").write_text("")
        time.sleep(1.0)  # a rank that did not wait would find nothing
        for name in ("train", "dev", "test"):
            (folder / f"{name}.jsonl").write_text("{}\n")

    rtm.generate_data = fake_generate
    cfg = Config()
    cfg.data.dir = str(folder)
    initialized_before = torch.distributed.is_initialized()
    paths = rtm.ensure_data(cfg)
    return {"initialized_before": initialized_before, "initialized_after": torch.distributed.is_initialized(),
            "files": sorted(p.name for p in folder.iterdir()), "train_exists": paths["train"].is_file()}


def run_jobs(args: dict) -> dict:
    """Run several jobs in the same processes (saves the interpreter start-up, several seconds each).

    ``args["jobs"]``: list of [name, worker function, layout and worker args]. Megatron's
    parallel_state is rebuilt for each job's TP/PP/VPP layout over the same process group.
    """
    from megatron.core import parallel_state as ps

    from megatron_recycle.model.parallel import destroy_distributed, init_distributed

    cfg, _ = tiny_llama()
    results = {}
    for name, fn, job in args["jobs"]:
        init_distributed(job.get("tp", 1), job.get("pp", 1), job.get("vpp"), seed=0, model_config=cfg)
        results[name] = globals()[fn](job)
        ps.destroy_model_parallel()
    destroy_distributed()
    return results


def fused_adam_step_reshard(args: dict) -> dict:
    """A fused Adam (apex, transformer-engine) counts its steps per param group (an int), not per
    parameter: save the model-space records of an optimizer holding step 2 that way and load them
    with train.reshard.load_resharded into a fresh one (tests/train/test_reshard.py)."""
    import io

    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.train.optim import setup_model_and_optimizer, torch_optimizers
    from megatron_recycle.train.reshard import SavedModelSpace, load_resharded, model_space_records

    cfg, sd = tiny_llama(tie=False)

    def build():
        return setup_model_and_optimizer(cfg, lr=1e-2, clip_grad=1.0, weight_decay=0.01, bf16=False,
                                         lr_decay_style="constant", use_distributed_optimizer=False,
                                         load_weights=lambda c: load_hf_weights(c, sd, cfg))

    def count(n):  # an int, or (a capturable fused Adam) a one-element tensor
        return torch.tensor([float(n)]) if args.get("tensor_step") else n

    chunks, opt, _ = build()
    for inner in torch_optimizers(opt):  # what a fused Adam holds after two steps
        for g in inner.param_groups:
            g["step"] = count(2)
            for p in g["params"]:
                inner.state[p] = {"exp_avg": torch.full_like(p, 0.1), "exp_avg_sq": torch.full_like(p, 0.01)}
    buf = io.BytesIO()  # through bytes, as the checkpoint stores them
    torch.save(model_space_records(chunks, opt), buf)
    buf.seek(0)
    records = torch.load(buf, weights_only=True)
    chunks, opt, _ = build()
    for inner in torch_optimizers(opt):
        for g in inner.param_groups:
            g["step"] = count(0)
    load_resharded(chunks, opt, cfg, [records])
    return {
        "saved_scalars": {k: float(v) for k, v in SavedModelSpace([records], cfg).scalar_state().items()},
        "group_steps": sorted({float(g["step"]) for inner in torch_optimizers(opt) for g in inner.param_groups}),
        "step_types": sorted({type(g["step"]).__name__ for inner in torch_optimizers(opt) for g in inner.param_groups}),
        "per_param_steps": sum("step" in st for inner in torch_optimizers(opt) for st in inner.state.values()),
        "moments_carried": all(bool((st["exp_avg"] == 0.1).all()) and bool((st["exp_avg_sq"] == 0.01).all())
                               for inner in torch_optimizers(opt) for st in inner.state.values()),
    }


def main() -> None:
    fn, outdir, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    result = globals()[fn](args)
    torch.save(_on_cpu(result), Path(outdir) / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
