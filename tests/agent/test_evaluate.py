"""Evaluation on a small fixture file: Pass@1, F1, answer rate, searches and turns, overall,
per source and per template; the printed table and the JSON + predictions files."""

from __future__ import annotations

import json

import pytest

from megatron_recycle.agent.types import Passage
from megatron_recycle.data.datasets import read_qa_file
from megatron_recycle.engines.base import Generation
from megatron_recycle.evaluate import evaluate, format_table

ROWS = [
    {"id": "n1", "question": "capital of France?", "golden_answers": ["Paris"], "data_source": "nq"},
    {"id": "n2", "question": "capital of Italy?", "golden_answers": ["Rome"], "data_source": "nq"},
    {"id": "h1", "question": "author of Hamlet?", "golden_answers": ["Shakespeare"], "data_source": "hotpotqa",
     "metadata": {"template": "work_creator"}},
    {"id": "h2", "question": "who was born first, A or B?", "golden_answers": ["A"], "data_source": "hotpotqa",
     "metadata": {"template": "born_first"}},
]
# What the fake policy writes per question: (turn texts); a search needs a second turn.
SCRIPT = {
    "France": ["<search> France </search>", "<answer> Paris </answer>"],  # right, 1 search
    "Italy": ["<answer> Milan </answer>"],  # wrong
    "Hamlet": ["<answer> William Shakespeare </answer>"],  # EM 0, F1 2/3
    "born first": ["I cannot tell."],  # no answer (eos)
}


