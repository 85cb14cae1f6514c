"""Every Triton kernel compiles for sm_90 (H100/H200) at the launch configurations used on CUDA.

The interpreter tests check what the kernels compute; this checks that the compiler accepts them
(the interpreter does not compile), that nothing spills to local memory, and that the kernels
that carry the bytes (log-probs over the vocabulary, the GRPO loss at the benchmark's widths) read
with 16-byte vector loads. It runs tools/compile_kernels.py in a subprocess, because the test
session imports Triton in interpreter mode (TRITON_INTERPRET=1), where kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _declared_kernels() -> set[str]:
    """Names of the @triton.jit functions ending in _kernel, read from the kernel sources."""
    names = set()
    for src in (ROOT / "kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", src.read_text()))
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    if not PTXAS.exists():
        pytest.skip(f"this Triton has no CUDA backend binaries ({PTXAS} is missing)")
    out = tmp_path_factory.mktemp("aot") / "kernels_compile"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_every_kernel_compiles_for_sm90(compiled):
    declared = _declared_kernels()
    assert len(declared) >= 6, declared  # advantages x2, loss fwd/bwd, log-prob stats/grad (at least)
    assert {r["kernel"] for r in compiled["rows"]} == declared
    assert compiled["meta"]["kernels_not_compiled"] == []
    assert all(r["arch"] == 90 for r in compiled["rows"])
    # every constexpr branch the launchers use was compiled, not only one per kernel
    variants = {(r["kernel"], r["constexprs"]) for r in compiled["rows"]}
    assert ("_grpo_loss_bwd_kernel", "HAS_REF=True, USE_KL=True, HAS_DUAL=True, ROW_MEAN=False, BLOCK_T=2048") in variants
    assert ("_grpo_loss_bwd_kernel", "HAS_REF=False, USE_KL=False, HAS_DUAL=True, ROW_MEAN=True, BLOCK_T=2048") in variants
    finish = {r["constexprs"] for r in compiled["rows"] if r["kernel"] == "_grpo_loss_finish_kernel"}
    assert {re.search(r"AGG=(\d)", c).group(1) for c in finish} == {"0", "1", "2", "3"}, finish
    assert {re.search(r"NORM=(\d)", c).group(1) for c in finish} == {"0", "1", "2"}, finish
    assert ("_logprob_grad_kernel", "HAS_G_LP=True, HAS_G_ENT=True, HAS_MASK=False, BLOCK_V=4096") in variants
    for name in ("_logprob_stats_kernel", "_logprob_grad_kernel", "_logprob_combine_kernel"):  # row_mask's form too
        assert any(k == name and "HAS_MASK=True" in c for k, c in variants), name
    stats = {r["constexprs"] for r in compiled["rows"] if r["kernel"] == "_logprob_stats_kernel"}
    for final in ("True", "False"):  # one rank merges in the pass; a TP shard writes its statistics
        for ent in ("True", "False"):
            assert any(f"WITH_ENT={ent}" in c and f"FINAL={final}" in c for c in stats), (final, ent, stats)
    combine = {r["constexprs"] for r in compiled["rows"] if r["kernel"] == "_logprob_combine_kernel"}
    assert any("world=1" not in c for c in combine), combine  # the tensor-parallel merge, not only one rank
    assert any(
        r["kernel"] == "_adv_contiguous_kernel" and "ACC=fp64" in r["constexprs"] for r in compiled["rows"]
    )


def test_joint_reduction_crosses_the_warps_fewer_times(compiled):
    """The loss forward's joint reduction (LOSS_FWD_JOINT) compiles, and its PTX has fewer block-wide
    barriers than the eight separate reductions of the same setting (bf16, KL, dual clip, 2,048
    tokens, 4 warps): the point of it, which a GPU has yet to time."""
    fwd = {r["constexprs"]: r for r in compiled["rows"]
           if r["kernel"] == "_grpo_loss_fwd_kernel" and "lp_ptr:*bf16" in r["signature"]}
    same = "HAS_REF=True, HAS_DUAL=True, BLOCK_T=2048, TILES=1, JOINT="
    eight, joint = fwd[same + "False"], fwd[same + "True"]
    assert 0 < joint["barriers"] < eight["barriers"], (joint, eight)
    assert any(c.endswith("TILES=4, JOINT=True") for c in fwd), sorted(fwd)


def test_no_register_spills(compiled):
    for r in compiled["rows"]:
        assert r["regs"] is not None and 0 < r["regs"] <= 255, r
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, (
            f"{r['kernel']} ({r['constexprs']}) spills: {r}"
        )


def test_bandwidth_kernels_use_16_byte_loads(compiled):
    """The kernels whose bytes matter read 16 bytes per load instruction on aligned rows."""
    # (the combine kernel reads [world, 4, T] statistics, T times fewer bytes than the logits)
    logprob_rows = [r for r in compiled["rows"] if r["kernel"] in ("_logprob_stats_kernel", "_logprob_grad_kernel")]
    assert logprob_rows
    for r in logprob_rows:  # every log-prob launch here has a row width divisible by 16
        assert "v4.b32" in r["global_loads"], r
        if r["kernel"] == "_logprob_grad_kernel":
            assert "v4.b32" in r["global_stores"], r
    wide_loss = [
        r
        for r in compiled["rows"]
        if r["kernel"].startswith("_grpo_loss_") and "BLOCK_T=2048" in r["constexprs"]
    ]
    assert wide_loss
    for r in wide_loss:
        assert "v4.b32" in r["global_loads"], r


def test_the_compiler_refuses_interpreted_kernels_in_any_spelling():
    # TRITON_INTERPRET=true makes Triton define interpreter functions too: the tool recorded no
    # launch, printed an empty table and exited 0
    env = {**os.environ, "TRITON_INTERPRET": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--quick", "--out", "/nonexistent/x"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "run it without TRITON_INTERPRET" in proc.stderr, proc.stderr[-2000:]
