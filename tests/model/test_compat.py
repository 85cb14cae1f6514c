"""The CPU patches are needed and right: each megatron-core call fails unpatched, works patched.

The probe runs in a fresh process (the patches are process-global). If a newer megatron-core
stops needing a patch, the "unpatched" assertion fails here and the patch should be dropped; if
a patch becomes wrong, the "patched" value checks fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")

PROBE = Path(__file__).with_name("_compat_probe.py")


@pytest.fixture(scope="module")
def probe() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(PROBE)], capture_output=True, text=True, env=env, timeout=240, cwd=PROBE.parent
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE-JSON ")][-1]
    return json.loads(line[len("PROBE-JSON ") :])


# the messages of a CPU build of torch and of a CUDA build on a machine with no GPU driver
CUDA_MISSING = ("Torch not compiled with CUDA", "Cannot initialize CUDA", "Found no NVIDIA driver", "CUDA")


def test_patch1_rng_tracker(probe):
    r = probe["seed_tracker"]
    assert r["unpatched"] is not None and any(s in r["unpatched"] for s in CUDA_MISSING), r
    assert r["patched"] == {
        "cpu_state_restored": True,
        "stream_continues": True,
        "tp_seed_matches_megatron_formula": True,
    }


def test_patch2_current_device_for_rotary(probe):
    r = probe["rotary"]
    assert r["unpatched"] is not None and any(s in r["unpatched"] for s in CUDA_MISSING), r
    assert r["patched"] == {"device": "cpu", "shape": [5, 1, 1, 8]}


def test_patch3_cuda_device_arguments(probe):
    r = probe["grad_norm"]
    assert r["unpatched"] is not None and any(s in r["unpatched"] for s in CUDA_MISSING), r
    assert r["patched"]["norm"] == pytest.approx(r["patched"]["expected"], rel=1e-6)


def test_patch4_cuda_type_assertion_in_clip_grads(probe):
    r = probe["clip_grads"]
    assert r["unpatched"] is not None and r["unpatched"].startswith("AssertionError"), r
    assert r["patched"]["grad"] == pytest.approx(r["patched"]["expected"], rel=1e-6)


def test_device_mode_semantics(probe):
    r = probe["type_strings"]
    assert r["unpatched"] is not None  # .cuda() / device='cuda' fail without the mode
    assert r["patched"] == {
        "float_type": "torch.cuda.FloatTensor",
        "to_double_dtype": "torch.float64",
        "to_cuda_string": ["torch.float64", "cpu"],
        "dot_cuda_device": "cpu",
        "factory_device": "cpu",
        "to_cuda_device": "cpu",
    }


def test_device_mode_suspended_block(probe):
    """compat.device_mode_suspended() turns the mode off inside the block only (NativeEngine's loop)."""
    assert probe["suspended_factory"] is not None and any(s in probe["suspended_factory"] for s in CUDA_MISSING)
    assert probe["resumed_factory"] == "cpu"


def test_device_mode_lifted_block(probe):
    """compat.device_mode_lifted() takes only the compat mode off (engines/vllm.py, around vLLM)."""
    assert probe["lifted_factory"] is not None and any(s in probe["lifted_factory"] for s in CUDA_MISSING)
    assert probe["lifted_type"] == "torch.FloatTensor" and probe["relifted_type"] == "torch.cuda.FloatTensor"
    assert probe["lifted_under_other_mode_count"] == 0
    assert any(s in probe["lifted_under_other_mode_factory"] for s in CUDA_MISSING)
    assert probe["other_mode_after_count"] > 0


def test_idempotent_and_removable(probe):
    assert probe["applied"] is True and probe["applied_again"] is True
    assert probe["after_remove_unpatched_again"] is not None


def test_apply_is_noop_with_cuda(monkeypatch):
    from megatron_recycle.model import compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = compat.cpu_compat_applied()
    assert compat.apply_cpu_compat() is False
    assert compat.cpu_compat_applied() == before


def test_patch5_current_stream_for_grad_sync(probe):
    """Newer megatron-core (0.19 here; not 0.16) waits on torch.cuda.current_stream() before it
    reduces gradients. The CPU stand-in makes that a no-op: the reduced gradient is right on every
    version, and without the patch the reduction fails exactly when megatron calls current_stream."""
    assert probe["stream_patched"] == "_CpuStream"
    r = probe["grad_sync"]
    assert r["patched"]["main_grad"] == r["patched"]["expected"], r
    without = probe["grad_sync_without_stream_patch"]
    if probe["megatron_waits_on_current_stream"]:
        assert without is not None and any(s in without for s in CUDA_MISSING), without
    else:
        assert without is None, without
    assert probe["after_remove_stream"] is not None and any(s in probe["after_remove_stream"] for s in CUDA_MISSING)


def test_patch6_recomputation_rng_states(probe):
    """Activation recomputation (model.recompute) saves and restores the CUDA generator around the
    recomputed forward: unpatched it fails on a CPU; patched the CPU generator stands in, so the
    recomputation draws the forward's random numbers and the stream goes on unchanged."""
    r = probe["recompute"]
    assert r["unpatched"] is not None and any(s in r["unpatched"] for s in CUDA_MISSING), r
    assert r["patched"] == {"grad_matches": True, "recomputed_same_draw": True, "stream_continues": True}


def test_patch7_synchronize_for_the_pipeline_shape_exchange(probe):
    """Pipeline stages exchanging micro-batches of different shapes (length-grouped micro-batches,
    config.variable_seq_lengths) first exchange the shapes, and megatron-core synchronizes CUDA
    after that: unpatched it fails on a CPU; patched it is a no-op. The exchange itself between two
    stages is exercised by the PP tests of tests/train/test_step.py."""
    r = probe["shape_exchange"]
    assert r["unpatched"] is not None and any(s in r["unpatched"] for s in CUDA_MISSING), r
    assert r["patched"] == {"shapes": [[0, 0, 0], [0, 0, 0]]}
    assert probe["after_remove_synchronize"] is not None
    assert any(s in probe["after_remove_synchronize"] for s in CUDA_MISSING)
