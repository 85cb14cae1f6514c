"""CPU/gloo compatibility patches for megatron-core, applied only when CUDA is absent.

megatron-core assumes a GPU in a few places that have nothing to do with the math. On a CPU
machine (development, CI, the embedded default) seven small patches make GPTModel, the pipeline
schedules, activation recomputation and the (distributed) optimizer run on gloo unchanged (the
first four are PLATFORM.md's; the fifth is for megatron-core releases after 0.16, which Python 3.12
machines install; the sixth is for activation recomputation, ``model.recompute``; the seventh for
pipeline stages that exchange micro-batches of different shapes):

1. RNG tracker: ``CudaRNGStatesTracker.add/fork`` read and write the CUDA generator. The
   patch swaps in :class:`CpuRNGStatesTracker`, the same bookkeeping on the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work.
2. ``torch.cuda.current_device()`` (rotary embedding, global memory buffer, p2p buffers) raises
   without CUDA; the patch makes it return ``torch.device("cpu")`` so that tensors created
   with ``device=torch.cuda.current_device()`` land on the CPU.
3. Hard-coded ``device='cuda'`` / ``.cuda()`` (optimizer loss scale, found-inf flags, clip-grad
   buffers): a global :class:`torch.overrides.TorchFunctionMode` maps CUDA devices to the CPU.
4. Type assertions ``param.type() == 'torch.cuda.FloatTensor'`` (``clip_grads``, the
   distributed optimizer's parameter sort): the same mode reports a CPU tensor's legacy type
   string with the ``torch.cuda.`` prefix, and maps such strings back to CPU types when they
   are passed to ``Tensor.type(...)``.
5. ``torch.cuda.current_stream()``: megatron-core 0.19 waits on the current stream's events
   before reducing gradients (``_ParamAndGradBucketGroup.start_grad_sync``); 0.16 does not. The
   patch returns a CPU stand-in whose waits are no-ops (CPU work runs in program order).
6. Activation recomputation (``tensor_parallel.checkpoint``, selective and full recompute) saves
   the CUDA generator's state with the forward and restores it for the recomputed forward
   (``random._get_cuda_rng_state`` / ``_set_cuda_rng_state``). The patch makes both read and
   write the CPU generator, which stands in for the CUDA one everywhere else too (patch 1), so the
   recomputed forward draws the same random numbers as the first one, as on a GPU.
7. ``torch.cuda.synchronize()``: with ``config.variable_seq_lengths`` (length-grouped
   micro-batches under pipeline parallelism, train/step.py) the pipeline stages first exchange
   the shapes of what they send, and megatron-core synchronizes CUDA after that exchange
   (``P2PCommunicator._communicate_shapes``). The patch makes it a no-op (CPU work runs in
   program order; the gloo requests have been waited for).

Everything is undone by :func:`remove_cpu_compat` (tests use it to show that each patch is
still needed). tests/model/test_compat.py fails when a newer megatron-core makes a patch
unnecessary or wrong.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"applied": False, "mode": None, "originals": {}}


# --------------------------------------------------------------------------- patch 1: RNG
def _cpu_rng_tracker_class() -> type:
    """Build the CPU tracker lazily, as a subclass of megatron's own (isinstance checks hold)."""
    from megatron.core.tensor_parallel import random as mrandom

    base = _STATE["originals"].get("CudaRNGStatesTracker", mrandom.CudaRNGStatesTracker)

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """megatron's RNG-state tracker on the CPU generator: named states, seeded and forked."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _STATE["originals"]["CudaRNGStatesTracker"] = mrandom.CudaRNGStatesTracker
    mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    # A tracker built before the patch holds CUDA states: drop it so the next call rebuilds it.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def _unpatch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    orig = _STATE["originals"].pop("CudaRNGStatesTracker", None)
    if orig is not None:
        mrandom.CudaRNGStatesTracker = orig
        mrandom._CUDA_RNG_STATE_TRACKER = None
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


# ------------------------------------------------------ patch 6: recomputation RNG states
def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for megatron's ``_get_cuda_rng_state``: the CPU generator's state (a copy)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Stand-in for megatron's ``_set_cuda_rng_state``: sets the CPU generator."""
    torch.set_rng_state(new_state)


def _patch_checkpoint_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _STATE["originals"]["_get_cuda_rng_state"] = mrandom._get_cuda_rng_state
    _STATE["originals"]["_set_cuda_rng_state"] = mrandom._set_cuda_rng_state
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state


def _unpatch_checkpoint_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        orig = _STATE["originals"].pop(name, None)
        if orig is not None:
            setattr(mrandom, name, orig)


# ------------------------------------------------------------- patch 2: current_device
def _cpu_current_device() -> torch.device:
    """Stand-in for torch.cuda.current_device() without CUDA: the CPU device."""
    return torch.device("cpu")


# ------------------------------------------------------------- patch 5: current_stream
class _CpuStream:
    """Stand-in for ``torch.cuda.current_stream()`` without CUDA. CPU work runs in program order,
    so waiting on an event or another stream has nothing to wait for."""

    device = torch.device("cpu")

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


# ------------------------------------------------------------- patch 7: synchronize
def _cpu_synchronize(device: Any = None) -> None:
    """Stand-in for ``torch.cuda.synchronize()`` without CUDA: nothing runs asynchronously."""
    return None


def _cpu_current_stream(device: Any = None) -> _CpuStream:
    return _CPU_STREAM


