"""Atomic, verified training checkpoints shared by every rank, plus RNG capture/restore.

Layout under ``<run_dir>/checkpoints/``::

    step_120/                  a COMPLETE checkpoint (only ever appears by a rename)
        manifest.json          step, world size, config fingerprint + hash, size and sha256 of every file
        shared.pt              written once by rank 0: pool state, step, data cursor, config, ...
        rank_00000.pt          each rank's own objects: model shard, optimizer shard, RNG states, ...
        rank_00001.pt
    step_130.tmp-3f2a9c...     a save in progress (or a crashed one; removed by the next save)
    step_100.trash-8d1e07...   an old checkpoint being pruned (renamed first; removed by the next save)

A save writes everything under ``step_N.tmp-<id>/`` (each file to a temporary name, flushed,
fsync'ed, then renamed), waits for every rank, and only then rank 0 writes ``manifest.json`` and
renames the folder to ``step_N``. A process killed at any point therefore leaves either the old
set of complete checkpoints or the new one, never a ``step_N`` that is incomplete. The run
directory must be on a file system every rank sees (as for any multi-node checkpoint). Ranks
agree through torch.distributed object collectives (on NCCL, set the CUDA device first). Tensors
load onto the CPU; ``load_state_dict`` copies them to the model's device.

Resuming compares the config keys in ``RESUME_KEYS`` (what changes the meaning of the saved
state: model layout, pool, training data, group size, optimizer layout); everything else (lr,
logging, evaluation, ...) may change between the save and the resume. When only the layout keys
(``LAYOUT_KEYS``) or the world size differ, ``load`` raises :class:`LayoutChanged` and
:meth:`CheckpointManager.load_all` hands every saved rank's parts to train/reshard.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARED_FILE = "shared.pt"
FORMAT_VERSION = 1

# Config keys (dotted; a section name means the whole section) that must be equal between the run
# that saved a checkpoint and the run that resumes it. run.seed is one: the RNG states are
# restored from the checkpoint, but every rollout's and dev evaluation's sampling seed is derived
# from it. Left out on purpose: the rest of run.* (names, save cadence), optim.lr and the schedule
# knobs (a resumed run may change its learning rate), loss.*, rollout sampling knobs, eval.*,
# retriever.* and the data file paths of the dev/test splits.
RESUME_KEYS: tuple[str, ...] = (
    "run.seed",
    "model.name_or_path",
    "model.tp",
    "model.pp",
    "model.vpp",
    "model.bf16",
    "pool",  # strategy, B, k, consumed weight, exhaustion rule, dapo batches
    "data.dir",
    "data.train_file",
    "data.max_train_queries",
    "rollout.group_size",
    "optim.use_distributed_optimizer",  # changes how the optimizer state is sharded
    "optim.overlap_grad_reduce",  # (with the distributed optimizer only, see CONDITIONAL_KEYS)
    "optim.ddp_bucket_size",
)

# Keys older checkpoints fingerprinted that no longer need to match: model.layer_spec is checked as
# the spec it resolved to (the manifest's layer_spec), so 'auto' and the 'local' it meant agree.
RETIRED_KEYS: tuple[str, ...] = ("model.layer_spec",)

# The RESUME_KEYS that only say how the state is sharded: when they (or the world size) differ, a
# resume goes through train/reshard.py instead of loading each rank's file as it is.
LAYOUT_KEYS: tuple[str, ...] = ("model.tp", "model.pp", "model.vpp", "optim.use_distributed_optimizer",
                                "optim.overlap_grad_reduce", "optim.ddp_bucket_size")


def _buckets_shard_the_state(config_dict: dict[str, Any]) -> bool:
    """The distributed optimizer gives each rank a slice of every gradient bucket, so with overlapped
    reduction (several buckets) the bucket size decides which part of each tensor's optimizer state
    a rank's file holds; without the distributed optimizer or without overlap (one bucket) it
    decides nothing that is saved."""
    return bool(_lookup(config_dict, "optim.use_distributed_optimizer")) and bool(
        _lookup(config_dict, "optim.overlap_grad_reduce"))


# RESUME_KEYS that shape the saved state only under a condition: they are fingerprinted only then,
# so that changing them where they change nothing needs no resharding, and checkpoints written
# before the keys existed keep their hash.
CONDITIONAL_KEYS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "optim.overlap_grad_reduce": _buckets_shard_the_state,
    "optim.ddp_bucket_size": _buckets_shard_the_state,
}

_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = "rank_{:05d}.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match this run."""


