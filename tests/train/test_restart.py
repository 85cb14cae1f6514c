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


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_fresh_run_that_dies_in_set_up_does_not_resume_the_earlier_run_after_a_restart(
        command, no_torchrun, tmp_path):
    """Before: `train` and `sft` moved an earlier run's checkpoints aside only after the set-up
    (model build, weight load, engine start), so a fresh run that died there (an OOM) and was
    restarted by torchrun (--max-restarts) found the earlier run's checkpoints still in place and
    resumed them as its own. Now the earlier run is moved aside before the set-up."""
    from megatron_recycle.train import grpo, sft
    from megatron_recycle.train import runtime as rtm

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "train.eval_every=0"])
    folder = cfg.run_dir / ("sft" if command == "sft" else "")
    (folder / "checkpoints" / "step_40").mkdir(parents=True)
    (folder / "checkpoints" / "step_40" / "manifest.json").write_text("{}")

    class SetUpDied(RuntimeError):
        pass

    def dying_setup(*a, **k):
        raise SetUpDied("out of memory while building the model")

    no_torchrun.setattr(rtm, "ensure_data", lambda cfg: {"train": "t", "dev": "d", "sft": "s"})
    no_torchrun.setattr(rtm, "read_examples", lambda *a: list(range(100)))
    no_torchrun.setattr(grpo, "check_against_data", lambda *a: None)
    no_torchrun.setattr(sft, "read_oracle_file", lambda *a: [])
    no_torchrun.setattr(rtm, "setup_runtime", dying_setup)
    run = (lambda: sft.run_sft(cfg, resume=False)) if command == "sft" else (lambda: grpo.run_grpo(cfg, resume=False))
    with pytest.raises(SetUpDied):
        run()
    assert not (folder / "checkpoints").exists()  # moved aside before the set-up died
    (earlier,) = (folder / "previous").iterdir()
    assert (earlier / "checkpoints" / "step_40" / "manifest.json").is_file()  # nothing lost
    no_torchrun.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun starts the same command again
    with pytest.raises(SetUpDied):
        run()
    assert len(list((folder / "previous").iterdir())) == 1  # a resume now: nothing more moved
