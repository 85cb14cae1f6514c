"""Output buffers for the kernels (with an opt-in poison fill so tests catch unwritten elements), and
the one switch between compiled (CUDA) and interpreter launch configurations."""

from __future__ import annotations

import torch

# Tests set this to True: every kernel output is then pre-filled with NaN (floats) or 0x5A
# (integers) instead of being left uninitialized, so an element a kernel forgot to write fails.
POISON = False


def new_buffer(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor for a kernel to fill (poisoned when POISON is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else 0x5A)
    return t


def new_buffer_like(t: torch.Tensor) -> torch.Tensor:
    """new_buffer with the shape, dtype and device of `t` (always contiguous)."""
    return new_buffer(t.shape, t.dtype, t.device)


def compiled(device: torch.device) -> bool:
    """True where the Triton kernels are compiled (CUDA): launchers then pick GPU tile sizes and warps.

    False means the Triton interpreter on a CPU tensor, where fewer, larger programs run faster.
    Every launcher asks this one function (through the module, not an imported name), so that
    tools/compile_kernels.py can record the exact CUDA launch configurations on a CPU machine.
    """
    return device.type == "cuda"
