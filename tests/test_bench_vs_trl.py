"""Smoke tests of tools/bench_vs_trl.py: the shared reward, our side's step on a tiny random model,
the summary/table/files, and the TRL worker's configuration (skipped when trl is absent)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "tools" / "bench_vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_vs_trl"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_tool()


def test_group_rewards_every_group_signal_bearing_and_deterministic():
    comps = [[i % 3] for i in range(40)]  # many identical completions: hashes collide on purpose
    r = bench.group_rewards(comps, 4, seed=1, step=0)
    assert len(r) == 40 and set(r) <= {0.0, 1.0}
    for g in range(10):
        grp = r[4 * g : 4 * g + 4]
        assert 0.0 < sum(grp) < 4.0, f"group {g} is constant: {grp}"
    assert r == bench.group_rewards(comps, 4, seed=1, step=0)
    many = [[i, i + 1] for i in range(400)]
    assert bench.group_rewards(many, 4, 1, 0) != bench.group_rewards(many, 4, 2, 0)


def test_group_rewards_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        bench.group_rewards([[1]] * 6, 4, 0, 0)
    with pytest.raises(ValueError, match="group_size >= 2"):
        bench.group_rewards([[1]] * 2, 1, 0, 0)


def test_prompt_messages_bounds():
    msgs = bench.prompt_messages(4)
    assert len(msgs) == 4 and all(m[0]["role"] == "user" for m in msgs)
    with pytest.raises(ValueError, match="--prompts"):
        bench.prompt_messages(0)


@pytest.fixture(scope="module", params=[("native", True), ("hf", False)], ids=["native-packed", "hf-padded"])
def tiny_side(request):
    from megatron_recycle.model.parallel import destroy_distributed

    engine, pack = request.param
    side = bench.OurSide("unused", prompts=2, group=2, max_new=6, lr=1e-3, mbs=4, seed=0, random_tiny=True,
                         engine=engine, pack=pack)
    yield side
    destroy_distributed()


def test_our_step_on_tiny_model_trains_and_syncs_the_engine(tiny_side):
    before = {k: v.clone() for k, v in tiny_side.engine.model.state_dict().items() if torch.is_tensor(v)}
    rec = tiny_side.step()
    assert rec["sequences"] == 4.0
    assert 4 <= rec["completion_tokens"] <= 4 * 6
    assert math.isfinite(rec["loss"])
    for k in ("generation", "advantages", "forward_backward", "optimizer", "weight_sync"):
        assert rec[f"time/{k}"] >= 0.0
    assert rec["step_s"] >= rec["time/generation"] + rec["time/forward_backward"]
    after = tiny_side.engine.model.state_dict()
    # lr 1e-3 with non-zero advantages moves the weights; the sync puts them into the engine.
    changed = max((after[k].double() - before[k].double()).abs().max().item() for k in before)
    assert changed > 1e-6
    rec2 = tiny_side.step()
    assert tiny_side.step_index == 2 and math.isfinite(rec2["loss"])
    padded = 4 * max(len(p) for p in tiny_side.prompt_ids) + 4 * 6  # an upper bound of 4 padded rows
    if tiny_side.pack:  # each group's prompt is computed once, not twice
        assert rec2["trained_positions"] < padded - min(len(p) for p in tiny_side.prompt_ids) + 2


def _fake_rows(scale: float) -> list[dict]:
    return [{"step_s": scale * s, "time/generation": scale * s / 2, "completion_tokens": 800.0,
             "sequences": 16.0, "peak_rss_gib": 5.0 + s / 10} for s in (3.0, 1.0, 2.0)]


def test_summary_table_and_files(tmp_path, capsys):
    res = {"allocator": "default", "glibc_tunables": "",
           "trl": bench.summarize(_fake_rows(2.0)), "ours": bench.summarize(_fake_rows(1.0))}
    assert res["ours"]["step_s"]["median"] == 2.0 and res["ours"]["step_s"]["min"] == 1.0
    assert res["trl"]["phases_median_s"]["generation"] == 2.0
    res["ratio_ours_over_trl"] = 0.5
    res["target_met"] = True
    bench.print_table(res)
    out = capsys.readouterr().out
    assert "ratio ours / TRL" in out and "0.50" in out
    # the TRL version (meta) is not overwritten by TRL's summary (res["trl"]); a dot in the stem stays
    path = bench.write_files(res, {"date": "x", "trl_version": "1.16.0"}, tmp_path, "vs_trl_s9.1")
    data = json.loads((tmp_path / "vs_trl_s9.1_default.json").read_text())
    assert data["date"] == "x" and data["ours"]["peak_rss_gib"] == pytest.approx(5.3)
    assert data["trl_version"] == "1.16.0" and data["trl"]["step_s"]["median"] == 4.0
    rows = list(csv.DictReader(open(tmp_path / "vs_trl_s9.1_default.csv")))
    assert {"trl", "ours", "both"} == {r["side"] for r in rows}
    assert path.name == "vs_trl_s9.1_default"


def test_trl_config_builds_when_trl_installed(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from trl import GRPOConfig

    # The numbers the TRL worker relies on: one optimizer step = 4 prompts x 4 completions.
    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, gradient_accumulation_steps=1,
                     num_generations=4, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[])
    assert cfg.generation_batch_size == 16 and cfg.steps_per_generation == 1


def test_without_trl_only_our_side_runs(monkeypatch, capsys):
    started = []

    class FakeWorker:
        def __init__(self, side, a, allocator):
            started.append((side, allocator))
            self.rows = iter(_fake_rows(1.0))

        def step(self):
            return next(self.rows)

        def close(self):
            pass

    monkeypatch.setattr(bench, "trl_available", lambda: False)
    monkeypatch.setattr(bench, "Worker", FakeWorker)
    a = bench.parse_args(["--steps", "3", "--allocator", "keep"])
    res = bench.run_allocator(a, "keep")
    assert started == [("ours", "keep")]
    assert "trl" not in res and "ratio_ours_over_trl" not in res
    assert res["glibc_tunables"] == bench.KEEP_MEMORY
    assert res["ours"]["step_s"]["all"] == [1.0, 2.0]  # the first step is left out
    assert "trl is not installed" in capsys.readouterr().out
    bench.print_table(res)  # a table without the TRL column does not fail
