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
# Tests choose the group attention route themselves (each device's default unless a test names one)
os.environ.pop("MEGATRON_RECYCLE_PACKED_ATTENTION", None)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels can only run in the interpreter; it must be on before
    # any @triton.jit function is defined (PLATFORM.md).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

# Worker functions of multi-process tests (torch.multiprocessing.spawn) are pickled by module
# name, e.g. tests.pool.test_pool_distributed, so the children must be able to import `tests`.
# The repository root is APPENDED (never prepended) to sys.path: site-packages keeps priority, so
# this never shadows an installed package by a folder of the checkout (e.g. HF's `kernels`).
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


def pytest_runtest_logreport(report):
    """With MR_REPORT_FAILURES_AT_ONCE=1, write each failure's report to stderr the moment it is
    known, not only in the summary at the end: a run stopped by a time limit (tools/gpu_checks.sh
    on a lent GPU) then still shows why each test failed. Under pytest-xdist only the controller
    writes (the workers' reports reach it)."""
    if os.environ.get("MR_REPORT_FAILURES_AT_ONCE") != "1" or not report.failed:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    sys.__stderr__.write(f"\n=== FAILED ({report.when}) {report.nodeid} ===\n{report.longreprtext[-6000:]}\n")
    sys.__stderr__.flush()
