"""`megatron-recycle train`: GRPO with query recycling (or a baseline rule over the same pool).

One step, top to bottom (ARCHITECTURE.md "One GRPO step"):
  1. rank 0 samples candidate query ids from the pool and broadcasts them;
  2. each data-parallel replica rolls out its contiguous share (K trajectories per query) on its
     model-parallel leader (native or hf engine; with vllm, every rank of a vLLM TP block takes
     part) and shares them inside the replica;
  3. rewards are gathered to rank 0, which computes the signal flags with
     kernels.grpo_advantages, updates the pool and broadcasts the effective batch (dapo repeats
     1-3 while the pool asks for another generation batch);
  4. each replica computes the advantages of its own groups (kernels.grpo_advantages), then the
     effective batch is balanced over the replicas by token count (any size up to B, no group
     dropped, no hang when it is smaller than DP);
  5. the engine sleeps (vllm: KV cache released); reference log-probs when loss.kl_beta > 0; the
     Megatron GRPO step (token_logprobs + grpo_loss normalized by the global token count; each
     group's shared prompt computed once, logits only at loss positions); one optimizer update
     per rollout batch, so the old log-probs equal the current ones (ratio 1) and are not
     recomputed;
  6. the new weights are exported under Hugging Face names into the rollout engine (nothing to
     do for the native engine, which reads the trainer's tensors), which then wakes;
  7. metrics (JSONL, TensorBoard, one summary line) and an atomic checkpoint every N steps.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_recycle.config import Config, check_against_data
from megatron_recycle.pool import PoolClient, PoolExhausted, RecyclingPool, gather_rows, shard
from megatron_recycle.train import runtime as rtm
from megatron_recycle.train.resume import (
    GRPO_RUN_FILES,
    StopFlag,
    archive_earlier_run,
    checkpoint_parts,
    restore_checkpoint,
)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last checkpoint is left untouched."""


def make_pool(cfg: Config, num_queries: int) -> RecyclingPool:
    p = cfg.pool
    return RecyclingPool(
        num_queries, batch_size=p.batch_size, oversample=p.oversample, strategy=p.strategy,
        consumed_weight=p.consumed_weight, seed=cfg.run.seed, on_exhausted=p.on_exhausted,
        max_gen_batches=p.max_gen_batches,
    )


def rollout_seed(run_seed: int, step: int, gen_batch: int, dp_rank: int) -> int:
    """The sampling seed of one replica's rollouts in one generation batch. It depends on these four
    numbers only, so a resumed run draws exactly the samples the uninterrupted run drew; hashed, so
    no two of them share a seed (a linear mix gave replica 31 of generation batch 0 the seed of
    replica 0 of batch 1 once DP reached 32)."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{gen_batch}/{dp_rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31)


def rollout_share(rt: rtm.Runtime, examples: list, ids: torch.Tensor, step: int, gen_batch: int) -> list:
    """This replica's rollouts for its share of ``ids`` (K per query, grouped, in id order).

    ``hf``: the replica's model-parallel leader generates and shares the result in the replica.
    ``vllm`` (external launcher, an engine on every rank): the ranks of one vLLM TP group agree
    on a plan (the shares of the replicas whose leader is a member, :func:`engines.vllm.rollout_plan`),
    all of them roll it out with identical requests, and each leader keeps its replica's part
    before sharing it in its replica as above.
    """
    from megatron_recycle.agent.rollout import rollout
    from megatron_recycle.engines.base import SamplingParams

    cfg = rt.cfg
    ro = cfg.rollout

    def generate(qids: list[int], dp_rank: int) -> list:
        if not qids:
            return []
        if rt.retriever is None:  # vLLM: ranks other than the leaders take part in generation too
            rt.retriever = rtm.build_retriever_from_config(cfg)
        questions = [(q, examples[q].question, list(examples[q].golden_answers)) for q in qids]
        seed = rollout_seed(cfg.run.seed, step, gen_batch, dp_rank)
        params = SamplingParams(temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens, seed=seed)
        return list(rollout(
            rt.engine, rt.retriever, questions, ro.group_size, params, ro.max_turns, ro.max_total_tokens,
            cfg.retriever.topk, reward_metric=ro.reward, max_passage_words=cfg.retriever.max_passage_words,
        ))

    mine = [int(q) for q in ids.tolist()]
    trajectories = None
    if ro.engine == "vllm" and rt.engine is not None:
        from megatron_recycle.engines.vllm import gather_rollout_plan

        plan = gather_rollout_plan(getattr(rt.engine, "request_group", None), rt.layout.dp_rank, rt.is_mp_leader, mine)
        # One rollout over the whole plan (one vLLM batch); seeded like its first replica's share.
        everything = generate([q for _, share in plan for q in share], plan[0][0] if plan else 0)
        if rt.is_mp_leader:
            offset = 0
            for dp_rank, share in plan:
                n = len(share) * ro.group_size
                if dp_rank == rt.layout.dp_rank:
                    trajectories = everything[offset:offset + n]
                offset += n
    elif rt.is_mp_leader:
        trajectories = generate(mine, rt.layout.dp_rank)
    return rtm.broadcast_from_mp_leader(trajectories)


def balance_groups(groups: list[list[dict]], dp_size: int) -> list[list[list[dict]]]:
    """Assign whole groups to DP ranks so that token counts are even (greedy, largest first).

    Deterministic: every rank computes the same assignment from the same list.
    """
    order = sorted(range(len(groups)), key=lambda i: (-sum(len(t["token_ids"]) for t in groups[i]), i))
    loads = [0] * dp_size
    out: list[list[list[dict]]] = [[] for _ in range(dp_size)]
    for i in order:
        r = min(range(dp_size), key=lambda j: (loads[j], j))
        out[r].append(groups[i])
        loads[r] += sum(len(t["token_ids"]) for t in groups[i])
    return out


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def _gather_groups(local: list[list[dict]]) -> list[list[dict]]:
    """Every replica's chosen groups, concatenated in DP-rank order, on every rank."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return local
    parts: list = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    return [g for part in parts for g in part]


