"""What GRPO and SFT share to stop, checkpoint and resume: a Runtime's training state as
checkpoint parts, its restoration (resharded when the checkpoint was saved on another layout),
and the Ctrl-C / SIGTERM flag that ends a run after its step with a checkpoint."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_recycle.train import runtime as rtm

EARLIER_RUNS_DIR = "previous"
# what a GRPO run (`train`) and an SFT run write in their folders: moved aside by a fresh start
GRPO_RUN_FILES = ("checkpoints", "tensorboard", "ranks", "metrics.jsonl", "pool_history.csv", "config.yaml")
SFT_RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "hf", "config.yaml")
# what `megatron-recycle run` leaves in its run directory: GRPO's files, SFT's folder, evaluations, report
PIPELINE_RUN_FILES = GRPO_RUN_FILES + ("sft", "eval", "final_hf", "plots", "report.json", "report.md")


def archive_earlier_run(folder: Path, names: tuple[str, ...], is_rank0: bool, tag: str) -> Path | None:
    """A fresh (not resumed) run in a folder an earlier run used: rank 0 moves that run's
    ``names`` found in ``folder`` into ``folder/previous/<UTC time>/``, so that no later
    ``--resume`` or torchrun restart takes the earlier checkpoints for this run's (or an earlier
    SFT result for this one's), and their logs do not mix. Nothing is deleted. Collective: every
    rank calls it, and none goes on before the move is done. Returns where they went (rank 0)."""
    folder = Path(folder)
    dest = None
    if is_rank0:
        found = [folder / n for n in names if (folder / n).exists()]
        if found:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            dest = folder / EARLIER_RUNS_DIR / stamp
            n = 1
            while dest.exists():
                n += 1
                dest = folder / EARLIER_RUNS_DIR / f"{stamp}-{n}"
            dest.mkdir(parents=True)
            for path in found:
                os.replace(path, dest / path.name)
            print(f"[{tag}] {folder} holds an earlier run (not resuming): moved its "
                  f"{', '.join(p.name for p in found)} to {dest}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return dest


class StopFlag:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the step, checkpoint, exit. A second one: stop now."""

    def __init__(self, tag: str = "train") -> None:
        self.requested = False
        self.tag = tag
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[{self.tag}] stop requested: finishing this step, then writing a checkpoint (again to abort)",
              flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_rank(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it each step)."""
        from megatron_recycle.model.parallel import max_over_world

        return max_over_world(int(self.requested)) > 0


def describe_layout(d: dict) -> str:
    """A LayoutChanged side (checkpoint.LAYOUT_KEYS values and world_size) in words."""
    tp, pp, world = d.get("model.tp") or 1, d.get("model.pp") or 1, d.get("world_size") or 1
    buckets = ""
    if d.get("optim.overlap_grad_reduce"):  # only recorded where they shard the state (checkpoint.py)
        size = d.get("optim.ddp_bucket_size")
        buckets = f" (gradient buckets of {f'{size:,} parameters' if size else 'the default size'})"
    return (f"{world} ranks: TP {tp}, PP {pp}, VPP {d.get('model.vpp') or 1}, DP {world // (tp * pp)}, "
            f"distributed optimizer {'on' if d.get('optim.use_distributed_optimizer') else 'off'}{buckets}")


def _load_resharded(ckpt, rt: rtm.Runtime, layout, tag: str = "train") -> tuple[dict, dict]:
    """Resume a checkpoint saved on another layout (train/reshard.py); returns (shared, this rank's parts)."""
    from megatron_recycle.train.optim import apply_group_hparams
    from megatron_recycle.train.reshard import load_resharded, rng_state_for_new_layout

    if rt.is_rank0:
        print(f"[{tag}] --resume: checkpoint step {layout.step} was saved by {describe_layout(layout.saved)}; this run "
              f"has {describe_layout(layout.current)}: resharding its weights and optimizer state", flush=True)
    t0 = time.perf_counter()
    shared, old = ckpt.load_all(layout.step)
    counts = load_resharded(rt.chunks, rt.optimizer, rt.hf_config, [p.get("model_space") for p in old])
    # The per-group learning-rate bounds and Adam settings the same-layout load takes from the
    # saved optimizer (checkpoints before this record keep this config's, and say so)
    groups = [e for p in old for e in (p.get("optimizer_groups") or [])]
    if groups:
        apply_group_hparams(rt.optimizer, groups)
    elif rt.is_rank0:
        print(f"[{tag}] --resume: this checkpoint predates its optimizer's group settings record: the learning-rate "
              "bounds and Adam settings are this config's", flush=True)
    seconds = time.perf_counter() - t0
    # The scheduler is the same on every rank. RNG streams belong to ranks, which the new layout
    # renumbers: rank r continues old rank (r mod saved ranks)'s streams.
    source = rt.layout.rank % len(old)
    if rt.is_rank0:
        print(f"[{tag}] --resume: resharded {counts['params']} parameter shards and {counts['optimizer_shards']} "
              f"optimizer shards on rank 0 in {seconds:.1f}s (files verified and read); RNG streams: rank r "
              f"continues saved rank r mod {len(old)}", flush=True)
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return shared, {"scheduler": old[0]["scheduler"], "rng": rng_state_for_new_layout(old[source]["rng"], cuda_devices)}


def checkpoint_parts(rt: rtm.Runtime) -> dict[str, Any]:
    """This rank's training state for a checkpoint: model chunks, optimizer (with the distributed
    optimizer's shards), their global-name records for resharding, LR schedule, RNG streams."""
    from megatron_recycle.train.checkpoint import capture_rng_state
    from megatron_recycle.train.optim import group_hparams, optimizer_state_dict
    from megatron_recycle.train.reshard import model_space_records

    return {
        "model": [c.state_dict() for c in rt.chunks],
        "optimizer": optimizer_state_dict(rt.optimizer),
        "optimizer_groups": group_hparams(rt.optimizer),
        "model_space": model_space_records(rt.chunks, rt.optimizer),
        "scheduler": rt.scheduler.state_dict(),
        "rng": capture_rng_state(),
    }


def restore_checkpoint(ckpt, rt: rtm.Runtime, step: int, tag: str) -> dict[str, Any]:
    """Load checkpoint ``step`` into ``rt`` (resharded when it was saved on another layout), with
    its LR schedule and RNG streams; returns its shared part. ``tag`` prefixes the messages."""
    from megatron_recycle.train.checkpoint import LayoutChanged, restore_rng_state
    from megatron_recycle.train.optim import (
        finish_schedule_restore,
        group_hparams,
        hparam_differences,
        load_optimizer_state_dict,
        schedule_differences,
    )

    configured = group_hparams(rt.optimizer)
    try:
        shared, parts = ckpt.load(step)
        for chunk, sd in zip(rt.chunks, parts["model"]):
            chunk.load_state_dict(sd)
        load_optimizer_state_dict(rt.optimizer, parts["optimizer"])
    except LayoutChanged as layout:
        shared, parts = _load_resharded(ckpt, rt, layout, tag)
    changed = schedule_differences(rt.scheduler, parts["scheduler"])
    changed += hparam_differences(configured, group_hparams(rt.optimizer))
    if changed and rt.is_rank0:
        if tag == "train":
            start_over = "train --init-from a Hugging Face export such as RUN_DIR/final_hf or --save-hf DIR"
        else:
            start_over = "`megatron-recycle export RUN_DIR/sft` a checkpoint and start SFT from it as model.name_or_path"
        print(f"[{tag}] --resume: the learning-rate schedule and optimizer settings continue the checkpoint's, "
              f"which differ from this config's: {'; '.join(changed)}. New ones need a new run ({start_over}).",
              flush=True)
    rt.scheduler.load_state_dict(parts["scheduler"])
    finish_schedule_restore(rt.scheduler)
    restore_rng_state(parts["rng"])
    return shared
