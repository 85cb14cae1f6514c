"""`megatron-recycle sft`: the supervised warm-up on oracle search trajectories.

Each oracle row (written by the synthetic generator) is tokenized segment by segment exactly as a
rollout would build it: the rendered prompt (loss 0), then every ``generated`` segment (loss 1)
and ``information`` block (loss 0) in order. Training is masked next-token cross-entropy through
the same Megatron step machinery as GRPO (train.step.sft_train_step). The result is saved as a
Hugging Face folder (``<run_dir>/sft/hf``) that the GRPO phase starts from.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_recycle.agent.protocol import observation_token_ids, prompt_token_ids
from megatron_recycle.config import Config
from megatron_recycle.train import runtime as rtm


class SFTDataError(ValueError):
    """A malformed oracle trajectory row (file and line in the message)."""


def tokenize_oracle(row: dict, tokenizer, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on policy-written segments) of one oracle trajectory."""
    ids = prompt_token_ids(tokenizer, row["question"])  # exactly as a rollout starts
    mask = [0] * len(ids)
    for turn in row["turns"]:
        for key, m in (("generated", 1), ("information", 0)):
            text = turn.get(key)
            if not text:
                continue
            seg = (observation_token_ids(tokenizer, text) if key == "information"
                   else tokenizer(text, add_special_tokens=False)["input_ids"])
            ids += seg
            mask += [m] * len(seg)
    if len(ids) > max_tokens:  # keep the prompt and the start; a cut trajectory still teaches the format
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def read_oracle_file(path: Path, skip_bad_rows: bool = False) -> list[dict]:
    rows, skipped = [], 0
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                if not isinstance(row.get("question"), str) or not isinstance(row.get("turns"), list) or not row["turns"]:
                    raise ValueError("needs a 'question' string and a non-empty 'turns' list")
                for t in row["turns"]:
                    if not isinstance(t, dict) or not isinstance(t.get("generated"), str):
                        raise ValueError("every turn needs a 'generated' string")
                    if t.get("information") is not None and not isinstance(t["information"], str):
                        raise ValueError("a turn's 'information' must be a string")
            except ValueError as e:
                if not skip_bad_rows:
                    raise SFTDataError(f"{path}:{line_no}: malformed oracle trajectory: {e}") from None
                skipped += 1
                if rtm.env_rank() == 0:  # every rank reads the file; one of them reports
                    print(f"[sft] {path}:{line_no}: skipped malformed row ({e})", flush=True)
                continue
            rows.append(row)
    if not rows:
        raise SFTDataError(f"{path}: no usable oracle trajectories")
    if skipped and rtm.env_rank() == 0:
        print(f"[sft] skipped {skipped} malformed rows in {path}", flush=True)
    return rows


# The config keys an SFT checkpoint must share with the run that resumes it (what the saved model,
# optimizer and data order mean); the layout keys may differ (the resume then reshards).
SFT_RESUME_KEYS: tuple[str, ...] = (
    "model.name_or_path", "model.tp", "model.pp", "model.vpp", "model.bf16",
    "data.dir", "data.skip_bad_rows", "sft.batch_size", "sft.max_examples", "rollout.max_total_tokens",
    "optim.use_distributed_optimizer", "optim.overlap_grad_reduce", "optim.ddp_bucket_size",
)


def replica_rows(encoded: list, take: list[int], dp_rank: int, dp: int, pad: int) -> tuple[list, list]:
    """This DP replica's rows of the global batch ``take`` (every dp-th example from dp_rank on):
    token ids and loss masks (nothing predicts a row's first token). A replica left without an
    example (sft.batch_size < DP size) gets one all-masked row, so that it joins the step's
    collectives without adding tokens to the global normalizer or weight to any example."""
    share = take[dp_rank::dp]
    if not share:
        return [[pad, pad]], [[0, 0]]
    return [encoded[i][0] for i in share], [[0] + encoded[i][1][1:] for i in share]


