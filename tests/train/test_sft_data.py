"""The oracle-trajectory reader of the SFT warm-up: malformed rows are errors naming file and line,
or, with skip_bad_rows, skipped, counted and reported once (by rank 0 of a torchrun world)."""

from __future__ import annotations

import json

import pytest

from megatron_recycle.train.sft import SFTDataError, read_oracle_file

GOOD = {"question": "Who wrote Hamlet?", "turns": [{"generated": "<answer> Shakespeare </answer>"}]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_rows_are_errors_naming_the_line(tmp_path):
    path = _write(tmp_path / "sft.jsonl", [GOOD, {"question": "q", "turns": []}])
    with pytest.raises(SFTDataError, match=r"sft.jsonl:2: malformed oracle trajectory: needs a 'question'"):
        read_oracle_file(path)
    path = _write(tmp_path / "sft2.jsonl", [GOOD, "{not json", GOOD])
    with pytest.raises(SFTDataError, match=r"sft2.jsonl:2"):
        read_oracle_file(path)
    path = _write(tmp_path / "sft3.jsonl", [{"question": "q", "turns": [{"information": "x"}]}])
    with pytest.raises(SFTDataError, match="every turn needs a 'generated' string"):
        read_oracle_file(path)
    # rows that are not objects were an AttributeError traceback, even with skip_bad_rows
    for i, row in enumerate(('["not", "an", "object"]', "null")):
        path = _write(tmp_path / f"sft_list{i}.jsonl", [GOOD, row])
        with pytest.raises(SFTDataError, match=r":2: malformed oracle trajectory: expected a JSON object"):
            read_oracle_file(path)
        assert read_oracle_file(path, skip_bad_rows=True) == [GOOD]
    bad_info = {"question": "q", "turns": [{"generated": "<search> x </search>", "information": ["a", "b"]}]}
    with pytest.raises(SFTDataError, match="'information' must be a string"):
        read_oracle_file(_write(tmp_path / "sft4.jsonl", [bad_info]))


@pytest.mark.parametrize("rank", ["0", "1"])
def test_skipped_rows_are_counted_and_reported_by_rank0_only(tmp_path, monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)
    path = _write(tmp_path / "sft.jsonl", [GOOD, "{not json", {"question": 3, "turns": [{}]}, "", GOOD])
    rows = read_oracle_file(path, skip_bad_rows=True)
    assert rows == [GOOD, GOOD]
    out = capsys.readouterr().out
    if rank == "0":
        assert "sft.jsonl:2: skipped malformed row" in out and "sft.jsonl:3: skipped malformed row" in out
        assert "skipped 2 malformed rows" in out
    else:
        assert out == ""


def test_a_file_without_usable_rows_is_an_error(tmp_path):
    path = _write(tmp_path / "sft.jsonl", ["{not json"])
    with pytest.raises(SFTDataError, match="no usable oracle trajectories"):
        read_oracle_file(path, skip_bad_rows=True)


class _Encoding(dict):
    """What a transformers tokenizer returns: the ids by key and by attribute."""

    def __init__(self, ids):
        super().__init__(input_ids=ids)
        self.input_ids = ids


class _BosTokenizer:
    """A base model's tokenizer: no chat template, BOS (id 1) added with special tokens."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return _Encoding(([1] if add_special_tokens else []) + ids)


def test_sft_starts_a_trajectory_with_the_rollouts_prompt_ids():
    from megatron_recycle.agent.protocol import prompt_token_ids
    from megatron_recycle.train.sft import tokenize_oracle

    tok = _BosTokenizer()
    prompt = prompt_token_ids(tok, "Who?")
    assert prompt[0] == 1  # the plain prompt keeps the tokenizer's BOS
    ids, mask = tokenize_oracle({"question": "Who?", "turns": [{"generated": "<answer> x </answer>"}]}, tok, 10_000)
    assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == [0] * len(prompt)
    assert ids[len(prompt):] == [ord(c) for c in "<answer> x </answer>"] and set(mask[len(prompt):]) == {1}


def test_replica_rows_never_repeat_an_example_when_the_batch_is_smaller_than_dp():
    from megatron_recycle.train.sft import replica_rows

    encoded = [([10 + i, 20 + i, 30 + i], [0, 1, 1]) for i in range(4)]
    take = [2, 0]  # sft.batch_size 2 over DP 4
    rows = [replica_rows(encoded, take, r, 4, pad=0) for r in range(4)]
    assert rows[0] == ([[12, 22, 32]], [[0, 1, 1]]) and rows[1] == ([[10, 20, 30]], [[0, 1, 1]])
    assert rows[2] == rows[3] == ([[0, 0]], [[0, 0]])  # all masked: no weight, no normalizer tokens
    trained = sum(sum(m) for _, masks in rows for m in masks)
    assert trained == 4  # each example's two loss tokens once
    # DP 2 with four examples: every-other split, every example once
    assert [replica_rows(encoded, [0, 1, 2, 3], r, 2, 0)[0] for r in (0, 1)] == [
        [encoded[0][0], encoded[2][0]], [encoded[1][0], encoded[3][0]]]


def test_a_resume_over_other_training_rows_is_refused():
    """SFT and GRPO checkpoints record a digest of their training rows: the data order (SFT) and
    the pool's query ids (GRPO) index them, so the same count of other rows must not resume."""
    from megatron_recycle.data.datasets import QAExample
    from megatron_recycle.train.checkpoint import CheckpointError
    from megatron_recycle.train.runtime import check_training_set, training_set_digest

    rows = [{"question": "q1", "turns": [{"generated": "a"}]}, {"question": "q2", "turns": [{"generated": "b"}]}]
    digest = training_set_digest(rows)
    assert training_set_digest([dict(r) for r in rows]) == digest
    assert training_set_digest(rows[::-1]) != digest
    qa = [QAExample("1", "q", ["a"], "s"), QAExample("2", "r", ["b"], "s")]
    assert training_set_digest(qa) != training_set_digest([QAExample("1", "q", ["a", "c"], "s"), qa[1]])
    assert training_set_digest(qa) == training_set_digest([QAExample("x", "q", ["a"], "other"), qa[1]])  # ids, sources
    check_training_set(None, digest, "SFT rows", "sft.jsonl")  # a checkpoint from before the record
    check_training_set(digest, digest, "SFT rows", "sft.jsonl")
    with pytest.raises(CheckpointError, match="sft.jsonl no longer holds the SFT rows"):
        check_training_set(training_set_digest(rows[::-1]), digest, "SFT rows", "sft.jsonl")
