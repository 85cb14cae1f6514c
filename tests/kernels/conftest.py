"""Fixtures for the kernel tests: poisoned kernel outputs and the device the Triton path runs on."""


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
    import megatron_recycle_kernels

    if not megatron_recycle_kernels.INTERPRETED:  # Triton's own decision at import ("1", "true", ...)
        pytest.skip("no CUDA and TRITON_INTERPRET was not set at import: the Triton kernels cannot run here")
    return torch.device("cpu")


# Ops that launch nothing on a GPU: allocations, views, dtype promotion (host arithmetic).
NO_LAUNCH_OPS = frozenset({"aten.empty.memory_format", "aten.view.dtype", "aten.view.default", "aten.detach.default",
                           "aten.unbind.int", "aten.unsqueeze.default", "aten.promote_types.default"})


@pytest.fixture
def device_ops(monkeypatch):
    """``device_ops(module, *kernel_names)``: a context manager whose list collects, in order, each
    launch of the named kernels (by name) and every other tensor op that would run on a device
    (by aten name). The interpreter's own tensor ops inside a launch are not counted, and kernel
    outputs are not poisoned (the fill would be a test's op)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    monkeypatch.setattr(buffers, "POISON", False)

    class Counted:
        def __init__(self, name, fn, log):
            self.name, self.fn, self.log = name, fn, log

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.log.append(self.name)
                with _disable_current_modes():
                    return self.fn[grid](*args, **kwargs)

            return launch

    class Ops(TorchDispatchMode):
        def __init__(self, log):
            super().__init__()
            self.log = log

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) not in NO_LAUNCH_OPS:
                self.log.append(str(func))
            return func(*args, **(kwargs or {}))

    def make(module, *names):
        log: list[str] = []
        for name in names:
            monkeypatch.setattr(module, name, Counted(name, getattr(module, name), log))
        mode = Ops(log)
        return mode

    return make
