"""Small C kernels for CPU decoding, built on first use: a skinny fp32 GEMM (``x @ w.T`` for a
few rows of ``x``, with an RMSNorm / SwiGLU prologue and a residual epilogue fused in) and a
one-call decode attention (QK-norm, RoPE, cache write, softmax attention) per layer.

Why: a decode step multiplies every weight matrix by the 1-64 rows of the batch being decoded.
On the AMD (Zen 3) CPUs this project runs on, the BLAS bundled with PyTorch's CPU wheel (MKL)
runs those shapes far below the machine's limits: measured on the 2-core reference VM with
SmolLM2-135M's decode GEMMs (16 rows, 540 MB of weights): MKL 9.6-10.4 GB/s of weights, this
kernel 14.5 GB/s (4.5-5.2 -> 7.8 GB/s on one thread), while the FMA units bound any fp32 kernel
at 16 rows to about one weight per cycle per core. The arithmetic is the same fp32 products; only
the order of the k-sum differs from MKL's (the tests compare both to a float64 reference).

How: ``csrc/skinny_gemm.c`` (AVX2 + FMA intrinsics, OpenMP over output rows) is compiled with the
system's ``gcc`` into ``$MEGATRON_RECYCLE_CACHE/cpu_gemm/`` (default ``~/.cache/megatron_recycle``)
under a name that hashes the source, the flags and the compiler version, so an edit or a new
compiler rebuilds it and concurrent processes never load a half-written file (compile to a
temporary name, then an atomic rename). It is loaded with ctypes (no PyTorch headers, compiles in
under a second) and links against ``libgomp.so.1``: the dynamic loader hands it the libgomp that
PyTorch already loaded, so both share one OpenMP thread pool and never oversubscribe the cores.

When it is not used (the caller falls back to PyTorch, with one log line saying why): no gcc, a
CPU without AVX2/FMA, a failed build, ``MEGATRON_RECYCLE_CPU_GEMM=0``, or inputs it does not
take (not fp32, not on the CPU, more than ``MAX_ROWS`` rows, a weight whose rows are not contiguous).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "MEGATRON_RECYCLE_CPU_GEMM"
MAX_ROWS = 64  # above this MKL's blocked GEMM is at least as fast (measured crossover ~48-96 rows)
SOURCE = Path(__file__).resolve().parent / "csrc" / "skinny_gemm.c"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
LDLIBS = ("-lm",)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": ctypes library, or "reason": why it is unavailable
calls = 0  # skinny_mm calls in this process (tests check that a path really used the kernel)
attention_calls = 0  # decode_attention calls that ran the C kernel


def _cache_dir() -> Path:
    root = os.environ.get("MEGATRON_RECYCLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                     "megatron_recycle")
    return Path(root) / "cpu_gemm"


def _cpu_has_avx2_fma() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust PyTorch's own dispatch (AVX2 builds require FMA there)
        return True
    return " fma" in flags and " avx2" in flags


def build(force: bool = False) -> Path:
    """Compile the kernel (or find it in the cache) and return the shared library's path.
    Raises RuntimeError with the compiler's output when gcc is missing or the build fails."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (gcc or $CC); install gcc to use the skinny CPU GEMM")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run the C compiler {cc}: {exc}") from exc
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(CFLAGS + LDLIBS).encode() + version.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    target = out_dir / f"skinny_gemm_{key}.so"
    if target.exists() and not force:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".skinny_gemm_", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, *LDLIBS], capture_output=True, text=True,
                                  timeout=300)
        except subprocess.SubprocessError as exc:  # a timeout on a loaded machine: fall back, once
            raise RuntimeError(f"building {SOURCE.name} with {cc} did not finish: {exc}") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed ({cc}, exit {proc.returncode}):\n"
                               f"{proc.stderr.strip()[-2000:]}")
        # mkstemp made the file 0600: in a cache folder shared by a team (MEGATRON_RECYCLE_CACHE),
        # other users would find it and fail to load it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    with _lock:
        if "lib" in _state or "reason" in _state:
            return _state.get("lib")  # type: ignore[return-value]
        reason = None
        if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
            reason = f"{ENV_SWITCH}=0"
        elif not _cpu_has_avx2_fma():
            reason = "this CPU has no AVX2/FMA"
        if reason is None:
            try:
                lib = ctypes.CDLL(str(build()))
                fn = lib.mr_skinny_gemm_ex
                fn.restype = ctypes.c_int
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_float, ptr, ptr,
                               ctypes.c_int]
                att = lib.mr_decode_attention
                att.restype = ctypes.c_int
                att.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                ctypes.c_float, ctypes.c_float, ptr, ctypes.c_int]
                _state["lib"] = lib
                log.info("skinny CPU GEMM loaded (%s)", lib._name)
                return lib
            except (RuntimeError, OSError, AttributeError) as exc:
                reason = str(exc)
        _state["reason"] = reason
        log.warning("skinny CPU GEMM unavailable, decoding uses PyTorch's matmul: %s", reason)
        return None


def available() -> bool:
    """True when the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _state.get("reason")  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded state (tests: re-read the environment switch)."""
    with _lock:
        _state.clear()


def _fp32_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


