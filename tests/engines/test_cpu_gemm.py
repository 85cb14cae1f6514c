"""The skinny CPU GEMM (engines/cpu_gemm.py + csrc/skinny_gemm.c) against a float64 reference.

Every shape class the kernel has a code path for: 16- and 8-column tiles, the 6-row tiles and
the N % 6 tail rows, M from 1 to MAX_ROWS (padding to a multiple of 8), K of 1 and odd K,
strided inputs (a transposed x, a weight that is a column slice of a wider matrix). The output
is pre-filled with NaN, so an element the kernel never writes fails the comparison. The error
bound is the standard one for an fp32 dot product of length K, relative to sum |x| |w|.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_recycle.engines import cpu_gemm

HAVE_GCC = shutil.which("gcc") is not None
pytestmark = pytest.mark.skipif(not (HAVE_GCC and cpu_gemm._cpu_has_avx2_fma()),
                                reason="needs gcc and an AVX2/FMA CPU")


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))
    got = cpu_gemm.skinny_mm(x, w, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = x.double() @ w.double().T
    bound = 2 * x.shape[1] * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + 1e-30
    err = (got.double() - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g} for x {tuple(x.shape)} w {tuple(w.shape)}"


def test_kernel_is_built_where_it_can_be():
    """On a machine with gcc and AVX2/FMA the kernel must load, not silently fall back."""
    cpu_gemm.reset()
    assert cpu_gemm.available(), cpu_gemm.unavailable_reason()


@pytest.mark.parametrize("m", [1, 3, 5, 8, 9, 16, 17, 24, 31, 40, 64])
@pytest.mark.parametrize("n,k", [(1, 7), (5, 1), (6, 33), (13, 64), (100, 576), (577, 129), (19, 1537)])
def test_matches_float64_reference(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    _check(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g))


def test_strided_operands_and_threads():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(300, 12, generator=g).t()  # [12, 300], column-major
    wide = torch.randn(50, 400, generator=g)
    w = wide[:, 50:350]  # row stride 400 > K = 300
    _check(x_t, w)
    _check(torch.randn(16, 600, generator=g)[:, ::2], torch.randn(31, 300, generator=g))  # sxk = 2
    ref = cpu_gemm.skinny_mm(x_t, w, threads=1)
    torch.testing.assert_close(cpu_gemm.skinny_mm(x_t, w, threads=2), ref, rtol=0, atol=0)  # same order


@pytest.mark.parametrize("m", [1, 7, 13, 16, 40])
@pytest.mark.parametrize("k", [5, 576])
def test_fused_prologues_and_residual(m, k):
    """RMSNorm and SwiGLU applied while packing x, plus a residual added on output, against the
    same arithmetic in float64; ``out`` may be the residual itself (in place)."""
    g = torch.Generator().manual_seed(m + k)
    n, eps = 37, 1e-5
    w = torch.randn(n, k, generator=g)
    nw = torch.rand(k, generator=g) + 0.5
    res = torch.randn(m, n, generator=g)
    x = torch.randn(k, m, generator=g).t() * 3  # strided
    xd = x.double()
    normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    both = torch.randn(m, 2 * k, generator=g) * 2
    act = torch.nn.functional.silu(both[:, :k].double()) * both[:, k:].double()
    u = 2.0**-24
    for got, f, resid in ((cpu_gemm.skinny_mm(x, w, norm_weight=nw, eps=eps), normed, 0.0),
                          (cpu_gemm.skinny_mm(both, w, swiglu=True), act, 0.0),
                          (cpu_gemm.skinny_mm(x, w, residual=res), xd, res.double())):
        ref = resid + f @ w.double().T
        bound = 4 * (k + 2) * u * (f.abs() @ w.double().abs().T) + 2 * u * (ref.abs() + 1e-30)
        assert ((got.double() - ref).abs() <= bound).all(), ((got.double() - ref).abs() / bound).max()
    inplace = res.clone()
    out = cpu_gemm.skinny_mm(both, w, swiglu=True, residual=inplace, out=inplace)
    assert out.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(out.double(), res.double() + act @ w.double().T, atol=1e-3, rtol=1e-4)
    assert not cpu_gemm.supports(both, w)  # [M, 2K] without swiglu
    assert not cpu_gemm.supports(x, w, norm_weight=nw[:-1])
    assert not cpu_gemm.supports(x, w, residual=torch.randn(m, 2 * n)[:, ::2])


def _attention_reference(qkv, kc, vc, pos, cos_t, sin_t, g, per, hd, qn, kn, eps, scale):
    """float64: QK-norm, rotate-half RoPE, cache write, softmax attention over 0..pos."""
    m = qkv.shape[0]
    blk = qkv.double().view(m, g, per + 2, hd)
    kc, vc = kc.double().clone(), vc.double().clone()
    out = torch.zeros(m, g, per, hd, dtype=torch.float64)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w.double() if w is not None else v

    def rope(v, p):
        c, s = cos_t[p].double(), sin_t[p].double()
        rot = torch.cat([-v[..., hd // 2:], v[..., : hd // 2]], -1)
        return v * c + rot * s

    for i in range(m):
        p = int(pos[i])
        k = rope(rms(blk[i, :, per], kn), p)
        kc[i, :, p], vc[i, :, p] = k, blk[i, :, per + 1]
        q = rope(rms(blk[i, :, :per], qn), p)  # [g, per, hd]
        scores = torch.einsum("gjd,gtd->gjt", q, kc[i, :, : p + 1]) * scale
        out[i] = torch.einsum("gjt,gtd->gjd", scores.softmax(-1), vc[i, :, : p + 1])
    return out.reshape(m, -1), kc, vc


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("hd", [8, 12, 64])
def test_decode_attention_matches_float64_reference(qk_norm, hd):
    g_, per, m, cap = 3, 3, 5, 40
    gen = torch.Generator().manual_seed(hd + qk_norm)
    qkv = torch.randn(m, g_ * (per + 2) * hd, generator=gen)
    cache = torch.randn(2, m, g_, cap, hd, generator=gen)  # stale values past pos must be ignored
    pos = torch.tensor([0, 3, 17, 39, 8])
    ang = torch.arange(cap, dtype=torch.float64)[:, None] * torch.rand(hd // 2, generator=gen, dtype=torch.float64)
    emb = torch.cat([ang, ang], -1)
    cos_t, sin_t = emb.cos().float(), emb.sin().float()
    qn = torch.rand(hd, generator=gen) + 0.5 if qk_norm else None
    kn = torch.rand(hd, generator=gen) + 0.5 if qk_norm else None
    ref, kref, vref = _attention_reference(qkv, cache[0], cache[1], pos, cos_t, sin_t, g_, per, hd, qn, kn, 1e-6, 0.3)
    before = cpu_gemm.attention_calls
    out = cpu_gemm.decode_attention(qkv, cache[0], cache[1], pos, cos_t, sin_t, g_, per, hd, qn, kn, 1e-6, 0.3)
    assert out is not None and cpu_gemm.attention_calls == before + 1
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    for i in range(len(pos)):  # the new key/value written at pos, everything else untouched
        torch.testing.assert_close(cache[0, i].double(), kref[i], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(cache[1, i].double(), vref[i], atol=0, rtol=0)


def test_decode_attention_declines_what_it_does_not_take():
    qkv = torch.randn(2, 1 * 3 * 8)
    cache = torch.zeros(2, 2, 1, 10, 8)
    tab = torch.zeros(10, 8)
    pos = torch.tensor([1, 2])
    args = (tab, tab, 1, 1, 8)
    assert cpu_gemm.decode_attention(qkv, cache[0], cache[1], pos, *args) is not None
    assert cpu_gemm.decode_attention(qkv.double(), cache[0], cache[1], pos, *args) is None
    assert cpu_gemm.decode_attention(qkv, cache[0], cache[1], torch.tensor([1, 10]), *args) is None  # past the cache
    assert cpu_gemm.decode_attention(qkv, cache[0], cache[1], pos.int(), *args) is None
    assert cpu_gemm.decode_attention(qkv[:, :-1], cache[0], cache[1], pos, *args) is None


def test_rejects_what_it_does_not_take():
    w = torch.randn(8, 4)
    assert not cpu_gemm.supports(torch.randn(cpu_gemm.MAX_ROWS + 1, 4), w)
    assert not cpu_gemm.supports(torch.randn(3, 4, dtype=torch.float64), w.double())
    assert not cpu_gemm.supports(torch.randn(3, 5), w)
    assert not cpu_gemm.supports(torch.randn(3, 4), torch.randn(4, 8).t())  # weight rows not contiguous
    assert not cpu_gemm.supports(torch.randn(3, 4, requires_grad=True), w)
    with torch.no_grad():
        assert cpu_gemm.supports(torch.randn(3, 4, requires_grad=True), w)
    with pytest.raises(ValueError, match="does not take"):
        cpu_gemm.skinny_mm(torch.randn(65, 4), w)
    with pytest.raises(ValueError, match="out must be"):
        cpu_gemm.skinny_mm(torch.randn(3, 4), w, out=torch.empty(8, 3))


def test_build_cache_key_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_RECYCLE_CACHE", str(tmp_path))
    old_umask = os.umask(0o022)
    try:
        first = cpu_gemm.build()
    finally:
        os.umask(old_umask)
    assert first.parent == tmp_path / "cpu_gemm" and first.exists()
    assert first.stat().st_mode & 0o777 == 0o755  # others sharing the cache can load it (mkstemp gave 0600)
    assert cpu_gemm.build() == first  # cached
    edited = tmp_path / "edited.c"
    edited.write_text(cpu_gemm.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(cpu_gemm, "SOURCE", edited)
    assert cpu_gemm.build() != first  # a changed source is a new library
    broken = tmp_path / "broken.c"
    broken.write_text("int mr_skinny_gemm( {\n")
    monkeypatch.setattr(cpu_gemm, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="building broken.c failed"):
        cpu_gemm.build()
    assert not list((tmp_path / "cpu_gemm").glob(".skinny_gemm_*"))  # no half-written file left
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="cannot run the C compiler"):
        cpu_gemm.build()


def test_a_compiler_timeout_falls_back_once(monkeypatch, tmp_path, caplog):
    """A build that times out (a loaded machine) raised TimeoutExpired through available() into
    the rollout, and every later call tried the 300 s build again."""
    real_run = subprocess.run
    builds = []

    def run(cmd, *args, **kwargs):
        if "-o" in cmd:
            builds.append(cmd)
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setenv("MEGATRON_RECYCLE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemm.subprocess, "run", run)
    try:
        cpu_gemm.reset()
        with caplog.at_level("WARNING", logger=cpu_gemm.__name__):
            assert not cpu_gemm.available() and not cpu_gemm.available()
        if cpu_gemm._cpu_has_avx2_fma():
            assert len(builds) == 1 and "did not finish" in cpu_gemm.unavailable_reason()
            assert "decoding uses PyTorch's matmul" in caplog.text
            assert not list((tmp_path / "cpu_gemm").glob(".skinny_gemm_*"))
    finally:
        cpu_gemm.reset()


def test_switch_off_and_failed_build_fall_back(monkeypatch, tmp_path, caplog):
    try:
        monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
        cpu_gemm.reset()
        assert not cpu_gemm.available()
        assert cpu_gemm.ENV_SWITCH in cpu_gemm.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_gemm.skinny_mm(torch.randn(2, 3), torch.randn(4, 3))
        monkeypatch.delenv(cpu_gemm.ENV_SWITCH)
        monkeypatch.setenv("MEGATRON_RECYCLE_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        cpu_gemm.reset()
        with caplog.at_level("WARNING", logger=cpu_gemm.__name__):
            assert not cpu_gemm.available()
        assert "decoding uses PyTorch's matmul" in caplog.text
    finally:
        cpu_gemm.reset()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_shares_pytorchs_openmp_runtime(tmp_path):
    """One libgomp in the process: the kernel's OpenMP threads are PyTorch's, never a second pool."""
    code = textwrap.dedent("""
        import torch
        torch.ones(256, 256) @ torch.ones(256, 256)
        from megatron_recycle.engines import cpu_gemm
        assert cpu_gemm.available(), cpu_gemm.unavailable_reason()
        cpu_gemm.skinny_mm(torch.randn(8, 64), torch.randn(32, 64))
        libs = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line or 'libomp' in line}
        print(len(libs), sorted(libs))
        assert len(libs) == 1, libs
    """)
    env = dict(os.environ, MEGATRON_RECYCLE_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_source_ships_with_the_package():
    assert cpu_gemm.SOURCE.exists() and cpu_gemm.SOURCE.parent == Path(cpu_gemm.__file__).parent / "csrc"
