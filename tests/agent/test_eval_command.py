"""`megatron-recycle eval` over several benchmark files: one engine and retriever for all of them,
a result per file, the side-by-side summary with the average over benchmarks, and --resume.

The engine is the scripted one of test_evaluate.py (instant, known answers), put in place of the
runtime's builders, so the numbers below are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_recycle import cli
from megatron_recycle.evaluate import format_summary, summarize_benchmarks
from megatron_recycle.train import runtime as rtm
from tests.agent.test_evaluate import OneDocRetriever, ScriptEngine

# benchmark -> rows; the script answers France right, Italy wrong, Hamlet with F1 2/3, "born first" not at all
FILES = {
    "nq/test.jsonl": [("capital of France?", ["Paris"]), ("capital of Italy?", ["Rome"])],
    "hotpotqa_dev.jsonl": [("capital of France?", ["Paris"]), ("author of Hamlet?", ["Shakespeare"]),
                           ("who was born first, A or B?", ["A"]), ("capital of Italy?", ["Rome"])],
    "bamboogle/test.jsonl": [("capital of France?", ["Paris"])],
}
# Pass@1 per benchmark from the script: nq 1/2, hotpotqa 1/4, bamboogle 1/1
EXPECTED = {"nq": 0.5, "hotpotqa": 0.25, "bamboogle": 1.0}


@pytest.fixture()
def bench_dir(tmp_path):
    d = tmp_path / "benchmarks"
    for rel, rows in FILES.items():
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"{path.stem}{i}", "question": q, "golden_answers": a}) + "\n"
                                for i, (q, a) in enumerate(rows)))
    return d


@pytest.fixture()
def builds(monkeypatch):
    """Count what the runtime builds; the scripted engine and a one-passage retriever stand in."""
    count = {"engine": 0, "retriever": 0}

    def engine(cfg, model_path, tokenizer, *a, **k):
        count["engine"] += 1
        return ScriptEngine()

    def retriever(cfg):
        count["retriever"] += 1
        return OneDocRetriever()

    monkeypatch.setattr(rtm, "build_engine", engine)
    monkeypatch.setattr(rtm, "build_retriever_from_config", retriever)
    monkeypatch.setattr("megatron_recycle.model.hf_loading.load_tokenizer", lambda *a, **k: None)
    return count


def _eval(bench_dir, tmp_path, *extra, model="fake-model", resume=False):
    args = ["eval", "--checkpoint", model, "--out", str(tmp_path / "out")] + (["--resume"] if resume else [])
    args += [f"eval.data_dir={bench_dir}", f"run.output_dir={tmp_path / 'runs'}", "rollout.max_turns=2",
             "rollout.max_total_tokens=4096", "retriever.topk=1", "eval.batch_size=2"]
    return cli.main(args + list(extra))


def test_eval_command_over_benchmarks(bench_dir, tmp_path, builds, capsys):
    assert _eval(bench_dir, tmp_path) == 0
    out = capsys.readouterr().out
    assert builds == {"engine": 1, "retriever": 1}  # loaded once for the three files
    assert "not found in" in out and "triviaqa" in out and "musique" in out  # the missing four are named
    per_file = {name: json.loads((tmp_path / "out" / f).read_text())
                for name, f in (("nq", "nq_test.json"), ("hotpotqa", "hotpotqa_dev.json"),
                                ("bamboogle", "bamboogle_test.json"))}
    assert {k: v["overall"]["pass@1"] for k, v in per_file.items()} == EXPECTED
    assert all(v["config"]["model"] == "fake-model" for v in per_file.values())

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["benchmarks"]) == ["nq", "hotpotqa", "bamboogle"]  # the benchmarks' own order
    assert summary["average"]["pass@1"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)  # unweighted over files
    assert summary["all_questions"] == {"n": 7, "pass@1": pytest.approx(3 / 7),
                                        "f1": pytest.approx((3 + 2 / 3) / 7)}
    assert summary["model"] == "fake-model"
    avg_line = next(line for line in out.splitlines() if line.startswith("average (benchmarks)"))
    assert avg_line.split()[-2] == f"{(0.5 + 0.25 + 1.0) / 3:.3f}"


def test_eval_command_resume(bench_dir, tmp_path, builds, capsys):
    assert _eval(bench_dir, tmp_path) == 0
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    capsys.readouterr()
    builds.update(engine=0, retriever=0)
    # everything is there for this model: nothing is loaded or run, the summary is rebuilt the same
    assert _eval(bench_dir, tmp_path, resume=True) == 0
    out = capsys.readouterr().out
    assert builds == {"engine": 0, "retriever": 0} and out.count(": reusing") == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == first

    # fewer questions asked for now: the files with more than one are evaluated again, bamboogle is kept
    assert _eval(bench_dir, tmp_path, "eval.max_examples=1", resume=True) == 0
    out = capsys.readouterr().out
    assert builds == {"engine": 1, "retriever": 1} and out.count(": reusing") == 1
    assert "questions=2 (now 1)" in out and "questions=4 (now 1)" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: r["n"] for k, r in summary["benchmarks"].items()} == {"nq": 1, "hotpotqa": 1, "bamboogle": 1}

    # other evaluation settings (turns, retriever): evaluated again, and the message says what changed
    assert _eval(bench_dir, tmp_path, "eval.max_examples=1", "rollout.max_turns=1", resume=True) == 0
    out = capsys.readouterr().out
    assert ": reusing" not in out and out.count("max_turns=2 (now 1)") == 3
    assert _eval(bench_dir, tmp_path, "eval.max_examples=1", "rollout.max_turns=1", "retriever.kind=dense",
                 resume=True) == 0
    assert capsys.readouterr().out.count("retriever='bm25 wiki-offline' (now 'dense wiki-offline minilm')") == 3
    assert _eval(bench_dir, tmp_path, "eval.max_examples=1", "rollout.max_turns=1", "retriever.kind=dense",
                 resume=True) == 0
    assert capsys.readouterr().out.count(": reusing") == 3

    # another model into the same folder: nothing is reused
    builds.update(engine=0, retriever=0)
    assert _eval(bench_dir, tmp_path, "eval.max_examples=1", "rollout.max_turns=1", "retriever.kind=dense",
                 model="other-model", resume=True) == 0
    out = capsys.readouterr().out
    assert builds == {"engine": 1, "retriever": 1} and ": reusing" not in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["model"] == "other-model"


def test_eval_command_refuses_a_missing_file_before_any_work(tmp_path, builds, capsys):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"question": "capital of France?", "golden_answers": ["Paris"]}) + "\n")
    rc = cli.main(["eval", "--data", str(good), "--data", str(tmp_path / "nowhere.jsonl"),
                   "--out", str(tmp_path / "out"), f"run.output_dir={tmp_path / 'runs'}"])
    assert rc == 2 and "nowhere.jsonl does not exist" in capsys.readouterr().err  # a user error: one line
    assert builds == {"engine": 0, "retriever": 0} and not (tmp_path / "out").exists()


def test_eval_command_names_same_stem_files_by_folder(tmp_path, builds, capsys):
    for folder, q in (("x", "capital of France?"), ("y", "capital of Italy?")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.jsonl").write_text(json.dumps({"question": q, "golden_answers": ["Paris"]}) + "\n")
    assert cli.main(["eval", "--data", str(tmp_path / "x" / "test.jsonl"), "--data", str(tmp_path / "y" / "test.jsonl"),
                     "--checkpoint", "fake-model", "--out", str(tmp_path / "out"), f"run.output_dir={tmp_path / 'runs'}",
                     "rollout.max_turns=2", "rollout.max_total_tokens=4096", "retriever.topk=1"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: r["pass@1"] for k, r in summary["benchmarks"].items()} == {"x_test": 1.0, "y_test": 0.0}
    assert builds == {"engine": 1, "retriever": 1}


def test_summary_averages():
    def res(n, p, f):
        return {"overall": {"n": n, "pass@1": p, "f1": f, "answer_rate": 1.0, "searches": 0.0, "turns": 1.0}}

    s = summarize_benchmarks({"a": res(10, 0.1, 0.2), "b": res(30, 0.5, 0.6)}, "m")
    assert s["average"] == {"pass@1": pytest.approx(0.3), "f1": pytest.approx(0.4)}
    assert s["all_questions"] == {"n": 40, "pass@1": pytest.approx(0.4), "f1": pytest.approx(0.5)}
    table = format_summary(s).splitlines()
    assert table[-2].split()[-2:] == ["0.300", "0.400"] and table[-1].split()[-3:] == ["40", "0.400", "0.500"]
    with pytest.raises(ValueError, match="no results"):
        summarize_benchmarks({}, "m")
    # one file holding two benchmarks (Search-R1's combined test.parquet): a row per source, so
    # that the average is over benchmarks, not questions
    both = {**res(30, 0.6, 0.7), "per_source": {"nq": res(27, 0.63, 0.7)["overall"],
                                                "bamboogle": res(3, 1.0, 1.0)["overall"]}}
    s = summarize_benchmarks({"test": both, "c": {**res(10, 0.1, 0.2), "per_source": {"c": res(10, 0.1, 0.2)["overall"]}}}, "m")
    assert list(s["benchmarks"]) == ["test:nq", "test:bamboogle", "c"]
    assert s["average"]["pass@1"] == pytest.approx((0.63 + 1.0 + 0.1) / 3)
    assert s["all_questions"]["n"] == 40


def test_run_pipeline_reuses_evaluations_only_when_resuming(tmp_path, monkeypatch):
    """A new `run` in an old run folder trains again: an evaluation file left there may hold another
    model's numbers (an earlier SFT result at the same path), so only --resume reuses it."""
    from megatron_recycle.config import load_config
    from megatron_recycle.train import pipeline

    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"question": "capital of France?", "golden_answers": ["Paris"]}) + "\n")
    cfg = load_config(None, [f"data.test_file={data}", f"run.output_dir={tmp_path / 'runs'}"])
    calls = []
    monkeypatch.setattr(pipeline, "evaluate_model", lambda *a, **k: calls.append(a[1]) or {"fresh": True})
    path = tmp_path / "eval.json"
    record = {"model": "m", "data": str(data), **rtm.eval_settings(cfg), "retriever": rtm.retriever_id(cfg),
              "model_digest": None, **rtm.eval_identity(cfg, data)}
    path.write_text(json.dumps({"config": record, "overall": {"n": 1, "pass@1": 0.5}}))
    assert pipeline._eval(cfg, "m", "test", path, "x", resume=False) == {"fresh": True} and calls == ["m"]
    assert pipeline._eval(cfg, "m", "test", path, "x", resume=True)["overall"]["pass@1"] == 0.5 and calls == ["m"]
    # a file written before the retriever and the weights' digest were recorded: evaluated again
    del record["retriever"], record["model_digest"]
    path.write_text(json.dumps({"config": record, "overall": {"n": 1, "pass@1": 0.5}}))
    assert pipeline._eval(cfg, "m", "test", path, "x", resume=True) == {"fresh": True} and calls == ["m", "m"]
    # a half-written or foreign file: evaluated again, with the reason
    for text in ('{"config": {"model": "m"', '[1, 2]'):
        path.write_text(text)
        assert pipeline._eval(cfg, "m", "test", path, "x", resume=True) == {"fresh": True}
    assert calls == ["m"] * 4
    # another question under the same path and count, another engine or precision: evaluated again
    record = {"model": "m", "data": str(data), **rtm.eval_settings(cfg), "retriever": rtm.retriever_id(cfg),
              "model_digest": None, **rtm.eval_identity(cfg, data)}
    path.write_text(json.dumps({"config": record, "overall": {"n": 1, "pass@1": 0.5}}))
    assert pipeline._eval(cfg, "m", "test", path, "x", resume=True)["overall"]["pass@1"] == 0.5
    for key, other in (("engine", "vllm"), ("engine_dtype", "bfloat16")):
        path.write_text(json.dumps({"config": record | {key: other}, "overall": {"n": 1, "pass@1": 0.5}}))
        assert pipeline._eval(cfg, "m", "test", path, "x", resume=True) == {"fresh": True}, key
    path.write_text(json.dumps({"config": record, "overall": {"n": 1, "pass@1": 0.5}}))
    data.write_text(json.dumps({"question": "capital of Italy?", "golden_answers": ["Rome"]}) + "\n")
    assert pipeline._eval(cfg, "m", "test", path, "x", resume=True) == {"fresh": True}
    assert calls == ["m"] * 7