# --------------------------------------------------------- patches 3 and 4: device mode
_CUDA_PREFIX = "torch.cuda."
_WATCHED_NAMES = frozenset({"cuda", "to", "type"})


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int means a CUDA ordinal in torch's device arguments.
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments and ``.cuda()`` to the CPU; reports CPU legacy types as CUDA.

    Only active when CUDA is absent (see module doc, patches 3 and 4). A torch function mode sits
    on a per-thread stack: it sees every torch call of the thread that applied the patches (the
    main thread; nothing here runs Megatron code on another thread, which would need to enter it
    too), about 1-3 us extra per op on a 2-core CPU (a few percent of a SmolLM2-135M decoding step).
    The other patches replace module attributes and hold for every thread.
    """

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if kwargs and "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        name = getattr(func, "__name__", "")
        if name not in _WATCHED_NAMES:  # fast path: almost every call
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            # Tensor.cuda(device=None, non_blocking=False, ...) -> stays on CPU.
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]) and not isinstance(args[1], bool):
            args = (args[0], "cpu", *args[2:])
        if name == "type" and args and isinstance(args[0], torch.Tensor):
            if len(args) == 1 and "dtype" not in kwargs:
                legacy = func(*args, **kwargs)
                if isinstance(legacy, str) and legacy.startswith("torch.") and args[0].device.type == "cpu":
                    return _CUDA_PREFIX + legacy[len("torch.") :]
                return legacy
            target = args[1] if len(args) > 1 else kwargs.get("dtype")
            if isinstance(target, str) and target.startswith(_CUDA_PREFIX):
                target = "torch." + target[len(_CUDA_PREFIX) :]
                args = (args[0], target, *args[2:]) if len(args) > 1 else args
                if "dtype" in kwargs:
                    kwargs["dtype"] = target
        return func(*args, **kwargs)


# ------------------------------------------------------------------------- public API
@contextlib.contextmanager
def device_mode_suspended() -> Iterator[None]:
    """Run a block without the global device mode (patches 3 and 4), for hot loops that never name
    a CUDA device: the NativeEngine's decode loop issues ~200,000 small torch calls per rollout
    batch, and the mode's Python hook on each one cost ~1 s of a 6 s generation (measured,
    SmolLM2-135M, 16 rows x 64 tokens, 2-core CPU). A no-op when the mode is not active. Inside
    the block every ``__torch_function__`` override is off (torch.overrides' own switch), so it
    is only for code on plain tensors and parameters.
    """
    if _STATE["mode"] is None:
        yield
        return
    with torch._C.DisableTorchFunction():
        yield


@contextlib.contextmanager
def device_mode_lifted() -> Iterator[None]:
    """Run a block without the global device mode (patches 3 and 4) but with every other
    ``__torch_function__`` override intact: for third-party code in the same process that must
    see CPU devices and CPU legacy types as they are. vLLM's CPU backend is one: with the mode on
    (and megatron's parallel state set up beside it), its tensor-parallel engines computed
    log-probs off by up to 0.43 (found by rollout.vllm_check_sync; engines/vllm.py lifts the
    mode around every vLLM call). A no-op when the mode is not active.
    """
    mode = _STATE["mode"]
    if mode is None:
        yield
        return
    stack = torch.overrides._get_current_function_mode_stack()
    if not stack or stack[-1] is not mode:  # another mode on top: take every override off instead
        with torch._C.DisableTorchFunction():
            yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def cuda_absent() -> bool:
    """True when this process has no usable CUDA device (the only case the patches apply to)."""
    return not torch.cuda.is_available()


def apply_cpu_compat(force: bool = False) -> bool:
    """Apply the seven CPU patches once per process; no-op (returns False) when CUDA is present.

    Idempotent and thread-safe. ``force=True`` applies them even with CUDA (tests only).
    Returns True when the patches are active after the call.
    """
    if not force and not cuda_absent():
        return False
    with _LOCK:
        if _STATE["applied"]:
            return True
        _patch_rng()
        _patch_checkpoint_rng()
        _STATE["originals"]["current_device"] = torch.cuda.current_device
        torch.cuda.current_device = _cpu_current_device
        _STATE["originals"]["current_stream"] = torch.cuda.current_stream
        torch.cuda.current_stream = _cpu_current_stream
        _STATE["originals"]["synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = _cpu_synchronize
        mode = CudaToCpuMode()
        mode.__enter__()
        _STATE["mode"] = mode
        _STATE["applied"] = True
        logger.info("megatron-core CPU compatibility patches applied (no CUDA device)")
        return True


def remove_cpu_compat() -> None:
    """Undo :func:`apply_cpu_compat` (tests use it to show each patch is still needed)."""
    with _LOCK:
        if not _STATE["applied"]:
            return
        mode = _STATE["mode"]
        if mode is not None:
            mode.__exit__(None, None, None)
        _STATE["mode"] = None
        orig_cd = _STATE["originals"].pop("current_device", None)
        if orig_cd is not None:
            torch.cuda.current_device = orig_cd
        orig_cs = _STATE["originals"].pop("current_stream", None)
        if orig_cs is not None:
            torch.cuda.current_stream = orig_cs
        orig_sync = _STATE["originals"].pop("synchronize", None)
        if orig_sync is not None:
            torch.cuda.synchronize = orig_sync
        _unpatch_rng()
        _unpatch_checkpoint_rng()
        _STATE["applied"] = False


def cpu_compat_applied() -> bool:
    """Whether the CPU patches are active in this process."""
    return bool(_STATE["applied"])
