"""The launch scripts hand torchrun what they are given (stub torchrun/srun/scontrol/nvidia-smi
on PATH print or run their arguments; nothing is launched)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stubs(tmp_path: Path, gpus: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "torchrun": 'for a in "$@"; do echo "ARG[$a]"; done',
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"',
        "scontrol": "echo node-a; echo node-b",
        "nvidia-smi": "".join(f'echo "GPU {i}: H100 (UUID: GPU-{i})"; ' for i in range(gpus))
                      + 'echo "  MIG 1g.10gb Device 0: (UUID: MIG-x)"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC", "COMMAND")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def _args(out: str) -> list[str]:
    return [line[4:-1] for line in out.splitlines() if line.startswith("ARG[")]


def test_single_node_counts_the_visible_gpus(tmp_path):
    env = _stubs(tmp_path, gpus=8)
    script = str(ROOT / "recipes" / "launch_single_node.sh")
    out = subprocess.run(["bash", script, "r.yaml", "pool.batch_size=8"], env=env, capture_output=True, text=True,
                         check=True).stdout
    args = _args(out)
    assert args[args.index("--nproc-per-node") + 1] == "8"  # every GPU line, not the MIG line
    assert args[-4:] == ["train", "--config", "r.yaml", "pool.batch_size=8"]
    env["CUDA_VISIBLE_DEVICES"] = "0,1"
    args = _args(subprocess.run(["bash", script, "r.yaml"], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert args[args.index("--nproc-per-node") + 1] == "2"


def test_slurm_example_passes_the_command_overrides_and_resume(tmp_path):
    env = _stubs(tmp_path, gpus=8)
    env.update(SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="7", COMMAND="run", GPUS_PER_NODE="4")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    script = str(ROOT / "recipes" / "slurm_example.sbatch")
    proc = subprocess.run(["bash", script, "my recipe.yaml", "run.name=a b", "--resume"], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = _args(proc.stdout)
    assert args[args.index("--nproc-per-node") + 1] == "4"
    assert args[args.index("--rdzv-endpoint") + 1] == "node-a:29500"
    assert args[-6:] == ["megatron_recycle.cli", "run", "--config", "my recipe.yaml", "run.name=a b", "--resume"]
    env.pop("COMMAND")
    args = _args(subprocess.run(["bash", script, "r.yaml"], env=env, cwd=tmp_path, capture_output=True, text=True,
                                check=True).stdout)
    assert args[-4:] == ["megatron_recycle.cli", "train", "--config", "r.yaml"]  # no empty argument after it