def test_a_benchmark_folder_without_benchmarks_is_refused_up_front(tmp_path, builds, capsys):
    """eval.data_dir naming a folder with none of the seven: `eval` and `run` say so before any
    work (`run` before data generation and training, not after them)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    runs = tmp_path / "runs"
    for command in ("eval", "run"):
        assert cli.main([command, f"eval.data_dir={empty}", f"run.output_dir={runs}",
                         f"data.dir={tmp_path / 'data'}"]) == 2
        err = capsys.readouterr().err
        assert "none of the benchmarks (nq, triviaqa" in err and "<dir>/<name>/<test|dev>" in err, command
    assert builds == {"engine": 0, "retriever": 0} and not (tmp_path / "data").exists() and not runs.exists()


def test_a_fresh_run_moves_an_earlier_run_aside_before_its_first_phase(tmp_path, monkeypatch):
    """Before: a new `run` in a used folder, stopped in its first evaluation (or in SFT), left the
    earlier run's SFT result and GRPO checkpoints in place, and `run --resume` took them up as its
    own (the new run then reported the earlier run's final model). Now they are moved aside first;
    a resumed run keeps its own files."""
    from megatron_recycle.config import load_config
    from megatron_recycle.train import pipeline

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
    run_dir = cfg.run_dir
    for rel in ("sft/hf/config.json", "checkpoints/step_3/manifest.json", "eval/before_test.json",
                "final_hf/config.json", "metrics.jsonl", "report.md", "notes.txt"):
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text("earlier")
    monkeypatch.setattr(pipeline.rtm, "ensure_data", lambda cfg: {"train": "t", "dev": "d", "test": "x", "sft": Path(__file__)})
    monkeypatch.setattr(pipeline.rtm, "read_examples", lambda *a: [object()] * 100)
    monkeypatch.setattr(pipeline.rtm, "check_trainer_config", lambda *a: None)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_model", interrupted)
    monkeypatch.setattr(pipeline, "_cached_eval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, resume=True)
    assert (run_dir / "sft" / "hf" / "config.json").is_file() and not (run_dir / "previous").exists()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, resume=False)
    (earlier,) = (run_dir / "previous").iterdir()
    assert sorted(p.name for p in earlier.iterdir()) == ["checkpoints", "eval", "final_hf", "metrics.jsonl",
                                                         "report.md", "sft"]
    assert (earlier / "sft" / "hf" / "config.json").read_text() == "earlier"  # nothing lost
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt", "previous"]  # not the run's: left


def _config_only_model(folder):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048).save_pretrained(folder)
    return folder


def _pipeline_until_first_eval(tmp_path, monkeypatch, overrides):
    from megatron_recycle.config import load_config
    from megatron_recycle.train import pipeline

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=r", *overrides])
    monkeypatch.setattr(pipeline.rtm, "ensure_data", lambda cfg: {"train": "t", "dev": "d", "test": "x", "sft": Path(__file__)})
    monkeypatch.setattr(pipeline.rtm, "read_examples", lambda *a: [object()] * 100)

    def first_eval(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_model", first_eval)
    monkeypatch.setattr(pipeline, "_cached_eval", first_eval)
    return cfg, pipeline


def test_a_fresh_run_keeps_the_sft_result_it_starts_from(tmp_path, monkeypatch):
    """The GPU recipes start `run` from RUN_DIR/sft/hf of an earlier `megatron-recycle sft`: the
    fresh run moved that folder aside, then could not find its model."""
    run_dir = tmp_path / "runs" / "r"
    _config_only_model(run_dir / "sft" / "hf")
    (run_dir / "checkpoints" / "step_3").mkdir(parents=True)
    cfg, pipeline = _pipeline_until_first_eval(tmp_path, monkeypatch, [
        f"model.name_or_path={run_dir / 'sft' / 'hf'}", "sft.enabled=false"])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(cfg, resume=False)
    assert (run_dir / "sft" / "hf" / "config.json").is_file()
    (earlier,) = (run_dir / "previous").iterdir()
    assert sorted(p.name for p in earlier.iterdir()) == ["checkpoints"]


def test_run_checks_the_layout_and_model_before_its_first_evaluation(tmp_path, monkeypatch):
    """A TP that does not divide the world was found after the evaluation before training."""
    from megatron_recycle.config import ConfigError

    _config_only_model(tmp_path / "m")
    for override, message in (("model.tp=2", "world size 1 is not divisible"),
                              ("rollout.max_total_tokens=100000", "max_position_embeddings")):
        cfg, pipeline = _pipeline_until_first_eval(tmp_path, monkeypatch, [
            f"model.name_or_path={tmp_path / 'm'}", override])
        with pytest.raises(ConfigError, match=message):
            pipeline.run_pipeline(cfg, resume=False)


def test_a_resumed_run_names_sft_settings_its_reused_sft_result_was_not_made_with(tmp_path):
    import yaml

    from megatron_recycle.config import load_config
    from megatron_recycle.train.pipeline import _sft_setting_changes

    saved = tmp_path / "sft" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(yaml.safe_dump(load_config(None, ["sft.steps=30"]).to_dict()))
    assert _sft_setting_changes(load_config(None, ["sft.steps=30"]), saved) == []
    (line,) = _sft_setting_changes(load_config(None, ["sft.steps=60", "sft.lr=7.5e-6"]), saved)
    assert "sft.steps 30 -> 60" in line and "sft.lr" in line and "reused as it is" in line


def test_a_stop_during_the_last_sft_step_ends_the_run_after_sft(tmp_path, monkeypatch):
    """Ctrl-C during SFT's last step: SFT finishes (its result is written) and `run` stops there,
    as it does after any other step, instead of going on through GRPO and the final evaluation."""
    from megatron_recycle.config import load_config
    from megatron_recycle.train import pipeline, sft

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=r", "sft.steps=2"])
    monkeypatch.setattr(pipeline.rtm, "ensure_data", lambda cfg: {"train": "t", "dev": "d", "test": "x", "sft": Path(__file__)})
    monkeypatch.setattr(pipeline.rtm, "read_examples", lambda *a: [object()] * 100)
    monkeypatch.setattr(pipeline.rtm, "check_trainer_config", lambda *a: None)
    monkeypatch.setattr(pipeline, "evaluate_model", lambda *a, **k: {"overall": {"pass@1": 0.0, "n": 1}})
    monkeypatch.setattr(sft, "run_sft", lambda cfg, resume=False: {
        "hf_dir": "x", "losses": [], "runtime": None, "stopped": False, "steps": 2, "stop_requested": True})

    def grpo(*a, **k):
        raise AssertionError("GRPO ran after a stop request")

    import megatron_recycle.train.grpo as grpo_module

    monkeypatch.setattr(grpo_module, "run_grpo", grpo)
    assert pipeline.run_pipeline(cfg, resume=False) == {"stopped": "SFT"}


def test_a_damaged_result_file_is_evaluated_again(tmp_path, monkeypatch, capsys):
    """A result file that is not UTF-8 (a damaged disk block) crashed `eval --resume`."""
    from megatron_recycle.config import load_config
    from megatron_recycle.train import pipeline

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}"])
    path = tmp_path / "data_test.json"
    path.write_bytes(b"\xff{")
    assert pipeline._usable_eval(cfg, "m", "test", path, "before") is None
    assert "not a valid result file; evaluating again" in capsys.readouterr().out


def test_run_without_sft_data_says_so_before_its_first_evaluation(tmp_path, monkeypatch):
    """A data folder without sft.jsonl failed at the SFT phase, after the evaluation before training."""
    cfg, pipeline = _pipeline_until_first_eval(tmp_path, monkeypatch, [])
    monkeypatch.setattr(pipeline.rtm, "ensure_data", lambda cfg: {
        "train": "t", "dev": "d", "test": "x", "sft": tmp_path / "data" / "sft.jsonl"})
    with pytest.raises(FileNotFoundError, match=r"sft.jsonl is missing: the SFT phase .* or set sft.enabled=false"):
        pipeline.run_pipeline(cfg, resume=False)
    cfg, pipeline = _pipeline_until_first_eval(tmp_path, monkeypatch, ["sft.enabled=false"])
    monkeypatch.setattr(pipeline.rtm, "check_trainer_config", lambda *a: None)
    monkeypatch.setattr(pipeline.rtm, "ensure_data", lambda cfg: {
        "train": "t", "dev": "d", "test": "x", "sft": tmp_path / "data" / "sft.jsonl"})
    with pytest.raises(KeyboardInterrupt):  # reached the first evaluation
        pipeline.run_pipeline(cfg, resume=False)
