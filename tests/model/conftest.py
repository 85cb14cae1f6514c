"""Fixtures for the model tests: sibling helper modules (loaded by path) and a world of 1."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _load_sibling(name: str):
    """Import tests/model/<name>.py under a unique module name (no clash with other test dirs)."""
    key = f"_megatron_recycle_tests_model_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def tiny():
    """tests/model/_tiny.py: tiny random HF models of each family."""
    return _load_sibling("_tiny")


@pytest.fixture(scope="session")
def dist_launcher():
    """tests/model/_dist.py: the multi-process launcher."""
    return _load_sibling("_dist")


@pytest.fixture(scope="module")
def world1():
    """torch.distributed + megatron parallel_state for one process (TP=PP=1), torn down after."""
    from megatron_recycle.model.parallel import destroy_distributed, init_distributed

    layout = init_distributed(tp=1, pp=1, seed=0)
    yield layout
    destroy_distributed()