def _gather_records(records: list[dict], reused: int | None) -> tuple[list[dict], int | None]:
    """Every replica's trajectory records (DP-rank order) and the sum of their engines' reused
    prompt tokens (None when the engines do not count them), on every rank."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() == 1:
        return records, reused
    parts: list = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, (records, reused), group=ps.get_data_parallel_group())
    counts = [r for _, r in parts]
    return [rec for part, _ in parts for rec in part], None if None in counts else sum(counts)


def _retriever_counts(rt: rtm.Runtime, reset_only: bool = False) -> dict[str, int]:
    """The retriever counters of this step's searches (timeouts, retries, failed and cut queries,
    queries that matched nothing: agent.retrievers.RetrieverStats), summed over the ranks that
    searched, on rank 0 ({} elsewhere); each rank's counters restart at zero. Each search is sent
    once per model-parallel leader (hf engine) or once per vLLM TP block, whose members all send
    the same requests: the block's first rank counts them. Collective over the world (one small
    object per rank) unless ``reset_only``."""
    retriever = rt.retriever
    mine = None
    if retriever is not None and hasattr(retriever, "stats_snapshot"):
        mine = retriever.stats_snapshot(reset=True)
        if rt.cfg.rollout.engine == "vllm":
            counts = rtm.env_rank() % rt.cfg.rollout.vllm_tp == 0
        else:
            counts = rt.is_mp_leader
        mine = mine if counts else None
    if reset_only:
        return {}
    parts = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    total: dict[str, int] = {}
    for part in parts:
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total if rt.is_rank0 else {}


def group_advantages(rewards: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [G, K], signal [G]) of groups of rewards [G, K] by the config's loss.* rule: one
    rule for both, so that a group the pool consumes as signal-bearing never trains with zero
    advantages (the std estimator decides which tiny spreads count)."""
    from megatron_recycle_kernels import grpo_advantages

    # impl="torch": a few dozen rewards on the host, where the kernels' Triton path does not run
    # even when MEGATRON_RECYCLE_KERNELS_IMPL=triton asks it for the GPU's tensors
    adv, _, _, signal = grpo_advantages(rewards.flatten(), group_size=rewards.shape[1],
                                        norm_by_std=cfg.loss.norm_adv_by_std, unbiased=cfg.loss.unbiased_std,
                                        impl="torch")
    return adv.view(rewards.shape), signal


