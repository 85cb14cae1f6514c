"""QA file readers: FlashRAG jsonl, Search-R1 parquet, malformed rows, benchmark discovery."""

from __future__ import annotations

import json

import pytest

from megatron_recycle.data.datasets import (
    BENCHMARKS,
    QAFormatError,
    find_benchmark_files,
    read_qa_file,
)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_flashrag_jsonl(tmp_path):
    path = _write_jsonl(
        tmp_path / "hotpotqa" / "dev.jsonl",
        [
            {"id": "h1", "question": "Who? ", "golden_answers": ["A", "a b"], "metadata": {"level": "hard"}},
            {"question": "When?", "golden_answers": "1999"},
            {"id": 3, "question": "How many?", "golden_answers": [7]},
        ],
    )
    rows = read_qa_file(path)
    assert [r.id for r in rows] == ["h1", "hotpotqa_1", "3"]
    assert rows[0].question == "Who?" and rows[0].golden_answers == ["A", "a b"]
    assert rows[0].metadata == {"level": "hard"} and rows[0].source == "hotpotqa"
    assert rows[1].golden_answers == ["1999"] and rows[2].golden_answers == ["7"]
    assert rows.skipped == 0
    assert read_qa_file(path, source="mine")[0].source == "mine"


def test_bad_rows_raise_with_file_and_line_or_are_skipped_and_counted(tmp_path):
    path = _write_jsonl(
        tmp_path / "nq" / "test.jsonl",
        [
            {"question": "ok", "golden_answers": ["x"]},
            '{"question": "broken json"',
            {"question": "no answers"},
            {"question": "", "golden_answers": ["x"]},
            {"question": "empty answers", "golden_answers": []},
            ["not", "an", "object"],
            {"question": "ok too", "golden_answers": ["y"]},
        ],
    )
    with pytest.raises(QAFormatError, match=r"test.jsonl:2: not valid JSON"):
        read_qa_file(path)
    rows = read_qa_file(path, skip_bad_rows=True)
    assert [r.question for r in rows] == ["ok", "ok too"]
    assert rows.skipped == 5
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in rows.skipped_rows] == ["2", "3", "4", "5", "6"]
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(QAFormatError, match="no usable rows"):
        read_qa_file(only_bad, skip_bad_rows=True)
    with pytest.raises(FileNotFoundError):
        read_qa_file(tmp_path / "nope.jsonl")
    with pytest.raises(QAFormatError, match="unknown QA file type"):
        read_qa_file(_write_jsonl(tmp_path / "x.csv", ["a,b"]))


