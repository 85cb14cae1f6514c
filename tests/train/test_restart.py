"""The resume decision after a torchrun restart, in one process (the multi-rank decision and the
launchers' restarts run in tests/model/test_distributed.py and tests/train/test_loop.py)."""

from __future__ import annotations

import pytest

from megatron_recycle.config import load_config
from megatron_recycle.train.pipeline import resume_after_restart


@pytest.fixture
def no_torchrun(monkeypatch):
    for key in ("TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_first_start_does_not_resume_unless_asked(no_torchrun, capsys):
    cfg = load_config(None, [])
    assert resume_after_restart(cfg, False, "run", "x") is False
    assert resume_after_restart(cfg, True, "run", "x") is True
    no_torchrun.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert resume_after_restart(cfg, False, "eval", "x") is False
    assert capsys.readouterr().out == ""


def test_a_restart_resumes_and_says_so(no_torchrun, capsys):
    cfg = load_config(None, [])
    no_torchrun.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert resume_after_restart(cfg, False, "eval", "results already written are reused") is True
    assert capsys.readouterr().out == (
        "[eval] torchrun restarted the workers: resuming as with --resume (results already written are reused)\n")
    assert resume_after_restart(cfg, True, "eval", "x") is True  # --resume given: nothing to say
    assert capsys.readouterr().out == ""