def collect_step(rt: rtm.Runtime, client: PoolClient, examples: list, step: int) -> tuple[list[list[dict]], dict]:
    """Steps 1-4: sample, roll out, update the pool.

    Returns this replica's share of the effective batch and step info; ``info["effective"]`` (the
    global effective batch size) and ``info["rollouts"]`` are the same on every rank.
    """
    from megatron_recycle.agent.rollout import rollout_metrics, trajectory_record

    cfg, lay = rt.cfg, rt.layout
    k = cfg.rollout.group_size
    _retriever_counts(rt, reset_only=True)  # from here on: this step's searches (not an evaluation's)
    chosen_groups: list[list[dict]] = []
    all_trajs: list = []
    reused_before = getattr(rt.engine, "reused_tokens", None)  # native engine: prefix-store hits
    rewards_all: list[torch.Tensor] = []
    gen_batch = n_effective = n_rollouts = 0
    decisions = []
    exhausted = False
    while True:
        try:
            ids = client.sample()
        except PoolExhausted:
            if gen_batch == 0:
                raise  # nothing drawn for this step: run_grpo ends training before it
            # dapo ran out mid-step: the generation batches drawn so far make the step
            client.close_step()
            exhausted = True
            break
        n_rollouts += ids.numel() * k
        mine = shard(ids, lay.dp_rank, lay.dp)
        trajs = rollout_share(rt, examples, mine, step, gen_batch)
        all_trajs += trajs
        local_rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32).view(len(mine), k)
        rewards = gather_rows(local_rewards, dst=0, group=_dp_group())
        signal_flags = None
        if rt.is_rank0:
            rewards_all.append(rewards)
            signal_flags = group_advantages(rewards, cfg)[1]
        chosen = client.update(ids, rewards, signal_flags)
        n_effective += chosen.numel()
        decisions.append({"sampled": ids.tolist(), "chosen": chosen.tolist()})
        # Advantages of this replica's groups (group statistics need only the group's own rewards).
        if mine.numel():
            adv = group_advantages(local_rewards, cfg)[0]
            keep = set(chosen.tolist())
            for gi, q in enumerate(mine.tolist()):
                if q in keep:
                    chosen_groups.append([
                        {"token_ids": t.token_ids, "loss_mask": t.loss_mask, "advantage": float(adv[gi, j]),
                         "query_id": q}
                        for j, t in enumerate(trajs[gi * k:(gi + 1) * k])
                    ])
        gen_batch += 1
        if not client.needs_more:
            break
    # The rollout metrics cover every replica's trajectories (rank 0 logs them): a few numbers per
    # trajectory gathered over DP, and the prompt tokens each replica's engine reused from the
    # previous turn (native engine's prefix store: keys/values not prefilled again).
    reused = None if reused_before is None else rt.engine.reused_tokens - reused_before
    records, reused_all = _gather_records([trajectory_record(t) for t in all_trajs], reused)
    info = {"rollout": rollout_metrics(records) if records else {}, "effective": n_effective,
            "rollouts": n_rollouts, "decisions": decisions, "exhausted": exhausted}
    if reused_all is not None and info["rollout"]:
        info["rollout"]["prefix_reused_tokens"] = float(reused_all)
    info["retriever"] = _retriever_counts(rt)
    if rt.is_rank0:
        r = torch.cat(rewards_all)
        info["reward_mean"] = float(r.mean())
    mine_after = balance_groups(_gather_groups(chosen_groups), lay.dp)[lay.dp_rank]
    return mine_after, info


def _batch_from_groups(groups: list[list[dict]], rt: rtm.Runtime):
    from megatron_recycle.train.batch import build_batch

    pad = rt.tokenizer.pad_token_id if rt.tokenizer.pad_token_id is not None else 0
    mbs = rt.cfg.optim.micro_batch_size
    trajs = [t for g in groups for t in g]
    if not trajs:  # this replica got no group: one all-masked row keeps the collectives in step
        return build_batch([[pad, pad]], [[0, 0]], advantages=[0.0], pad_token_id=pad, pad_rows_to_multiple_of=mbs)
    masks = [list(t["loss_mask"]) for t in trajs]
    for m in masks:
        m[0] = 0  # nothing predicts the first token
    group_ids = [g for g, group in enumerate(groups) for _ in group]  # group packing shares each group's prompt
    return build_batch([t["token_ids"] for t in trajs], masks, advantages=[t["advantage"] for t in trajs],
                       pad_token_id=pad, pad_rows_to_multiple_of=mbs, group_ids=group_ids)


