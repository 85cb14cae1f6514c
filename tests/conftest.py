"""Test-wide environment: one thread per process, no hub access, Triton interpreter on CPU.

These must be set before torch, transformers or any @triton.jit function is imported, which is
why they live at the top of the root conftest.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels can only run in the interpreter; it must be on before
    # any @triton.jit function is defined (PLATFORM.md).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