def test_search_r1_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "musique",
            "prompt": [
                {"role": "user", "content": "Answer the given question. ... Question: Who wrote X?\n"}
            ],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": ["Ann", "Anne"]}},
            "extra_info": {"split": "test", "index": 4},
        },
        {
            "data_source": "bamboogle",
            "prompt": [{"role": "user", "content": "Question: Where is Y?"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": []}},
            "extra_info": {"split": "test", "index": 5},
        },
    ]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(QAFormatError, match=r"test.parquet:row 2: 'reward_model.ground_truth.target' holds no non-empty"):
        read_qa_file(path)
    got = read_qa_file(path, skip_bad_rows=True)
    assert len(got) == 1 and got.skipped == 1
    ex = got[0]
    assert (ex.id, ex.question, ex.golden_answers, ex.source) == (
        "4",
        "Who wrote X?",
        ["Ann", "Anne"],
        "musique",
    )

    # Search-R1 files that kept the original columns: those win over the prompt text
    with_cols = [{**rows[0], "id": "m1", "question": "Who wrote X really?", "golden_answers": ["Ann"]}]
    pq.write_table(pa.Table.from_pylist(with_cols), tmp_path / "b.parquet")
    ex = read_qa_file(tmp_path / "b.parquet")[0]
    assert (ex.id, ex.question, ex.golden_answers) == ("m1", "Who wrote X really?", ["Ann"])


def test_find_benchmark_files(tmp_path):
    row = [{"question": "q", "golden_answers": ["a"]}]
    _write_jsonl(tmp_path / "nq" / "test.jsonl", row)
    _write_jsonl(tmp_path / "nq" / "dev.jsonl", row)
    _write_jsonl(tmp_path / "hotpotqa" / "dev.jsonl", row)
    _write_jsonl(tmp_path / "2wiki" / "dev.jsonl", row)
    _write_jsonl(tmp_path / "Bamboogle" / "test.jsonl", row)
    _write_jsonl(tmp_path / "popqa_test.jsonl", row)
    (tmp_path / "musique").mkdir()  # empty folder: still missing
    found = find_benchmark_files(tmp_path)
    assert found.found["nq"].name == "test.jsonl"  # test preferred over dev
    assert found.found["hotpotqa"].name == "dev.jsonl"
    assert found.found["2wikimultihopqa"].parent.name == "2wiki"
    assert found.found["bamboogle"].parent.name == "Bamboogle"
    assert found.found["popqa"].name == "popqa_test.jsonl"
    assert found.missing == ["triviaqa", "musique"]
    assert set(found.found) | set(found.missing) == set(BENCHMARKS)
    assert dict(found) == found.found and found["nq"] == found.found["nq"]  # usable as a plain dict
    with pytest.raises(FileNotFoundError):
        find_benchmark_files(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "row, error",
    [
        ({"question": "q", "golden_answers": [["Paris", "City of Light"]]}, "holds a list"),
        ({"question": "q", "golden_answers": [{"text": "Paris"}]}, "holds a dict"),
        ({"question": "q", "golden_answers": [True]}, "holds a bool"),
        # present but unusable: an error, not the next field read in its place
        ({"question": "q", "golden_answers": {"x": 1}, "answer": "Rome"}, "must be a list of answers"),
        ({"question": "q", "golden_answers": [], "answer": "Rome"}, "holds no non-empty answer"),
        # answers that could never match: a list printed as text (a CSV round trip), NaN, infinity
        ({"question": "q", "golden_answers": "['Paris', 'City of Light']"}, "holds the text of a list"),
        ({"question": "q", "golden_answers": ["['Paris']"]}, "holds the text of a list"),
        ({"question": "q", "golden_answers": [float("nan")]}, "holds nan"),
        ({"question": "q", "golden_answers": [1.0, float("inf")]}, "holds inf"),
    ],
)
def test_unusable_answers_are_errors(tmp_path, row, error):
    path = _write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(QAFormatError, match=error):
        read_qa_file(path)


def test_answer_fields_in_order_numbers_and_a_json_chat_prompt(tmp_path):
    rows = [
        {"question": "q1", "golden_answers": [1960.0, 3, "  x "]},
        {"question": "q2", "golden_answers": None, "answers": ["a"], "answer": "b"},
        {"question": "q3", "answer": "b"},
        {"prompt": json.dumps([{"role": "user", "content": "Answer. Question: who wrote Hamlet?\n"}]),
         "golden_answers": ["Shakespeare"]},
    ]
    rows += [
        # a JSON chat prompt written with a space after the bracket; text in brackets is an answer
        {"prompt": '[ {"role": "user", "content": "Answer. Question: who is x?\\n"} ]',
         "golden_answers": ["[citation needed]", 1e25]},
    ]
    got = read_qa_file(_write_jsonl(tmp_path / "ok.jsonl", rows))
    assert [ex.golden_answers for ex in got] == [["1960", "3", "x"], ["a"], ["b"], ["Shakespeare"],
                                                 ["[citation needed]", "1e+25"]]
    assert got[3].question == "who wrote Hamlet?" and got[4].question == "who is x?"


def test_a_bom_and_a_bad_byte_are_read_or_named_by_line(tmp_path):
    """A byte-order mark (Windows tools write one) is not part of the first row; a row that is not
    UTF-8 is that row's error (file and line), skippable like any malformed row."""
    rows = [json.dumps({"question": "first", "golden_answers": ["x"]}).encode(),
            b'{"question": "Caf\xe9?", "golden_answers": ["y"]}',
            json.dumps({"question": "third", "golden_answers": ["z"]}).encode()]
    path = tmp_path / "w.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")
    with pytest.raises(QAFormatError, match=r"w.jsonl:2: not UTF-8 text"):
        read_qa_file(path)
    got = read_qa_file(path, skip_bad_rows=True)
    assert [r.question for r in got] == ["first", "third"] and got.skipped == 1
    old_mac = tmp_path / "cr.jsonl"  # lines ended by a bare carriage return (read as lines before)
    old_mac.write_bytes(b"\r".join(rows[::2]) + b"\r")
    assert [r.question for r in read_qa_file(old_mac)] == ["first", "third"]
    whole = tmp_path / "w.json"
    whole.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"question": "q", "golden_answers": ["a"]}]).encode())
    assert [r.question for r in read_qa_file(whole)] == ["q"]
    whole.write_bytes(b'[{"question": "Caf\xe9", "golden_answers": ["a"]}]')
    with pytest.raises(QAFormatError, match=r"w.json: not UTF-8 text"):
        read_qa_file(whole)