def supports(x2d: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None = None, swiglu: bool = False,
             residual: torch.Tensor | None = None) -> bool:
    """Whether skinny_mm takes these operands (the caller falls back to torch otherwise)."""
    if x2d.dim() != 2 or w.dim() != 2 or not (_fp32_cpu(x2d) and _fp32_cpu(w)) or w.stride(1) != 1:
        return False
    m, k = x2d.shape
    n, kw = w.shape
    if not (0 < m <= MAX_ROWS and n > 0 and k == (2 * kw if swiglu else kw)):
        return False
    if norm_weight is not None and (swiglu or norm_weight.shape != (kw,) or not _fp32_cpu(norm_weight)
                                    or not norm_weight.is_contiguous()):
        return False
    if residual is not None and (residual.shape != (m, n) or not _fp32_cpu(residual) or not residual.is_contiguous()):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, w, norm_weight, residual)):
        return False
    return True


def skinny_mm(x2d: torch.Tensor, w: torch.Tensor, threads: int | None = None, out: torch.Tensor | None = None, *,
              norm_weight: torch.Tensor | None = None, eps: float = 1e-6, swiglu: bool = False,
              residual: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """``residual + f(x2d) @ w.T`` -> contiguous [M, N] (into ``out`` when given, which may be
    ``residual`` itself). f is the identity, or with ``norm_weight`` an RMSNorm (weight, ``eps``)
    of each row, or with ``swiglu`` silu(gate) * up of a [M, 2K] input (gate first) -- fused into
    the packing of x, so the normalized / activated rows never exist as tensors. ``x2d`` may have
    any strides. Requires ``available()`` and ``supports(...)`` (``check=False``: the caller has
    just called supports() on these operands); no autograd."""
    global calls
    lib = _load()
    if lib is None:
        raise RuntimeError(f"skinny CPU GEMM unavailable: {_state.get('reason')}")
    if check and not supports(x2d, w, norm_weight, swiglu, residual):
        raise ValueError(f"skinny_mm does not take x {tuple(x2d.shape)} {x2d.dtype} {x2d.device} / "
                         f"w {tuple(w.shape)} {w.dtype} {w.device} (see cpu_gemm.supports)")
    m = x2d.shape[0]
    n, k = w.shape
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif out.shape != (m, n) or out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"skinny_mm out must be a contiguous fp32 CPU tensor of shape {(m, n)}, "
                         f"got {tuple(out.shape)} {out.dtype} {out.device}")
    mode = 1 if norm_weight is not None else 2 if swiglu else 0
    rc = lib.mr_skinny_gemm_ex(w.data_ptr(), n, k, w.stride(0), x2d.data_ptr(), m, x2d.stride(0), x2d.stride(1),
                               mode, norm_weight.data_ptr() if norm_weight is not None else None, float(eps),
                               residual.data_ptr() if residual is not None else None, out.data_ptr(),
                               int(threads or torch.get_num_threads()))
    if rc == 2:
        raise MemoryError(f"skinny_mm could not allocate its {k} x {(m + 7) // 8 * 8} packing buffer")
    if rc != 0:
        raise RuntimeError(f"skinny_mm rejected {m} rows (at most {MAX_ROWS})")
    calls += 1
    return out


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     cos_t: torch.Tensor, sin_t: torch.Tensor, groups: int, per: int, head_dim: int,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                     scale: float | None = None, threads: int | None = None) -> torch.Tensor | None:
    """One decode step's attention for M rows, in one call: QK-norm (optional), RoPE, the new
    keys/values written into the caches at ``pos``, and softmax attention over positions 0..pos.

    qkv [M, groups * (per + 2) * head_dim] (Megatron's fused layout: per group, its ``per`` query
    heads, then k, then v); k_cache / v_cache [M, groups, T, head_dim] (views of the engine's
    cache; written in place); pos [M] int64; cos_t / sin_t [>= max(pos) + 1, head_dim]
    (rotate-half tables). Returns [M, groups * per * head_dim] (head g * per + j at columns
    (g * per + j) * head_dim), or None when these operands are not ones it takes (the caller then
    runs the PyTorch ops). fp32 CPU only; no autograd."""
    lib = _load()
    if lib is None:
        return None
    m = qkv.shape[0]
    tensors = [qkv, k_cache, v_cache, cos_t, sin_t] + [t for t in (q_norm, k_norm) if t is not None]
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or not all(_fp32_cpu(t) for t in tensors):
        return None
    if (qkv.dim() != 2 or not qkv.is_contiguous() or qkv.shape[1] != groups * (per + 2) * head_dim
            or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride()
            or tuple(k_cache.shape[:2]) != (m, groups) or k_cache.shape[3] != head_dim or k_cache.stride(3) != 1
            or pos.shape != (m,) or pos.dtype != torch.int64 or pos.device.type != "cpu"
            or not (cos_t.is_contiguous() and sin_t.is_contiguous()) or cos_t.shape != sin_t.shape
            or cos_t.shape[1] != head_dim):
        return None
    if m == 0:
        return None
    pos = pos.contiguous()
    top = int(pos.max())
    if int(pos.min()) < 0 or top >= k_cache.shape[2] or top >= cos_t.shape[0]:
        return None
    for t in (q_norm, k_norm):
        if t is not None and (t.shape != (head_dim,) or not t.is_contiguous()):
            return None
    out = torch.empty(m, groups * per * head_dim, dtype=torch.float32)
    rc = lib.mr_decode_attention(
        qkv.data_ptr(), m, groups, per, head_dim, k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), pos.data_ptr(), cos_t.data_ptr(), sin_t.data_ptr(),
        q_norm.data_ptr() if q_norm is not None else None, k_norm.data_ptr() if k_norm is not None else None,
        float(eps), float(scale if scale is not None else head_dim ** -0.5), out.data_ptr(),
        int(threads or torch.get_num_threads()))
    if rc != 0:
        raise MemoryError("decode_attention could not allocate its scratch buffers")
    global attention_calls
    attention_calls += 1
    return out
