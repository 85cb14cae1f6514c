"""Reusable multi-process launcher for tests: N python processes on 127.0.0.1, torchrun-style env.

``run_workers("path/to/file.py:func", world_size, out_dir, **kwargs)`` starts one process per
rank with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (exactly what torchrun sets),
calls ``func(rank=..., world_size=..., out_dir=..., **kwargs)`` in each, and returns the list of
JSON results (one per rank). Any failing rank fails the call with every rank's output tail.
Worker functions are loaded by file path, so they need not be importable as modules.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_workers(
    target: str, world_size: int, out_dir: str | os.PathLike, timeout: float = 300, **kwargs: Any
) -> list[Any]:
    """Run ``target`` ("file.py:function") on ``world_size`` ranks; return each rank's result."""
    from tests.train._dist import wait_for_ranks  # not at the top: each rank runs this file as a script

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    gpus = _visible_gpus()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            PYTHONWARNINGS="ignore",
        )
        if 0 < gpus < world_size:  # NCCL cannot put two ranks on one GPU: run on CPU over gloo
            env["CUDA_VISIBLE_DEVICES"] = ""
        log = open(out_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, __file__, target, str(out_dir), json.dumps(kwargs)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = False

    def tails() -> str:
        out = []
        for rank in range(world_size):
            text = (out_dir / f"rank{rank}.log").read_text(errors="replace")
            out.append(f"--- rank {rank} (rc={procs[rank][0].returncode}) ---\n{text[-4000:]}")
        return "\n".join(out)

    try:
        failed = any(c != 0 for c in wait_for_ranks([p for p, _ in procs], dist_timeout(timeout)).values())
    except BaseException as e:  # e.g. pytest-timeout's: the report carries what the ranks printed
        _stop(procs)
        raise AssertionError(f"distributed workers {target} interrupted ({type(e).__name__}: {e}):\n{tails()}") from e
    finally:
        _stop(procs)
    if failed:
        raise AssertionError(f"distributed workers {target} failed:\n" + tails())
    return [json.loads((out_dir / f"result{rank}.json").read_text()) for rank in range(world_size)]


def _stop(procs: list) -> None:
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def dist_timeout(timeout: float) -> float:
    """``timeout``, capped by $MR_DIST_TIMEOUT_S (tools/gpu_checks.sh sets it below its step
    limits, so that the launcher's own error, with every rank's output, comes first)."""
    return min(timeout, float(os.environ.get("MR_DIST_TIMEOUT_S", "inf")))


def _child_main() -> None:
    target, out_dir, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    path, func_name = target.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location(f"_dist_worker_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))
    spec.loader.exec_module(module)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = getattr(module, func_name)(rank=rank, world_size=world, out_dir=out_dir, **kwargs)
    (Path(out_dir) / f"result{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _child_main()
