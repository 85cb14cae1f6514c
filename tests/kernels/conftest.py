"""Fixtures for the kernel tests: poisoned kernel outputs and the device the Triton path runs on."""

import os

import pytest
import torch
from megatron_recycle_kernels import buffers


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Pre-fill every kernel output buffer with NaN / 0x5A so an element a kernel skips fails the test."""
    monkeypatch.setattr(buffers, "POISON", True)


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """CUDA when present; otherwise CPU through the Triton interpreter (skip if it is not on)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
    return torch.device("cpu")
