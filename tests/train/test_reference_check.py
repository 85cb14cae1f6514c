"""grpo.check_reference: a resume measures the KL against the model its run started from."""

from __future__ import annotations

import pytest

from megatron_recycle.train.checkpoint import CheckpointError
from megatron_recycle.train.grpo import check_reference


def test_same_weights_pass_under_another_path():
    check_reference({"path": "runs/a/sft/hf", "digest": "d1"}, {"path": "/abs/runs/a/sft/hf", "digest": "d1"}, True)


def test_no_record_or_no_kl_is_not_checked(capsys):
    check_reference(None, {"path": "m", "digest": "d"}, True)  # a checkpoint from before the record
    check_reference(None, None, True)
    check_reference({"path": "m", "digest": "d"}, None, True)
    assert "had a KL term" in capsys.readouterr().out


@pytest.mark.parametrize("saved, current, words", [
    ({"path": "sft/hf", "digest": "d1"}, {"path": "base", "digest": "d2"}, "resume with --init-from sft/hf"),
    ({"path": "sft/hf", "digest": "d1"}, {"path": "sft/hf", "digest": "d2"}, "the same path, other weights now"),
    ({"path": "alias-a", "digest": None}, {"path": "alias-b", "digest": None}, "measured its KL against alias-a"),
])
def test_another_reference_is_refused(saved, current, words):
    with pytest.raises(CheckpointError, match=words):
        check_reference(saved, current, True)