class WordTokenizer:
    """A toy tokenizer, one id per character: enough for the rollout loop, and instant."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


class ScriptEngine:
    def __init__(self):
        self.tokenizer = WordTokenizer()
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for prompt, p in zip(prompts, params):
            text = self.tokenizer.decode(prompt)
            key = next(k for k in SCRIPT if k in text)
            turn = text.count("\n\n<information>")
            reply = SCRIPT[key][turn]
            stop = next((s for s in p.stop if reply.endswith(s)), None)
            ids = [ord(c) for c in reply] + ([] if stop else [0])
            out.append(Generation(ids, "stop" if stop else "eos", stop, None))
        return out

    def load_weights(self, named_tensors):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


class OneDocRetriever:
    def search(self, queries, topk):
        return [[Passage("1", f"{q}\nabout {q}", 1.0)] for q in queries]


@pytest.fixture()
def fixture_file(tmp_path):
    path = tmp_path / "mixed_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_evaluate_fixture_file(fixture_file, tmp_path, capsys):
    examples = read_qa_file(fixture_file)
    out = tmp_path / "res" / "result.json"
    result = evaluate(ScriptEngine(), OneDocRetriever(), examples, max_turns=2, max_total_tokens=4096, topk=1,
                      batch_size=3, output_path=out, run_info={"model": "fake"})
    nq, hp, overall = result["per_source"]["nq"], result["per_source"]["hotpotqa"], result["overall"]
    assert nq["n"] == 2 and nq["pass@1"] == 0.5 and nq["f1"] == 0.5 and nq["answer_rate"] == 1.0
    assert nq["searches"] == 0.5 and nq["turns"] == 1.5
    assert hp["pass@1"] == 0.0 and hp["f1"] == pytest.approx(1 / 3) and hp["answer_rate"] == 0.5
    assert overall["n"] == 4 and overall["em"] == 0.25 and overall["f1"] == pytest.approx((1 + 2 / 3) / 4)
    assert overall["finish_no_answer"] == 0.25 and overall["finish_answer"] == 0.75
    assert result["macro_average"]["pass@1"] == 0.25
    assert result["per_template"]["work_creator"]["f1"] == pytest.approx(2 / 3)
    assert set(result["per_template"]) == {"None", "work_creator", "born_first"}
    assert result["config"]["model"] == "fake" and result["rollout_stats"]["searches"] == 1
    # progress lines: one per batch of 3 examples
    assert capsys.readouterr().err.count("[eval]") == 2

    saved = json.loads(out.read_text())
    assert saved["overall"]["em"] == 0.25
    preds = [json.loads(line) for line in out.with_name("result.predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["n1", "n2", "h1", "h2"]
    assert preds[0]["answer"] == "Paris" and preds[0]["queries"] == ["France"] and preds[0]["em"] == 1.0

    table = format_table(result)
    assert "nq" in table and "hotpotqa" in table and "average over sources" in table
    assert "work_creator" in table
    nq_line = next(line for line in table.splitlines() if line.startswith("nq "))
    assert nq_line.split()[1:4] == ["2", "0.500", "0.500"]


def test_mean_over_samples_at_temperature(fixture_file):
    examples = read_qa_file(fixture_file)
    result = evaluate(ScriptEngine(), OneDocRetriever(), examples, n_samples=3, temperature=1.0, progress=False)
    assert result["overall"]["pass@1"] == 0.25 and result["rollout_stats"]["trajectories"] == 12


def test_bad_arguments(fixture_file):
    examples = read_qa_file(fixture_file)
    with pytest.raises(ValueError, match="temperature 0"):
        evaluate(ScriptEngine(), OneDocRetriever(), examples, n_samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="no examples"):
        evaluate(ScriptEngine(), OneDocRetriever(), [])
    with pytest.raises(ValueError, match="shard"):
        evaluate(ScriptEngine(), OneDocRetriever(), examples, shard=(2, 2), gather=lambda part: [part])
    with pytest.raises(ValueError, match="needs gather"):
        evaluate(ScriptEngine(), OneDocRetriever(), examples, shard=(0, 2))
    with pytest.raises(ValueError, match="must pass gather"):
        evaluate(None, None, examples, shard=None)
    with pytest.raises(ValueError, match="needs an engine"):
        evaluate(None, OneDocRetriever(), examples)


def _sharded(examples, count, holders, tmp_path, **kw):
    """Run evaluate as ``holders`` processes would (each a shard index or None), in one process:
    every part is collected, then the first holder aggregates them."""
    parts, engines = [], []

    def keep(part):
        parts.append(part)
        return None

    for shard in holders[1:]:
        engine = ScriptEngine()
        engines.append(engine)
        none = evaluate(engine, OneDocRetriever(), examples, shard=None if shard is None else (shard, count),
                        gather=keep, progress=False, **kw)
        assert none is None
    engine = ScriptEngine()
    engines.append(engine)
    first = holders[0]
    result = evaluate(engine, OneDocRetriever(), examples, shard=None if first is None else (first, count),
                      gather=lambda part: [part, *parts], output_path=tmp_path / "sharded.json", **kw)
    return result, engines


def test_sharded_evaluation_equals_one_process(fixture_file, tmp_path, capsys):
    """Batches b, b + n, ... per shard: the merged result (and predictions file, in example
    order) equals the single-process one; a shard held twice counts once; no engine on the
    aggregating process is fine; a missing shard is an error."""
    examples = read_qa_file(fixture_file)
    kw = dict(max_turns=2, max_total_tokens=4096, topk=1, batch_size=1)
    single = evaluate(ScriptEngine(), OneDocRetriever(), examples, output_path=tmp_path / "single.json",
                      progress=False, **kw)
    capsys.readouterr()
    for count, holders in ((2, [0, 1]), (3, [1, 0, 2, 2]), (4, [None, 3, 2, 1, 0])):
        result, engines = _sharded(examples, count, holders, tmp_path, **kw)
        for key in ("overall", "per_source", "per_template", "macro_average"):
            assert result[key] == single[key], (count, key)
        counters = {k: v for k, v in single["rollout_stats"].items() if not k.endswith("seconds")}
        assert {k: result["rollout_stats"][k] for k in counters} == counters
        assert result["config"]["shards"] == count
        # each engine generated only its shard's batches (one question per batch here)
        assert sum(e.calls > 0 for e in engines) == len([h for h in holders if h is not None])
        assert (tmp_path / "sharded.predictions.jsonl").read_text() == (
            tmp_path / "single.predictions.jsonl").read_text()
    err = capsys.readouterr().err
    assert "(shard 1 of 2: 2 of 4)" in err and "(shard 2 of 3: 1 of 4)" in err  # the shard and its share
    with pytest.raises(RuntimeError, match=r"shard\(s\) \[1\]"):
        _sharded(examples, 2, [0, None], tmp_path, **kw)


def test_module_entry_point_refuses_torchrun(monkeypatch, fixture_file):
    """`python -m megatron_recycle.evaluate` is single-process: under torchrun every rank would
    evaluate everything and write the same file, so it refuses and names the sharded command."""
    from megatron_recycle import evaluate as ev

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="megatron-recycle eval"):
        ev.main(["--data", str(fixture_file)])


def test_merge_refuses_inconsistent_parts():
    """Parts that disagree on the shard count, or cover an example twice, are errors, not a result."""
    from megatron_recycle.evaluate import _merge_parts

    rec = {"em": 1.0}
    with pytest.raises(RuntimeError, match="disagree on the shard count"):
        _merge_parts([((0, 2), [(0, rec)], {}), ((1, 3), [(1, rec)], {})], 2)
    with pytest.raises(RuntimeError, match="exactly once"):
        _merge_parts([((0, 2), [(0, rec)], {}), ((1, 2), [(0, rec)], {})], 2)
    records, totals = _merge_parts([None, ((1, 2), [(1, rec)], {"n": 1}), ((0, 2), [(0, rec)], {"n": 2}),
                                    ((0, 2), [(0, rec)], {"n": 2})], 2)  # shard 0 held twice: counted once
    assert sorted(i for i, _ in records) == [0, 1] and totals == {"n": 3}


@pytest.mark.parametrize("bad, message", [
    (["--limit", "-1"], "--limit: must be >= 1, got -1"),  # evaluated all but the last question
    (["--limit", "0"], "--limit: must be >= 1, got 0"),
    (["--n-samples", "0"], "--n-samples: must be >= 1"),
    (["--topk", "0"], "--topk: must be >= 1"),
    (["--max-turns", "-2"], "--max-turns: must be >= 0"),
    (["--temperature", "-0.5"], "--temperature: must be a finite number >= 0"),
    (["--batch-size", "x"], "--batch-size: expected an integer"),
])
def test_module_entry_point_refuses_bad_numbers_before_loading_anything(fixture_file, capsys, bad, message):
    from megatron_recycle import evaluate as ev

    with pytest.raises(SystemExit):
        ev.main(["--data", str(fixture_file), *bad])
    assert message in capsys.readouterr().err


def test_an_unwritable_result_is_found_before_the_rollouts_and_its_numbers_kept(fixture_file, tmp_path, monkeypatch):
    """A read-only or full disk: the whole evaluation ran, then the result (and its numbers) were
    lost with the write. check_writable says so before anything is loaded; a write that fails
    afterwards puts the numbers in its error."""
    from megatron_recycle import evaluate as ev

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ev.EvalOutputError, match=r"cannot write the evaluation result .*a_file/out.json: FileExistsError"):
        ev.check_writable(blocker / "out.json")
    ev.check_writable(tmp_path / "new" / "out.json")
    assert [p.name for p in (tmp_path / "new").iterdir()] == []  # the probe leaves nothing

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ev, "write_result", full_disk)
    with pytest.raises(ev.EvalOutputError, match=r"No space left on device\); its numbers: Pass@1 [0-9.]+, EM "):
        evaluate(ScriptEngine(), OneDocRetriever(), read_qa_file(fixture_file), batch_size=3,
                 output_path=tmp_path / "r.json")


def test_a_folder_as_the_result_is_refused_first_and_a_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    from megatron_recycle import evaluate as ev

    folder = tmp_path / "eval"
    folder.mkdir()
    with pytest.raises(ev.EvalOutputError, match="it is a folder"):
        ev.check_writable(folder)
    target = tmp_path / "r.json"
    monkeypatch.setattr(ev.Path, "replace", lambda self, other: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError, match="full"):
        ev._atomic_write(target, "{}")
    assert list(tmp_path.iterdir()) == [folder]  # no .r.json.tmp-PID left


def test_the_module_cli_refuses_a_bad_seed_and_writes_nothing_for_an_empty_output(fixture_file, monkeypatch, capsys):
    from megatron_recycle import evaluate as ev

    loaded = []
    monkeypatch.setattr("megatron_recycle.model.hf_loading.load_hf_model", lambda m: loaded.append(m))
    for seed in ("-1", str(2**63)):
        with pytest.raises(SystemExit):
            ev.main(["--data", str(fixture_file), "--seed", seed])
        assert "--seed" in capsys.readouterr().err
    assert loaded == []  # refused before any model was loaded
    monkeypatch.setattr("megatron_recycle.model.hf_loading.load_tokenizer", lambda m: None)
    monkeypatch.setattr("megatron_recycle.engines.hf.HFEngine", lambda *a, **k: ScriptEngine())
    monkeypatch.setattr("megatron_recycle.agent.retrievers.build_retriever", lambda *a, **k: OneDocRetriever())
    result = ev.main(["--data", str(fixture_file), "--output", "", "--batch-size", "3"])
    assert result["overall"]["n"] > 0 and "nothing written" in capsys.readouterr().out