def _describe_packing(cfg: Any, chunks: list) -> str:
    """How the training step lays out groups, for the start line: packed groups name the attention
    route of their GroupAttentionPlans (the device's default, or $MEGATRON_RECYCLE_PACKED_ATTENTION's),
    or the dense tree mask when the model's attention does not always take plans; groups stay padded
    when it cannot pack them at all (the step warns why, once)."""
    if not cfg.optim.pack_groups or cfg.rollout.group_size < 2:
        return "padded groups"
    from megatron_recycle.model.attention import ROUTE_ENV, _forced_route, packed_route
    from megatron_recycle.train.packing import packing_supported, plans_always_apply

    if packing_supported(chunks) is not None:
        return "padded groups (this model's attention cannot pack them)"
    if not plans_always_apply(chunks):
        return "packed groups, attention by the dense tree mask"
    device = next(chunks[0].parameters()).device
    forced = f" ({ROUTE_ENV})" if _forced_route() is not None else ""
    return f"packed groups, attention {packed_route(device)}{forced}"


def run_grpo(cfg: Config, resume: bool = False, init_from: str | None = None) -> dict[str, Any]:
    """The GRPO loop; returns a summary of the run."""
    from megatron_recycle.model.build import resolve_layer_spec_name
    from megatron_recycle.train.checkpoint import CheckpointManager, atomic_write_text
    from megatron_recycle.train.metrics import (
        MetricsWriter,
        format_step_line,
        memory_metrics,
        rss_gib,
        write_pool_history,
    )
    from megatron_recycle.train.pipeline import resume_after_restart
    from megatron_recycle.train.step import GRPOLossConfig, compute_logprobs, grpo_train_step

    run_dir = cfg.run_dir
    # Decided and acted on before the set-up (model build, weight load, engine start: where a run
    # most often crashes): a torchrun restart of a fresh run that died there must find this run's
    # folder, not resume the earlier run's checkpoints that the archive would have moved aside.
    resume = resume_after_restart(cfg, resume, "train", "from the newest checkpoint")
    if not resume:
        archive_earlier_run(run_dir, GRPO_RUN_FILES, rtm.env_rank() == 0, "train")
    paths = rtm.ensure_data(cfg)
    examples = rtm.read_examples(paths["train"], cfg, cfg.data.max_train_queries)
    train_set = rtm.training_set_digest(examples)  # what the pool's query ids index
    check_against_data(cfg, len(examples))
    # Read now, so that an empty or malformed dev file stops the run before training, not at the
    # first evaluation (with every step since the last checkpoint lost).
    dev_examples = rtm.read_examples(paths["dev"], cfg, cfg.eval.max_examples) if cfg.train.eval_every else None
    model_path = init_from or cfg.model.name_or_path
    rt = rtm.setup_runtime(cfg, model_path=model_path, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                           total_steps=cfg.train.steps)
    rt.retriever = rtm.build_retriever_from_config(cfg) if rt.is_mp_leader else None
    lay = rt.layout
    if rt.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    pool = make_pool(cfg, len(examples)) if rt.is_rank0 else None
    client = PoolClient(pool)
    ckpt = CheckpointManager(run_dir, keep_last=cfg.run.keep_last, rank=lay.rank, world_size=lay.world_size,
                             config_dict=cfg.to_dict(), layer_spec=resolve_layer_spec_name(cfg.model.layer_spec))
    # The reference model before any restore: building it draws random initial weights, which
    # would move the RNG states a resume restores.
    ref_chunks = _reference_model(rt) if cfg.loss.kl_beta > 0 else None
    # what the KL term is measured against, kept in every checkpoint: a resume must use the same
    reference = _reference_identity(rt) if ref_chunks is not None else None
    start_step, rollouts_done = 0, 0
    if resume:
        latest = ckpt.latest_agreed()
        if latest is None:
            if rt.is_rank0:
                print(f"[train] --resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0",
                      flush=True)
        else:
            shared = restore_checkpoint(ckpt, rt, latest, "train")
            check_reference(shared.get("reference_model"), reference, rt.is_rank0)
            rtm.check_training_set(shared.get("train_set"), train_set, "questions", paths["train"])
            if pool is not None:
                pool.load_state_dict(shared["pool"])
                # the history file as of this checkpoint (a crash may have come before it was written)
                write_pool_history(run_dir, pool.history_table())
            start_step, rollouts_done = int(shared["step"]), int(shared["rollouts"])
            rtm.sync_engine_weights(rt)
            if rt.is_rank0:
                print(f"[train] resumed from {run_dir / 'checkpoints'} step {start_step}", flush=True)
    if rt.is_rank0:  # after a refused resume it still describes the checkpoints (`export` reads it)
        atomic_write_text(cfg.to_yaml(), run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir, enabled=rt.is_rank0, resume_step=start_step if resume else None)
    decisions = _DecisionLog(run_dir, lay.rank, start_step if resume else None)
    loss_cfg = GRPOLossConfig(eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, clip_c=cfg.loss.clip_c,
                              kl_beta=cfg.loss.kl_beta, agg=cfg.loss.agg, max_len=cfg.loss.max_len,
                              temperature=cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0)
    if rt.is_rank0:
        from megatron_recycle.model.build import describe_memory_options, unwrap_model
        from megatron_recycle.train.optim import describe_grad_reduction

        memory = ", ".join(x for x in (describe_memory_options(unwrap_model(rt.chunks[0]).config),
                                       describe_grad_reduction(rt.chunks), _describe_packing(cfg, rt.chunks)) if x)
        print(f"[train] {cfg.pool.strategy}: {len(examples)} queries, B={cfg.pool.batch_size} k={cfg.pool.oversample} "
              f"K={cfg.rollout.group_size}, steps {start_step}->{cfg.train.steps}, world {lay.world_size} "
              f"(tp {lay.tp} pp {lay.pp} dp {lay.dp}{', ' + memory if memory else ''})", flush=True)
    summary: dict[str, Any] = {"steps": 0, "stopped": False}
    last_saved = start_step
    with StopFlag() as stop:
        for step in range(start_step, cfg.train.steps):
            if cfg.train.rollout_budget and rollouts_done >= cfg.train.rollout_budget:
                print(f"[train] rollout budget {cfg.train.rollout_budget} reached", flush=True)
                break
            t0 = time.perf_counter()
            try:
                groups, info = collect_step(rt, client, examples, step)
            except PoolExhausted as e:  # pool.on_exhausted=stop, on every rank: end as configured
                print(f"[train] {e}: training ends before step {step} (pool.on_exhausted=stop)", flush=True)
                summary["exhausted"] = True
                break
            t1 = time.perf_counter()
            n_eff = info["effective"]
            record: dict[str, Any] = {"step": step}
            train_metrics: dict[str, Any] = {}
            t_ref = 0.0
            if n_eff > 0:
                if rt.engine is not None:  # rollouts done: release the engine's KV cache (and weights) for training
                    rt.engine.sleep()
                batch = _batch_from_groups(groups, rt)
                if ref_chunks is not None:
                    tr = time.perf_counter()
                    batch = batch.replace(ref_logprobs=compute_logprobs(
                        ref_chunks, batch, cfg.optim.micro_batch_size, temperature=loss_cfg.temperature,
                        pack_groups=cfg.optim.pack_groups, only_loss_positions=True))
                    t_ref = time.perf_counter() - tr
                train_metrics = grpo_train_step(rt.chunks, rt.optimizer, rt.scheduler, batch,
                                                cfg.optim.micro_batch_size, loss_cfg, pack_groups=cfg.optim.pack_groups)
                # resident memory in the training phase, with the engine asleep (its KV cache released)
                if (rss := rss_gib()) is not None:
                    train_metrics["rss_gib"] = rss
                if getattr(rt.engine, "kv_released_bytes", 0):
                    train_metrics["engine_kv_released_gib"] = rt.engine.kv_released_bytes / 2**30
                if not (math.isfinite(train_metrics["loss"]) and math.isfinite(train_metrics.get("grad_norm", 0.0))):
                    raise TrainingDiverged(
                        f"step {step}: loss={train_metrics['loss']} grad_norm={train_metrics.get('grad_norm')}; "
                        f"stopping without writing a checkpoint (the newest one is step {last_saved}); "
                        "lower optim.lr or check the rewards"
                    )
            t2 = time.perf_counter()
            if n_eff > 0:
                rtm.sync_engine_weights(rt)  # load_weights maps the engine's weights back first (vLLM sleep levels 1 and 2)
                if rt.engine is not None:  # then the KV cache, before the next rollouts
                    rt.engine.wake()
            t3 = time.perf_counter()
            dev_eval = None
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                # Logged in this step's record (the policy after this step's update), so that it
                # shares the step's line and a resume from the checkpoint after it keeps it.
                dev_eval = _periodic_eval(rt, dev_examples, step)
            t4 = time.perf_counter()
            s = pool.stats() if pool is not None else {}
            rollouts_done += info["rollouts"]
            decisions.write(step, info["decisions"])
            if rt.is_rank0:
                record.update({k: v for k, v in s.items() if k != "step"})
                record["batch_size"] = cfg.pool.batch_size
                record.update({f"train/{k}": v for k, v in train_metrics.items()})
                record.update({f"rollout/{k}": v for k, v in info["rollout"].items()})
                record.update({f"retriever/{k}": v for k, v in info["retriever"].items()})
                record.update(reward_mean=info.get("reward_mean"), em_mean=info["rollout"].get("em_mean"),
                              rollouts_total=rollouts_done, **memory_metrics())
                record.update({"time/rollout": t1 - t0, "time/logprob": t_ref, "time/train": t2 - t1 - t_ref,
                               "time/sync": t3 - t2, "time/step": t3 - t0})
                if dev_eval is not None:
                    record.update({f"eval/dev_{k}": v for k, v in dev_eval.items()})
                    record["time/eval"] = t4 - t3
                gen_tokens = info["rollout"].get("generated_tokens", 0)
                if gen_tokens:
                    record["throughput/rollout_tok_per_s"] = gen_tokens / max(t1 - t0, 1e-9)
                if train_metrics.get("tokens"):
                    record["throughput/train_tok_per_s"] = train_metrics["tokens"] / max(t2 - t1 - t_ref, 1e-9)
                metrics.log(step, record)
                if (step + 1) % cfg.run.log_every == 0:
                    print(format_step_line(record), flush=True)
                if dev_eval is not None:
                    print(f"[eval] after step {step} (update {step + 1}) dev Pass@1 {dev_eval['pass@1']:.3f}", flush=True)
            summary = {"steps": step + 1, "last": record, "stopped": False}
            stopping = stop.any_rank()
            if stopping or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                _save(ckpt, rt, pool, step + 1, rollouts_done, reference, train_set)
                last_saved = step + 1
            if stopping:
                print(f"[train] stopped after {step + 1} steps (the last logged as step {step}); resume with --resume",
                      flush=True)
                summary["stopped"] = True
                break
            if info["exhausted"]:
                print(f"[train] the pool ran out during step {step} (pool.on_exhausted=stop): training ends "
                      "after it", flush=True)
                summary["exhausted"] = True
                break
    final_step = summary["steps"] if summary["steps"] else start_step
    if last_saved != final_step:
        _save(ckpt, rt, pool, final_step, rollouts_done, reference, train_set)  # with pool_history.csv, as every save
    metrics.close()
    summary["run_dir"] = str(run_dir)
    summary["runtime"] = rt
    return summary