def run_sft(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run the SFT warm-up; returns the path of the saved Hugging Face folder and the losses.

    With ``sft.save_every`` > 0 the state (model, optimizer, schedule, RNG streams, the data order
    still to come) is checkpointed under ``RUN_DIR/sft/checkpoints``; ``resume`` continues from the
    newest complete one, and the run ends as the uninterrupted one would."""
    from megatron_recycle.model.build import resolve_layer_spec_name
    from megatron_recycle.model.convert import save_hf_checkpoint
    from megatron_recycle.train.batch import build_batch
    from megatron_recycle.train.checkpoint import CheckpointManager, atomic_write_text
    from megatron_recycle.train.metrics import MetricsWriter
    from megatron_recycle.train.pipeline import resume_after_restart
    from megatron_recycle.train.resume import (
        SFT_RUN_FILES,
        StopFlag,
        archive_earlier_run,
        checkpoint_parts,
        restore_checkpoint,
    )
    from megatron_recycle.train.step import sft_train_step

    out_dir = cfg.run_dir / "sft"
    # before the set-up, where a run most often crashes: a torchrun restart of this fresh run must
    # not find an earlier SFT's checkpoints still in place and resume them
    resume = resume_after_restart(cfg, resume, "sft", "from the newest SFT checkpoint, sft.save_every")
    if not resume:  # an earlier SFT's checkpoints and result would be taken for this one's
        archive_earlier_run(out_dir, SFT_RUN_FILES, rtm.env_rank() == 0, "sft")
    paths = rtm.ensure_data(cfg)
    rows = read_oracle_file(paths["sft"], cfg.data.skip_bad_rows)
    if cfg.sft.max_examples:
        rows = rows[: cfg.sft.max_examples]
    train_set = rtm.training_set_digest(rows)  # what the saved data order indexes
    rt = rtm.setup_runtime(cfg, model_path=cfg.model.name_or_path, lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps,
                           total_steps=max(cfg.sft.steps, 1), with_engine=False)
    lay = rt.layout
    if rt.is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    encoded = [tokenize_oracle(r, rt.tokenizer, cfg.rollout.max_total_tokens) for r in rows]
    pad = rt.tokenizer.pad_token_id if rt.tokenizer.pad_token_id is not None else 0
    rng = random.Random(cfg.run.seed)
    order: list[int] = []
    losses: list[float] = []
    start = 0
    ckpt = CheckpointManager(out_dir, keep_last=cfg.run.keep_last, rank=lay.rank, world_size=lay.world_size,
                             config_dict=cfg.to_dict(), resume_keys=SFT_RESUME_KEYS,
                             layer_spec=resolve_layer_spec_name(cfg.model.layer_spec))
    if resume:
        latest = ckpt.latest_agreed()
        if latest is None:
            if rt.is_rank0:
                print(f"[sft] --resume: no complete checkpoint in {ckpt.dir}; starting from step 0", flush=True)
        else:
            shared = restore_checkpoint(ckpt, rt, latest, "sft")
            rtm.check_training_set(shared.get("train_set"), train_set, "SFT rows", paths["sft"])
            start, order, losses = int(shared["step"]), list(shared["order"]), list(shared["losses"])
            rng.setstate(shared["data_rng"])
            if rt.is_rank0:
                print(f"[sft] resumed from {ckpt.dir} step {start}", flush=True)
    if rt.is_rank0:  # what `megatron-recycle export RUN_DIR/sft` reads; after a refused resume, still the old one
        atomic_write_text(cfg.to_yaml(), out_dir / "config.yaml")
    metrics = MetricsWriter(out_dir, enabled=rt.is_rank0, resume_step=start if resume else None)
    b, mbs = cfg.sft.batch_size, cfg.optim.micro_batch_size
    if rt.is_rank0:
        print(f"[sft] {len(encoded)} oracle trajectories, steps {start}->{cfg.sft.steps}, batches of {b}, lr {cfg.sft.lr}",
              flush=True)
    t_start = time.perf_counter()
    stop_requested = False
    with StopFlag("sft") as stop:
        for step in range(start, cfg.sft.steps):
            if len(order) < b:
                perm = list(range(len(encoded)))
                rng.shuffle(perm)
                order += perm
            take, order = order[:b], order[b:]
            ids, masks = replica_rows(encoded, take, lay.dp_rank, lay.dp, pad)
            batch = build_batch(ids, masks, pad_token_id=pad, pad_rows_to_multiple_of=mbs)
            m = sft_train_step(rt.chunks, rt.optimizer, rt.scheduler, batch, mbs)
            losses.append(m["loss"])
            if rt.is_rank0:
                metrics.log(step, {"step": step, **{f"sft/{k}": v for k, v in m.items()}})
                elapsed = time.perf_counter() - t_start
                print(f"[sft] step {step + 1}/{cfg.sft.steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                      f"grad_norm {m['grad_norm']:.2f} {m['time/step_s']:.1f}s "
                      f"(ETA {elapsed / (step + 1 - start) * (cfg.sft.steps - step - 1):.0f}s)", flush=True)
            done = step + 1
            stop_requested = stop.any_rank()  # on the last step: SFT finishes, and `run` stops after it
            stopped = stop_requested and done < cfg.sft.steps
            if stopped or (cfg.sft.save_every and done % cfg.sft.save_every == 0 and done < cfg.sft.steps):
                shared = {"step": done, "order": order, "losses": losses, "data_rng": rng.getstate(),
                          "train_set": train_set}
                ckpt.save(done, checkpoint_parts(rt), shared)
                if rt.is_rank0:
                    print(f"[sft] checkpoint after {done} steps -> {ckpt.step_dir(done)}", flush=True)
            if stopped:
                if rt.is_rank0:  # no Hugging Face folder: `run --resume` would take it for the finished SFT
                    print(f"[sft] stopped after {done} steps; resume with --resume", flush=True)
                metrics.close()
                return {"hf_dir": None, "losses": losses, "runtime": rt, "stopped": True, "steps": done}
    hf_dir = out_dir / "hf"
    save_hf_checkpoint(rt.chunks, rt.hf_config, hf_dir, tokenizer=rt.tokenizer, generation_config=rt.generation_config)
    if rt.is_rank0:
        print(f"[sft] saved {hf_dir}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    metrics.close()
    return {"hf_dir": str(hf_dir), "losses": losses, "runtime": rt, "stopped": False, "steps": cfg.sft.steps,
            "stop_requested": stop_requested}

