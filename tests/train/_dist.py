"""Launch a test worker on N local processes (gloo on CPU, NCCL on GPU) and collect what each rank returns.

A worker is a function ``fn(args: dict) -> object`` in tests/train/_workers.py. Each rank runs in
a fresh interpreter with torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), one thread, no hub access and the kernels' PyTorch path on CPU, so the
pytest process never holds megatron's global state or the CPU patches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_ranks(procs: list[subprocess.Popen], timeout: float) -> dict[int, Any]:
    """Each rank's exit code, polling all of them: when one fails, the others would wait on a
    collective until the timeout, so they are stopped at once (code "killed"; "timeout" when the
    time ran out). Shared by tests/model/_dist.py."""
    deadline = time.monotonic() + timeout
    codes: dict[int, Any] = {}
    while len(codes) < len(procs):
        for rank, p in enumerate(procs):
            if rank not in codes and p.poll() is not None:
                codes[rank] = p.returncode
        if any(c != 0 for c in codes.values()) or time.monotonic() > deadline:
            for rank, p in enumerate(procs):
                if rank not in codes:
                    p.kill()
                    p.wait()
                    codes[rank] = "killed" if time.monotonic() <= deadline else "timeout"
            break
        time.sleep(0.05)
    return codes


def run_workers(fn: str, world_size: int, args: dict[str, Any], timeout: float = 300.0) -> list[Any]:
    """Run ``_workers.<fn>(args)`` on ``world_size`` processes; return each rank's result (torch.load).

    Raises RuntimeError with every failing rank's output when any rank fails or times out.
    """
    with tempfile.TemporaryDirectory(prefix=f"train_{fn}_") as tmp:
        port = free_port()
        procs = []
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONWARNINGS="ignore",
            )
            # The step uses the kernels' production path for the device (PyTorch on CPU); the
            # Triton interpreter is the kernels' own tests' business and is far too slow here.
            env.pop("TRITON_INTERPRET", None)
            if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
                # NCCL cannot put two ranks on one GPU: run this world on CPU over gloo instead.
                env["CUDA_VISIBLE_DEVICES"] = ""
            cmd = [sys.executable, str(HERE / "_workers.py"), fn, tmp, json.dumps(args)]
            log = open(Path(tmp) / f"log{rank}.txt", "w")  # noqa: SIM115 - closed below
            procs.append((subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT), log))
        timeout = min(timeout, float(os.environ.get("MR_DIST_TIMEOUT_S", "inf")))  # see tests/model/_dist.py
        try:
            codes = wait_for_ranks([p for p, _ in procs], timeout)
        except BaseException as e:  # e.g. pytest-timeout's: stop the ranks, report what they printed
            for p, log in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
            logs = "\n".join(f"--- rank {r} ---\n{(Path(tmp) / f'log{r}.txt').read_text()[-6000:]}"
                             for r in range(world_size))
            raise RuntimeError(f"worker {fn} interrupted ({type(e).__name__}: {e}):\n{logs}") from e
        for _, log in procs:
            log.close()
        failed = [(r, c) for r, c in sorted(codes.items()) if c != 0]
        if failed:
            logs = "\n".join(
                f"--- rank {r} (rc={rc}) ---\n{(Path(tmp) / f'log{r}.txt').read_text()[-6000:]}" for r, rc in failed
            )
            raise RuntimeError(f"worker {fn} failed on ranks {[r for r, _ in failed]}:\n{logs}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