class LayoutChanged(CheckpointError):
    """The checkpoint matches this run except for its parallel layout (LAYOUT_KEYS, world size):
    :meth:`CheckpointManager.load_all` and train/reshard.py resume it."""

    def __init__(self, message: str, step: int, saved: dict[str, Any], current: dict[str, Any]) -> None:
        super().__init__(message)
        self.step, self.saved, self.current = step, saved, current


# ------------------------------------------------------------------------------ config hash
def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_fingerprint(config_dict: dict[str, Any], keys: tuple[str, ...] = RESUME_KEYS) -> dict[str, Any]:
    """The values of the resume-relevant config keys (missing keys read as None; CONDITIONAL_KEYS
    only where their condition holds), JSON-ready."""
    return {k: json.loads(json.dumps(_lookup(config_dict, k), sort_keys=True, default=str)) for k in keys
            if k not in CONDITIONAL_KEYS or CONDITIONAL_KEYS[k](config_dict)}


def config_hash(config_dict: dict[str, Any], keys: tuple[str, ...] = RESUME_KEYS) -> str:
    """sha256 of the canonical JSON of ``config_fingerprint``: equal hashes mean a compatible config."""
    text = json.dumps(config_fingerprint(config_dict, keys), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ file writing
class _HashingWriter:
    """File-like wrapper that hashes and counts the bytes torch.save writes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_torch_save(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save to ``path`` via a temporary name (flushed, fsync'ed, renamed); returns size and sha256."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": w.size, "sha256": w.sha.hexdigest()}


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old
    file or the new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------- collectives
def _dist_active(world_size: int) -> bool:
    if world_size == 1:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise CheckpointError(
            f"world_size={world_size} but torch.distributed is not initialized: initialize the process "
            "group before saving, or pass world_size=1 for a single process"
        )
    return True


def _cause(e: BaseException) -> str:
    """``Type: message`` of an error, with the OSError behind it when there is one (torch.save on a
    full disk raises "RuntimeError: [enforce fail at inline_container.cc] . unexpected pos",
    whose cause, ENOSPC, only its chained exception names)."""
    text = f"{type(e).__name__}: {e}"
    inner, seen = e, set()
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(inner, OSError) and inner is not e:
            return f"{text} (caused by {type(inner).__name__}: {inner})"
        inner = inner.__cause__ or inner.__context__
    return text


def _broadcast_str(value: str, world_size: int) -> str:
    if not _dist_active(world_size):
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    if not _dist_active(world_size):
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Save, find and load the checkpoints of one run; every rank makes the same calls.

    ``save`` is collective (every rank must call it with the same step); ``latest`` and ``load``
    are not. ``fault_hook`` (tests only) is called with a point name during ``save``: "rank_file",
    "shared_file", "before_manifest", "before_rename", "between_renames" (re-saving an existing
    step), "after_rename".
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int = 2,
        rank: int = 0,
        world_size: int = 1,
        config_dict: dict[str, Any] | None = None,
        resume_keys: tuple[str, ...] = RESUME_KEYS,
        fault_hook: Callable[[str], None] | None = None,
        layer_spec: str | None = None,
    ) -> None:
        """``layer_spec``: the layer spec the model was built with ('local' or 'te', resolved, not
        'auto'); recorded in the manifest, and a checkpoint of the other spec is refused on load
        (transformer-engine's layers fuse the layer norms into the linear layers: other parameter
        names). None: neither recorded nor checked."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (complete checkpoints kept), got {keep_last}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.config_dict = dict(config_dict or {})
        self.resume_keys = tuple(resume_keys)
        self.fingerprint = config_fingerprint(self.config_dict, self.resume_keys)
        self.config_hash = config_hash(self.config_dict, self.resume_keys)
        self.fault_hook = fault_hook
        self.layer_spec = layer_spec

    def _hook(self, point: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point)

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step}"

    # ---------------------------------------------------------------------------------- save
    def save(self, step: int, parts: dict[str, Any], shared: dict[str, Any] | None = None) -> Path:
        """Write this rank's ``parts`` (and, on rank 0, ``shared``) as checkpoint ``step``; returns its folder.

        Returns only after the checkpoint is complete on disk (manifest written, folder renamed)
        and the older ones beyond ``keep_last`` are pruned.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be an integer >= 0, got {step!r}")
        if not isinstance(parts, dict):
            raise TypeError(f"parts must be a dict of this rank's objects, got {type(parts).__name__}")
        if self.rank == 0 and not isinstance(shared, dict):
            raise TypeError(f"rank 0 must pass shared (a dict: pool state, step, ...), got {type(shared).__name__}")
        token = _broadcast_str(uuid.uuid4().hex[:12] if self.rank == 0 else "", self.world_size)
        tmp = self.dir / f"step_{step}.tmp-{token}"
        tmp.mkdir(parents=True, exist_ok=True)

        files: dict[str, dict[str, Any]] = {}
        error = None
        try:
            name = _RANK_FILE.format(self.rank)
            files[name] = _atomic_torch_save({"format": FORMAT_VERSION, "rank": self.rank, "step": step,
                                              "parts": parts}, tmp / name)
            self._hook("rank_file")
            if self.rank == 0:
                files[SHARED_FILE] = _atomic_torch_save(
                    {"format": FORMAT_VERSION, "step": step, "shared": shared}, tmp / SHARED_FILE)
                self._hook("shared_file")
        except Exception as e:  # report to every rank instead of leaving the others waiting forever
            if self.world_size == 1:
                self._drop_unfinished(tmp)
                raise CheckpointError(f"checkpoint step {step} not saved: {_cause(e)}") from e
            error = _cause(e)
        # Also the barrier after which rank 0 may write the manifest: every rank has written (or failed).
        everyone = _all_gather({"files": files, "error": error}, self.world_size)
        failed = {r: e["error"] for r, e in enumerate(everyone) if e["error"]}
        if failed:
            if self.rank == 0:  # every rank is past its writes: the partial folder can go
                self._drop_unfinished(tmp)
            raise CheckpointError(f"checkpoint step {step} not saved: rank errors {failed}")
        final = self.step_dir(step)
        failure = ""
        if self.rank == 0:
            try:
                self._finish_save(everyone, tmp, final, step, token)
            except Exception as e:
                self._drop_unfinished(tmp)
                if self.world_size == 1:
                    raise CheckpointError(f"checkpoint step {step} not saved: {_cause(e)}") from e
                failure = _cause(e)
                log.error("checkpoint step %d: rank 0 could not finish it: %s", step, failure)
        # every rank learns whether rank 0 finished (instead of waiting in a barrier for a rank
        # that has failed) and fails with its cause
        failure = _broadcast_str(failure, self.world_size)
        if failure:
            raise CheckpointError(f"checkpoint step {step} not saved: rank 0 failed: {failure}")
        return final

    def _drop_unfinished(self, tmp: Path) -> None:
        """Remove a failed save's folder, unless it holds a manifest (complete: what recover()
        installs when the failure came between the two renames). A full disk must not keep the
        partial files of every failed try."""
        if tmp.is_dir() and not (tmp / MANIFEST).is_file():
            shutil.rmtree(tmp, ignore_errors=True)

    def _finish_save(self, everyone: list[dict], tmp: Path, final: Path, step: int, token: str) -> None:
        """Rank 0: the manifest, the rename into place, the pruning."""
        merged: dict[str, dict[str, Any]] = {}
        for entry in everyone:
            merged.update(entry["files"])
        expected = {SHARED_FILE, *(_RANK_FILE.format(r) for r in range(self.world_size))}
        if set(merged) != expected:
            raise CheckpointError(f"checkpoint {tmp}: ranks reported files {sorted(merged)}, expected {sorted(expected)}")
        self._hook("before_manifest")
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.world_size,
            "config_hash": self.config_hash,
            "config_fingerprint": self.fingerprint,
            "files": dict(sorted(merged.items())),
            "created_unix": time.time(),
            "torch_version": torch.__version__,
        }
        if self.layer_spec is not None:
            manifest["layer_spec"] = self.layer_spec
        atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), tmp / MANIFEST)
        _fsync_dir(tmp)
        self._hook("before_rename")
        self._install(tmp, final, token)
        self._hook("after_rename")
        self._prune(keep=final)

    def _install(self, tmp: Path, final: Path, token: str) -> None:
        """Rename the finished tmp folder to step_N; an existing step_N is replaced, never half-written."""
        old = None
        if final.exists():
            old = final.with_name(f"{final.name}.old-{token}")
            os.replace(final, old)
            self._hook("between_renames")  # step_N absent here: recover() puts it back after a crash
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def recover(self) -> list[int]:
        """Finish an install a crash interrupted (rank 0, before resuming): between its two renames
        step_N is missing while the complete new copy waits as step_N.tmp-T (with its manifest)
        and the old one as step_N.old-T. The new copy is put in place (else the old one back), so
        that neither is taken for debris and deleted by the next save. Returns the steps recovered."""
        recovered = []
        for step, path, complete in self._waiting_copies():
            if not complete:
                if ".tmp-" in path.name:  # a save that never finished: debris, and disk space a resume needs
                    shutil.rmtree(path, ignore_errors=True)
                    log.warning("checkpoint: removed %s, a save that never finished", path.name)
                continue
            os.replace(path, self.step_dir(step))
            _fsync_dir(self.dir)
            recovered.append(step)
            log.warning("checkpoint: an interrupted save left %s; restored it as %s", path.name,
                        self.step_dir(step).name)
        return recovered

    def interrupted_installs(self) -> list[int]:
        """The steps :meth:`recover` would restore, found without moving anything."""
        return sorted({step for step, _, complete in self._waiting_copies() if complete})

    def _waiting_copies(self) -> Iterator[tuple[int, Path, bool]]:
        """(step, folder, has a manifest) of each step_N.tmp-T, then each step_N.old-T (the new copy
        first; the old one only when there is none), while step_N is missing: checked as the
        caller goes, so that a copy recover() put in place hides the others of its step."""
        if not self.dir.is_dir():
            return
        for suffix in (".tmp-", ".old-"):
            for path in sorted(self.dir.iterdir()):
                m = re.match(rf"^step_(\d+){re.escape(suffix)}\w+$", path.name)
                if m and path.is_dir() and not self.step_dir(int(m.group(1))).exists():
                    yield int(m.group(1)), path, (path / MANIFEST).is_file()

    def latest_agreed(self) -> int | None:
        """Collective ``latest``: rank 0 recovers interrupted installs and finds the newest complete
        checkpoint, and every rank takes its answer (ranks that looked for themselves could see a
        shared file system at different moments, and load different steps). None when the run has
        no checkpoint folder yet; CheckpointError on every rank when it has step folders but none
        is valid."""
        answer = ""
        if self.rank == 0:
            self.recover()
            found = self.latest()
            if found is not None:
                answer = str(found)
            elif self.dir.is_dir():
                # step folders appear only by rename once complete: none valid means damage (a
                # truncated manifest, a half-copied run folder), not a run that never saved. Starting
                # over would overwrite the run's metrics and replace the repairable checkpoints.
                broken = sorted((p.name for p in self.dir.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()),
                                key=lambda name: int(_STEP_DIR.match(name).group(1)))
                if broken:
                    answer = "!" + (
                        f"--resume: no valid checkpoint under {self.dir}, but step folders that are damaged: "
                        f"{', '.join(broken)} (the log above says why each was skipped). Repair them (a copy "
                        "of the run folder that did not finish?), or move them away to start over"
                    )
        answer = _broadcast_str(answer, self.world_size)
        if answer.startswith("!"):
            raise CheckpointError(answer[1:])
        return int(answer) if answer else None

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond the newest keep_last, and stale temporary folders."""
        complete = self.complete_steps()
        for step in complete[: -self.keep_last]:
            path = self.step_dir(step)
            if path != keep:
                # renamed first: a process killed during the deletion leaves step_N.trash-T, which
                # the sweep below removes, instead of a half-deleted step_N kept for ever
                trash = path.with_name(f"{path.name}.trash-{uuid.uuid4().hex[:12]}")
                os.replace(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
                log.info("checkpoint: removed %s (keep_last=%d)", path, self.keep_last)
        for path in self.dir.iterdir():
            if any(mark in path.name for mark in (".tmp-", ".old-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)
                log.info("checkpoint: removed stale %s", path)

    # ------------------------------------------------------------------------------- finding
    def _read_manifest(self, folder: Path) -> dict[str, Any]:
        """The manifest of ``folder``, checked for shape and file sizes (not hashes); CheckpointError if bad."""
        path = folder / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {MANIFEST}; the checkpoint is incomplete (a save was interrupted?)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable manifest ({e}); the checkpoint is corrupt") from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{path}: manifest has no 'files' table; the checkpoint is corrupt")
        m = _STEP_DIR.match(folder.name)
        if manifest.get("step") != (int(m.group(1)) if m else None):
            raise CheckpointError(f"{path}: manifest step {manifest.get('step')!r} does not match the folder {folder.name}")
        for name, info in manifest["files"].items():
            if not (isinstance(info, dict) and type(info.get("size")) is int and isinstance(info.get("sha256"), str)):
                raise CheckpointError(f"{path}: the entry of {name!r} is {info!r}, not {{size: int, sha256: str}}; "
                                      "the checkpoint is corrupt")
            f = folder / name
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in the manifest but missing")
            size = f.stat().st_size
            if size != info.get("size"):
                raise CheckpointError(
                    f"{f}: {size} bytes on disk but the manifest says {info.get('size')}; the file is truncated or corrupt"
                )
        return manifest

    def complete_steps(self) -> list[int]:
        """Steps of every complete checkpoint (manifest present, valid, files of the listed size), ascending."""
        if not self.dir.is_dir():
            return []
        steps = []
        for path in self.dir.iterdir():
            m = _STEP_DIR.match(path.name)
            if not (m and path.is_dir()):
                continue
            try:
                self._read_manifest(path)
            except CheckpointError as e:
                log.warning("checkpoint: skipping %s: %s", path.name, e)
                continue
            steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        """The step of the newest complete checkpoint, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ---------------------------------------------------------------------------------- load
    def load(self, step: int | None = None, weights_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """(shared, this rank's parts) of checkpoint ``step`` (default: the newest complete one), verified.

        Refuses (CheckpointError) a missing, incomplete, truncated or corrupt checkpoint, one saved
        by a different world size, or one whose RESUME_KEYS config differs from this run's.
        ``weights_only=False`` allows arbitrary pickled objects (only for checkpoints you trust).
        """
        if step is None:
            step = self.latest()
            if step is None:
                found = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
                raise CheckpointError(
                    f"no complete checkpoint to resume from under {self.dir}"
                    + (f" (found only incomplete or invalid entries: {found})" if found else "")
                    + "; start the run without --resume"
                )
        folder = self.step_dir(step)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such checkpoint (complete ones: {self.complete_steps()})")
        manifest = self._check(folder, step)
        shared = self._load_file(folder, manifest, SHARED_FILE, step, weights_only)["shared"]
        parts = self._load_file(folder, manifest, _RANK_FILE.format(self.rank), step, weights_only)["parts"]
        return shared, parts

    def _check(self, folder: Path, step: int, layout_may_differ: bool = False) -> dict[str, Any]:
        """The manifest of ``folder``, checked against this run; LayoutChanged when only the layout differs."""
        manifest = self._read_manifest(folder)
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
        if manifest.get("config_hash") != self.config_hash:
            theirs = manifest.get("config_fingerprint") or {}
            keys = list(self.fingerprint) + [k for k in theirs if k not in self.fingerprint]
            diff = {k: (theirs.get(k), self.fingerprint.get(k)) for k in keys
                    if theirs.get(k) != self.fingerprint.get(k) and k not in RETIRED_KEYS}
            retired_only = not diff and theirs and any(k in theirs for k in RETIRED_KEYS)
            if not retired_only and (not diff or any(k not in LAYOUT_KEYS for k in diff)):
                detail = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
                raise CheckpointError(
                    f"{folder}: config does not match this run ({detail or 'different resume keys'}); "
                    "these settings must stay the same to resume (see RESUME_KEYS); start a new run to change them"
                )
        else:
            diff = {}
        saved_spec = manifest.get("layer_spec")
        if self.layer_spec is not None and saved_spec is not None and saved_spec != self.layer_spec:
            raise CheckpointError(
                f"{folder}: written by a model of the {saved_spec!r} layer spec, this run builds the "
                f"{self.layer_spec!r} one (model.layer_spec; 'auto' is 'te' only with transformer-engine and "
                "CUDA), and their parameter names differ (transformer-engine fuses the layer norms into the "
                f"linear layers); resume where the spec is {saved_spec!r}, or `megatron-recycle export` this "
                "checkpoint to a Hugging Face folder and start a new run from it (train --init-from)"
            )
        if (diff or manifest.get("world_size") != self.world_size) and not layout_may_differ:
            saved = {k: (manifest.get("config_fingerprint") or {}).get(k) for k in LAYOUT_KEYS}
            saved["world_size"] = manifest.get("world_size")
            current = {k: self.fingerprint.get(k) for k in LAYOUT_KEYS}
            current["world_size"] = self.world_size
            detail = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in saved if saved[k] != current[k])
            ranks = (f"saved by {saved['world_size']} ranks but this run has {self.world_size}"
                     if saved["world_size"] != self.world_size else "saved on another layout")
            raise LayoutChanged(
                f"{folder}: {ranks} ({detail}); the checkpoint's shards must be resharded for this layout "
                "(CheckpointManager.load_all and train/reshard.py; `train --resume` does it)",
                step, saved, current,
            )
        return manifest

    def load_all(self, step: int, weights_only: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(shared, every saved rank's parts) of checkpoint ``step``: the resume on another layout.

        Collective when this run has several ranks: each file's sha256 is checked by one rank
        (file i by rank i mod world size) and the verdicts are shared, so no file is hashed twice.
        The rank files are memory-mapped: a rank reads only the pages of the tensors it uses.
        """
        folder = self.step_dir(step)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such checkpoint (complete ones: {self.complete_steps()})")
        manifest = self._check(folder, step, layout_may_differ=True)
        saved_world = int(manifest.get("world_size") or 0)
        names = [SHARED_FILE] + [_RANK_FILE.format(r) for r in range(saved_world)]
        mine = [self._verify(folder, manifest, name) for i, name in enumerate(names) if i % self.world_size == self.rank]
        problems = [p for ps in _all_gather([p for p in mine if p], self.world_size) for p in ps]
        if problems:
            raise CheckpointError("; ".join(problems))
        shared = self._torch_load(folder / SHARED_FILE, step, weights_only)["shared"]
        parts = [self._torch_load(folder / name, step, weights_only, mmap=True)["parts"] for name in names[1:]]
        return shared, parts

    @staticmethod
    def _verify(folder: Path, manifest: dict[str, Any], name: str) -> str | None:
        """What is wrong with file ``name`` against the manifest (listed, sha256), or None."""
        info = manifest["files"].get(name)
        path = folder / name
        if info is None:
            return f"{path}: not listed in the manifest; the checkpoint is incomplete"
        digest = _sha256_file(path)
        if digest != info.get("sha256"):
            return (f"{path}: sha256 {digest[:16]}... differs from the manifest's {str(info.get('sha256'))[:16]}...; "
                    "the file is corrupt: resume from an earlier checkpoint (delete this folder)")
        return None

    def _load_file(self, folder: Path, manifest: dict[str, Any], name: str, step: int, weights_only: bool) -> Any:
        problem = self._verify(folder, manifest, name)
        if problem:
            raise CheckpointError(problem)
        return self._torch_load(folder / name, step, weights_only)

    def _torch_load(self, path: Path, step: int, weights_only: bool, mmap: bool = False) -> Any:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
        except Exception as e:  # torch raises several types for unpickling problems
            text = str(e)
            if weights_only and "Weights only load failed" in text:
                why = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
                raise CheckpointError(
                    f"{path}: cannot be loaded with weights_only=True ({why or 'objects outside torch safe list'}); "
                    "use load(weights_only=False) only if you trust this checkpoint"
                ) from e
            raise CheckpointError(f"{path}: cannot be loaded: {type(e).__name__}: {text}") from e
        if not isinstance(obj, dict) or obj.get("step") != step:
            raise CheckpointError(f"{path}: does not hold step {step} (found {obj.get('step') if isinstance(obj, dict) else obj!r})")
        return obj


# ----------------------------------------------------------------------------------- RNG state
def cuda_states_to_restore(state: dict[str, Any], device_count: int) -> tuple[str, Any]:
    """Which saved CUDA generator states a process that sees ``device_count`` devices restores:
    ("all", one state per device) when it sees as many as the saving process did, else ("current",
    the saving process's own device's state), which a checkpoint from before 2026-12-01 does not
    hold: ValueError then."""
    cuda_states = state["cuda"]
    if len(cuda_states) == device_count:
        return "all", cuda_states
    if "cuda_current" in state:
        return "current", state["cuda_current"]
    raise ValueError(f"RNG state holds {len(cuda_states)} CUDA device states but {device_count} devices are "
                     "visible, and not the saving process's own device's state (a checkpoint from before "
                     "2026-12-01); resume with the same devices per process")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step touches: python ``random``, numpy's global RNG, torch CPU, CUDA (when
    initialized) and megatron's named model-parallel RNG states (when megatron has seeded them).

    Only plain Python values and tensors, so the state loads with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        # this process's own device's generator, the one its kernels draw from: what a resume that
        # sees another number of devices (one GPU per process instead of all of them) restores
        state["cuda_current"] = torch.cuda.get_rng_state()
    tracker = _megatron_tracker(create=False)
    if tracker is not None and tracker.is_initialized():
        named = tracker.get_states()
        kept = {k: v.clone() for k, v in named.items() if isinstance(v, torch.Tensor)}
        if len(kept) != len(named):
            log.warning("RNG state: megatron tracker states %s are not tensors (CUDA-graph generators?) "
                        "and are not captured", sorted(set(named) - set(kept)))
        state["megatron_tracker"] = kept
    return state


def _megatron_tracker(create: bool) -> Any:
    """megatron's model-parallel RNG tracker when megatron is in use (already imported), else None."""
    mrandom = sys.modules.get("megatron.core.tensor_parallel.random")
    if mrandom is None:
        if not create:
            return None
        import megatron.core.tensor_parallel.random as mrandom
    if not create and getattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None) is None:
        return None
    return mrandom.get_cuda_rng_tracker()


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what capture_rng_state returned; CUDA states are skipped, with a warning, without CUDA."""
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; pass what capture_rng_state() returned")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": np.asarray(npst["key"], dtype=np.int64).astype(np.uint32), "pos": int(npst["pos"])},
        "has_gauss": int(npst["has_gauss"]),
        "gauss": float(npst["gauss"]),
    })
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state:
        if torch.cuda.is_available():
            how, states = cuda_states_to_restore(state, torch.cuda.device_count())
            if how == "all":
                torch.cuda.set_rng_state_all(states)
            else:
                log.info("RNG state: saved with %d visible CUDA devices, %d visible now: restoring this process's "
                         "device generator only", len(state["cuda"]), torch.cuda.device_count())
                torch.cuda.set_rng_state(states)
        else:
            log.warning("RNG state holds CUDA generator states but CUDA is not available: they are not restored")
    if "megatron_tracker" in state:
        # On CPU, apply the compat patches (model/compat.py) before this, as before seeding the tracker.
        _megatron_tracker(create=True).set_states({k: v.clone() for k, v in state["megatron_tracker"].items()})