class _DecisionLog:
    """Per-rank record of the pool decisions each rank received (ranks/rank_R.jsonl).

    Cheap (ids only) and what a distributed run is debugged with: every rank must hold the same
    sampled ids and effective batches. On resume, lines of steps >= the resumed step are dropped.
    """

    def __init__(self, run_dir: Path, rank: int, resume_step: int | None) -> None:
        import json

        from megatron_recycle.train.checkpoint import atomic_write_text

        self._json = json
        self.path = Path(run_dir) / "ranks" / f"rank_{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < resume_step:
                        keep.append(line)
                except (ValueError, KeyError):
                    continue
            atomic_write_text("".join(line + "\n" for line in keep), self.path)
        elif resume_step is None:
            self.path.write_text("")

    def write(self, step: int, decisions: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.write(self._json.dumps({"step": step, "gen_batches": decisions}) + "\n")


def _save(ckpt, rt: rtm.Runtime, pool, step: int, rollouts: int, reference: dict | None = None,
          train_set: str | None = None) -> None:
    from megatron_recycle.train.metrics import write_pool_history

    shared = {"step": step, "rollouts": rollouts, "pool": pool.state_dict() if pool is not None else None,
              "reference_model": reference, "train_set": train_set}
    ckpt.save(step, checkpoint_parts(rt), shared)
    if pool is not None:  # rank 0: pool_history.csv as of this checkpoint, so that a crash leaves one
        write_pool_history(rt.cfg.run_dir, pool.history_table())
    if rt.is_rank0:
        # step_N holds the state after N steps, the last of which the log numbers N-1 (from 0)
        print(f"[train] checkpoint after {step} steps -> {ckpt.dir / f'step_{step}'}", flush=True)


def _reference_identity(rt: rtm.Runtime) -> dict:
    """The KL reference's starting model: its path (``--init-from`` or model.name_or_path) and the
    digest of its weights (rank 0 hashes them; the others get rank 0's)."""
    from megatron_recycle.model.hf_loading import model_digest

    ident = {"path": str(rt.model_path), "digest": model_digest(rt.model_path) if rt.is_rank0 else None}
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [ident]
        dist.broadcast_object_list(holder, src=0)
        ident = holder[0]
    return ident


def check_reference(saved: dict | None, current: dict | None, is_rank0: bool) -> None:
    """Refuse a resume whose KL reference would differ from the checkpoint's run (same decision on
    every rank: both sides are the same everywhere). A checkpoint without the record (written
    before it existed, or by a run without a KL term) is not checked."""
    from megatron_recycle.train.checkpoint import CheckpointError

    if saved is None or current is None:
        if saved is not None and current is None and is_rank0:
            print("[train] --resume: the checkpoint's run had a KL term (loss.kl_beta > 0) and this one has none",
                  flush=True)
        return
    if saved.get("digest") == current.get("digest") and (saved.get("digest") or saved["path"] == current["path"]):
        return
    raise CheckpointError(
        f"--resume: this run's KL reference model is {current['path']} but the checkpoint's run measured its KL "
        f"against {saved['path']}" + (" (the same path, other weights now)" if saved["path"] == current["path"] else "")
        + f"; resume with --init-from {saved['path']} as it was (an SFT result must not have been rewritten "
        "since), or start a new run"
    )


def _reference_model(rt: rtm.Runtime) -> list:
    """A frozen copy of the initial policy for the KL term (same layout, no optimizer)."""
    from megatron_recycle.model.build import build_model_chunks, unwrap_model
    from megatron_recycle.model.convert import load_hf_weights
    from megatron_recycle.model.hf_loading import resolve_model_folder
    from megatron_recycle.train.optim import gloo_p2p_settings

    chunks = build_model_chunks(rt.hf_config, bf16=rt.cfg.model.bf16, layer_spec=rt.cfg.model.layer_spec,
                                **rtm.model_options(rt.cfg.model))
    load_hf_weights(chunks, resolve_model_folder(rt.model_path, cache_dir=rt.cfg.model.cache_dir), rt.hf_config)
    for c in chunks:
        c.requires_grad_(False)
        c.eval()
    gloo_p2p_settings(unwrap_model(chunks[0]).config, len(chunks))  # the config object all its chunks share
    return chunks


def _periodic_eval(rt: rtm.Runtime, examples: list, step: int) -> dict[str, Any] | None:
    """Dev-set Pass@1 after training step ``step``, sharded like the rollouts: each vLLM TP block
    (with ``rollout.engine=vllm``) or each data-parallel replica's model-parallel leader evaluates
    its share of the batches; rank 0 gathers and gets the overall numbers (None on other ranks),
    which the caller logs in the step's record. Collective: every rank calls it."""
    from megatron_recycle.evaluate import evaluate, gather_on_rank0

    cfg = rt.cfg
    lay = rt.layout
    if rtm.engine_kind(cfg) == "vllm":
        block = cfg.rollout.vllm_tp  # every rank of a block issues the block's requests
        shard = (lay.rank // block, lay.world_size // block)
    else:
        shard = (lay.dp_rank, lay.dp) if rt.is_mp_leader else None
    if shard is not None and rt.retriever is None:
        rt.retriever = rtm.build_retriever_from_config(cfg)
    holds = shard is not None
    res = evaluate(rt.engine if holds else None, rt.retriever if holds else None, examples,
                   **(rtm.eval_settings(cfg) | {"seed": cfg.run.seed + step + 1}), progress=False, shard=shard,
                   gather=gather_on_rank0 if lay.world_size > 1 else None)
    return None if res is None else dict(res["overall"])
