"""The real GRPO loop end to end on a tiny random model: data, rollouts with BM25, the pool,
the kernels, the Megatron step, checkpoints; every strategy; torchrun with DP=2 and TP=2; and
SIGKILL + --resume reproducing an uninterrupted run.

Each run is a subprocess (`megatron-recycle train ...`): the CPU compatibility patches of
megatron-core are process-wide and stay out of the pytest process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.loop_fixtures import base_overrides, write_tiny_data, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "megatron_recycle.cli"]
REWARD = f"rollout.reward={ROOT / 'tests' / 'train' / 'loop_fixtures.py'}:coin"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("loop")
    return {
        "model": write_tiny_model(base / "model"),
        "data": write_tiny_data(base / "data"),
        "out": base / "runs",
        "cache": base / "cache",
    }


def _env_vars() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e.pop("TRITON_INTERPRET", None)
    return e


def _overrides(env, name: str, *extra: str) -> list[str]:
    over = base_overrides(env["model"], env["data"], env["out"], env["cache"], name)
    over = [o for o in over if not o.startswith("rollout.reward=")] + [REWARD]
    return over + list(extra)


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env_vars(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _same_value(a, b) -> bool:
    """Two logged values agree: equal (None, or "nan" for a share of an empty batch) or close."""
    return a == b or (not isinstance(a, str) and a is not None and a == pytest.approx(b, rel=1e-6, abs=1e-9))


def _decisions(run_dir: Path, rank: int = 0) -> list[dict]:
    path = run_dir / "ranks" / f"rank_{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


STRATEGIES = [
    ("recycle", ["pool.oversample=2"]),
    ("soft_recycle", ["pool.oversample=2"]),
    # also the reference-model (KL) path, on padded rows (length-grouped micro-batches)
    # (at a sampling temperature other than 1, which the reference log-probs must use too)
    ("grpo", ["pool.oversample=1", "loss.kl_beta=0.01", "optim.pack_groups=false", "rollout.temperature=1.5"]),
    ("bounded_dapo", ["pool.oversample=2"]),
    ("dapo", ["pool.oversample=1", "pool.max_gen_batches=2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_two_steps_every_strategy(env, strategy, extra):
    name = f"s_{strategy}"
    out = _run(CLI + ["train"] + _overrides(env, name, f"pool.strategy={strategy}", *extra)).stdout
    # the start line says how the step lays out the groups
    from megatron_recycle.model.attention import packed_route

    route = packed_route("cuda" if torch.cuda.is_available() else "cpu")
    layout = "padded groups)" if "optim.pack_groups=false" in extra else f"packed groups, attention {route})"
    assert f"steps 0->2, world 1 (tp 1 pp 1 dp 1, {layout}" in out, out[-3000:]
    run_dir = env["out"] / name
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    k = 2 if strategy in ("recycle", "soft_recycle", "bounded_dapo") else 1
    for r in rows:
        gen = r["gen_batches"]
        assert r["candidates"] == k * 2 * gen
        assert r["signal_groups"] + r["zero_variance"] == r["candidates"]
        assert r["effective_batch"] <= 2
        if r["effective_batch"]:
            assert math.isfinite(r["train/loss"])
            assert r["train/tokens"] > 0
            assert r["train/rss_gib"] > 0  # resident memory in the training phase
            assert "train/engine_kv_released_gib" not in r  # the native engine holds no KV cache to release
    assert any(r["effective_batch"] > 0 for r in rows), "the coin reward should make some group signal-bearing"
    # the custom coin reward is not exact match: reward and EM are logged separately
    assert all(r["reward_mean"] == r["rollout/reward_mean"] for r in rows)
    assert all(r["rollout/trajectories"] == r["candidates"] * 4 for r in rows)  # K = 4 (loop_fixtures)
    assert all(r["throughput/rollout_tok_per_s"] > 0 for r in rows)
    assert all("memory/max_rss_gib" in r for r in rows)
    assert all(r["rollout/prefix_reused_tokens"] == 0 for r in rows)  # native engine, single turn: nothing to reuse
    # the retriever's counters are logged each step (the tiny random model hardly ever searches;
    # tests/agent/test_rollout.py checks the counts against a scripted engine's searches)
    assert all(r["retriever/queries"] <= round(r["rollout/searches_mean"] * r["rollout/trajectories"]) for r in rows)
    trained = [r for r in rows if r["effective_batch"]]
    if "loss.kl_beta=0.01" in extra:  # reference log-probs were computed and the KL term reported
        assert all(r["time/logprob"] > 0 and "train/ref_kl" in r for r in trained)
        # the first update starts from the reference weights: no KL between them at the same temperature
        assert abs(trained[0]["train/ref_kl"]) < 1e-5, trained[0]["train/ref_kl"]
    if "optim.pack_groups=false" in extra:  # padded rows, each micro-batch cut after its last loss token
        # (how many tokens a cut saves depends on the sampled lengths; test_step pins the count)
        assert all(r["train/packed_saved_tokens"] == 0 for r in trained)
        assert all(r["train/length_cut_tokens"] >= 0 for r in trained)
    else:
        assert all(r["train/packed_saved_tokens"] > 0 for r in trained)
    assert (run_dir / "checkpoints" / "step_2" / "manifest.json").is_file()
    assert (run_dir / "pool_history.csv").is_file()
    # the per-rank decision log agrees with the pool metrics
    dec = _decisions(run_dir)
    assert [sum(len(g["chosen"]) for g in d["gen_batches"]) for d in dec] == [r["effective_batch"] for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["model.tp=1", "model.tp=2"], ids=["dp2", "tp2"])
def test_torchrun_two_ranks_same_decisions(env, layout):
    name = f"torchrun_{layout.split('=')[1]}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "megatron_recycle.cli", "train"]
    _run(torchrun + _overrides(env, name, "pool.oversample=2", "train.steps=3", layout, "train.eval_every=3",
                               "eval.batch_size=1"), timeout=400)
    run_dir = env["out"] / name
    d0, d1 = _decisions(run_dir, 0), _decisions(run_dir, 1)
    assert d0 == d1 and len(d0) == 3
    rows = [r for r in _metrics(run_dir) if "candidates" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sum(r["effective_batch"] for r in rows) > 0
    # the rollout metrics cover every replica's trajectories (DP 2: each rolled out half of them)
    for r in rows:
        assert r["rollout/trajectories"] == r["candidates"] * 4  # K = 4 (loop_fixtures)
        assert r["rollout/generated_tokens"] == pytest.approx(r["rollout/generated_tokens_mean"]
                                                              * r["rollout/trajectories"])
        assert r["throughput/rollout_tok_per_s"] > 0
    # the dev evaluation after the third update, sharded over the replicas' leaders (DP 2: two
    # shards; TP 2: one, rank 1 only gathers), covers the 4 dev questions once and is logged once,
    # in the record of the step it followed (one line per step)
    evals = [r for r in _metrics(run_dir) if "eval/dev_pass@1" in r]
    assert len(evals) == 1 and evals[0]["eval/dev_n"] == 4 and evals[0]["step"] == 2 and "candidates" in evals[0]
    assert len(_metrics(run_dir)) == 3


def _benchmarks(folder: Path) -> Path:
    """Two of the seven benchmarks in the FlashRAG layouts (a folder per benchmark, and flat), two
    questions each, from the fixture's facts."""
    from tests.train.loop_fixtures import FACTS

    (folder / "nq").mkdir(parents=True, exist_ok=True)
    for path, facts in ((folder / "nq" / "test.jsonl", FACTS[:2]), (folder / "hotpotqa_dev.jsonl", FACTS[2:4])):
        path.write_text("".join(json.dumps({"id": f"{path.stem}{i}", "question": q, "golden_answers": a}) + "\n"
                                for i, (q, a) in enumerate(facts)))
    return folder


@pytest.mark.slow
@pytest.mark.distributed
def test_run_pipeline_on_two_ranks(env):
    """`megatron-recycle run` under torchrun: every evaluation is sharded over both ranks (each
    rank reads the SFT and final folders right after rank 0 wrote them), phases are reported once."""
    name = "pipeline_dp2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "megatron_recycle.cli", "run"]
    bench = [f"eval.data_dir={_benchmarks(env['data'].parent / 'benchmarks')}"]
    proc = _run(torchrun + _overrides(env, name, "sft.steps=1", "sft.batch_size=2", "train.steps=1",
                                      "eval.batch_size=1", *bench), timeout=400)
    run_dir = env["out"] / name
    for f in ("before_test.json", "after_sft_test.json", "after_test.json", "benchmarks/nq_test.json",
              "benchmarks/hotpotqa_dev.json"):
        res = json.loads((run_dir / "eval" / f).read_text())
        assert res["config"]["shards"] == 2, f
        assert res["overall"]["n"] == (4 if f.endswith("_test.json") and "/" not in f else 2), f
    report = json.loads((run_dir / "report.json").read_text())
    assert all(0.0 <= v <= 1.0 for v in report["test_pass@1"].values())
    # the final model on the benchmarks of eval.data_dir: the average in the report and summary.json
    summary = json.loads((run_dir / "eval" / "benchmarks" / "summary.json").read_text())
    assert list(summary["benchmarks"]) == ["nq", "hotpotqa"] and summary["model"] == str(run_dir / "final_hf")
    assert report["benchmarks_average_pass@1"] == summary["average"]["pass@1"]
    assert "| average |" in (run_dir / "report.md").read_text()
    assert proc.stdout.count("[run] data done") == 1 and proc.stdout.count("Report:") == 1
    # --resume: rank 0 finds the finished evaluations and every rank skips them (none waits for
    # the others in a gather); the SFT result is reused; the final model is exported again from the
    # last checkpoint, byte for byte the same weights, so its evaluations are reused too
    again = _run(torchrun + ["--resume"] + _overrides(env, name, "sft.steps=1", "sft.batch_size=2",
                                                      "train.steps=1", "eval.batch_size=1", *bench), timeout=400)
    for label in ("untrained", "after SFT", "after GRPO", "nq", "hotpotqa"):
        assert again.stdout.count(f"[eval] {label}: reusing") == 1, label
    assert again.stdout.count("reusing the SFT result") == 1 and again.stdout.count("Report:") == 1
    # one more GRPO step: final_hf holds other weights under the same path; evaluated again
    more = _run(torchrun + ["--resume"] + _overrides(env, name, "sft.steps=1", "sft.batch_size=2",
                                                     "train.steps=2", "eval.batch_size=1", *bench), timeout=400)
    assert "[eval] after SFT: reusing" in more.stdout and "[eval] after GRPO: reusing" not in more.stdout
    assert more.stdout.count("was evaluated otherwise: model_digest=") == 3  # after GRPO, nq, hotpotqa


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_sharded_over_two_ranks_equals_one_process(env, tmp_path):
    """`megatron-recycle eval` under torchrun deals the batches to the ranks (each with its own
    hf engine) and gathers them on rank 0: the same numbers and predictions as one process."""
    over = _overrides(env, "eval_shards", "eval.batch_size=1", "rollout.max_turns=2")
    args = ["eval", "--checkpoint", str(env["model"])]
    one = _run(CLI + args + ["--out", str(tmp_path / "one")] + over)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "megatron_recycle.cli"]
    two = _run(torchrun + args + ["--out", str(tmp_path / "two")] + over, timeout=300)
    a = json.loads((tmp_path / "one" / "data_test.json").read_text())
    b = json.loads((tmp_path / "two" / "data_test.json").read_text())
    assert b["config"]["shards"] == 2 and "shards" not in a["config"]
    for key in ("overall", "per_source", "per_template", "macro_average"):
        assert a[key] == b[key], key
    assert b["overall"]["n"] == 4 and b["rollout_stats"]["trajectories"] == 4
    assert (tmp_path / "one" / "data_test.predictions.jsonl").read_text() == (
        tmp_path / "two" / "data_test.predictions.jsonl").read_text()
    assert "2 shards of 1 rank(s)" in two.stdout and two.stdout.count("Pass@1") == one.stdout.count("Pass@1")


DP2_REF_STEPS = ("pool.oversample=2", "train.steps=3")


@pytest.fixture(scope="module")
def dp2_reference(env) -> Path:
    """One node, two processes (torchrun --standalone), 3 steps: what the two-node runs must equal."""
    name = "dp2_reference"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "megatron_recycle.cli", "train"]
    _run(torchrun + _overrides(env, name, *DP2_REF_STEPS), timeout=400)
    return env["out"] / name


_FIRST_ERROR = re.compile(r"terminate called|Traceback \(most recent call last\)|Signal \d+ \(SIG|exitcode: -?\d+")


def _launch_report(out: str, log: Path) -> str:
    """A failed launch's assertion message: the whole output goes to ``log`` (torchrun's restarts
    interleave several attempts, and the first error may sit far above the tail), the message
    shows the first error's context and the tail."""
    log.write_text(out)
    m = _FIRST_ERROR.search(out)
    head = "" if m is None or m.start() >= len(out) - 3000 else (
        f"first error, at character {m.start()}:\n{out[max(0, m.start() - 1500):m.start() + 2500]}\n...\n")
    return f"whole output: {log}\n{head}last 3000 characters:\n{out[-3000:]}"


def _assert_nodes_ok(nodes: list[tuple[int, str]], tmp_path: Path) -> None:
    """Every node exited 0; else both nodes' outputs are kept (a node whose rendezvous host went away
    fails too, so the first failing node is not always the one that failed first)."""
    if all(rc == 0 for rc, _ in nodes):
        return
    reports = [f"node {node}: exit {rc}\n{_launch_report(out, tmp_path / f'node_{node}.log')}"
               for node, (rc, out) in zip("AB", nodes)]
    raise AssertionError("\n\n".join(reports))


def _two_nodes(tmp_path: Path, over: list[str], stagger_s: float = 0.0, **extra_env: str) -> list[tuple[int, str]]:
    """recipes/launch_multi_node.sh as two nodes of one process each (c10d rendezvous on
    127.0.0.1), NODE_NAME A and B (B started ``stagger_s`` later: A then hosts the rendezvous);
    (return code, output) of each node."""
    from tests.train._dist import free_port

    recipe = tmp_path / "defaults.yaml"
    recipe.write_text("# every key at its default; the test's overrides follow on the command line\n")
    e = _env_vars()
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NNODES="2", NPROC="1",
             RDZV_ID=f"test-{os.getpid()}-{tmp_path.name}", PATH=f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}")
    e.update(extra_env)
    nodes = []
    for node in ("A", "B"):
        if nodes and stagger_s:
            time.sleep(stagger_s)
        nodes.append(subprocess.Popen(["bash", str(ROOT / "recipes" / "launch_multi_node.sh"), str(recipe)] + over,
                                      env={**e, "NODE_NAME": node}, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=400)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out) for p, out in zip(nodes, outs)]


def _crash_overrides(env, name: str) -> list[str]:
    over = [o for o in _overrides(env, name, *DP2_REF_STEPS) if not o.startswith("rollout.reward=")]
    return over + [f"rollout.reward={ROOT / 'tests' / 'train' / 'loop_fixtures.py'}:coin_crash_once"]


def _same_run(reference: Path, run_dir: Path, ranks: tuple[int, ...] = (0, 1)) -> None:
    assert all(_decisions(reference, 0) == _decisions(run_dir, r) for r in ranks)
    keys = ["candidates", "effective_batch", "reward_mean", "train/loss", "train/grad_norm", "recycled_share"]
    ref_rows, rows = _metrics(reference), _metrics(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows):
        for key in keys:
            assert _same_value(a.get(key), b.get(key)), (a["step"], key, a.get(key), b.get(key))


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_node_launcher_two_nodes_on_localhost(env, tmp_path, dp2_reference):
    """recipes/launch_multi_node.sh as two nodes of one process each (c10d rendezvous on 127.0.0.1):
    every process has LOCAL_RANK 0, so anything keyed on the local rank instead of the global one
    (rank-0-only logging, the pool's owner, checkpoint writers) shows up here. The run must make
    the same decisions and metrics as the one-node DP=2 run of the same config. The two nodes
    reduce their gradients overlapped with the backward pass (optim.overlap_grad_reduce, small
    buckets), the one-node run after it: the same sums either way."""
    name = "multi_node"
    over = _overrides(env, name, *DP2_REF_STEPS, "optim.overlap_grad_reduce=true", "optim.ddp_bucket_size=20000")
    nodes = _two_nodes(tmp_path, over)
    _assert_nodes_ok(nodes, tmp_path)
    outs = [out for _, out in nodes]
    run_dir = env["out"] / name
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]  # one writer: the global rank 0, not every LOCAL_RANK 0
    assert sum("step 0 |" in out for out in outs) == 1
    train_line = next(line for out in outs for line in out.splitlines() if line.startswith("[train] "))
    buckets = re.search(r"overlapped grad reduction \((\d+) buckets\)", train_line)
    assert buckets and int(buckets[1]) > 1, train_line
    assert len(_decisions(run_dir, 0)) == 3
    assert (run_dir / "checkpoints" / "step_3" / "manifest.json").is_file()
    # the same job on one node (torchrun --standalone, two processes) decides and trains identically
    _same_run(dp2_reference, run_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_node_launcher_restarts_after_a_crash_and_resumes(env, tmp_path, dp2_reference):
    """MAX_RESTARTS=1: global rank 1 dies (os._exit, no clean-up) during step 2's rollouts, after the
    checkpoint of step 2. torchrun restarts both nodes' processes (only the failing node counts a
    restart), every rank resumes from that checkpoint as with --resume, and the run ends with the
    uninterrupted one-node run's decisions and metrics."""
    name = "multi_node_restart"
    run_dir = env["out"] / name
    sentinel = tmp_path / "crashed"
    nodes = _two_nodes(tmp_path, _crash_overrides(env, name), MAX_RESTARTS="1", CRASH_RANK="1",
                       CRASH_SENTINEL=str(sentinel), CRASH_AFTER=str(run_dir / "checkpoints" / "step_2" / "manifest.json"))
    _assert_nodes_ok(nodes, tmp_path)
    outs = "\n".join(out for _, out in nodes)
    assert sentinel.read_text().startswith("crashed with TORCHELASTIC_RESTART_COUNT=0")
    assert "(exitcode: 17)" in outs, _launch_report(outs, tmp_path / "nodes.log")
    assert outs.count("[train] torchrun restarted the workers: resuming as with --resume") == 1
    assert f"[train] resumed from {run_dir / 'checkpoints'} step 2" in outs
    _same_run(dp2_reference, run_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_node_launcher_goes_on_without_a_lost_node(env, tmp_path, dp2_reference):
    """NNODES=1:2, MAX_RESTARTS=1: node B (its process and its torchrun agent, SIGKILL) is lost
    during step 2's rollouts. Node A's process fails on the broken collective, its agent restarts
    it alone, and the resume reshards the two-rank checkpoint of step 2 for one process. Steps 0-1
    are the two-node reference's; step 2 equals a one-process `train --resume` of the reference's
    checkpoint of step 2."""
    import shutil

    name = "multi_node_elastic"
    run_dir = env["out"] / name
    sentinel = tmp_path / "crashed"
    (rc_a, out_a), (rc_b, out_b) = _two_nodes(
        tmp_path, _crash_overrides(env, name), stagger_s=2.0, NNODES="1:2", MAX_RESTARTS="1", CRASH_NODE="B",
        CRASH_SENTINEL=str(sentinel), CRASH_AFTER=str(run_dir / "checkpoints" / "step_2" / "manifest.json"),
        RDZV_CONF="last_call_timeout=1,heartbeat_timeout=5,keep_alive_interval=1")
    assert rc_a == 0, _launch_report(out_a, tmp_path / "node_A.log")
    assert rc_b != 0 and sentinel.is_file()  # node B was lost
    assert "steps 0->3, world 2 (tp 1 pp 1 dp 2, " in out_a and "steps 2->3, world 1 (tp 1 pp 1 dp 1, " in out_a
    assert "[train] torchrun restarted the workers: resuming as with --resume" in out_a
    assert "resharding its weights and optimizer state" in out_a
    # the reference: the two-node run's checkpoint of step 2, resumed by one process
    ref = env["out"] / "multi_node_elastic_ref"
    shutil.copytree(dp2_reference, ref)
    shutil.rmtree(ref / "checkpoints" / "step_3")
    _run(CLI + ["train", "--resume"] + _overrides(env, ref.name, *DP2_REF_STEPS))
    _same_run(ref, run_dir, ranks=(0,))


@pytest.mark.slow
@pytest.mark.distributed
def test_single_node_launcher_restarts_after_a_crash_and_resumes(env, tmp_path, dp2_reference):
    """recipes/launch_single_node.sh with MAX_RESTARTS=1 and two processes: rank 1 dies during
    step 2's rollouts, both restart and resume from the checkpoint of step 2 (here the agent counts
    the restart for both) and the run equals the uninterrupted one."""
    name = "single_node_restart"
    run_dir = env["out"] / name
    sentinel = tmp_path / "crashed"
    recipe = tmp_path / "defaults.yaml"
    recipe.write_text("# every key at its default\n")
    over = [o for o in _overrides(env, name, *DP2_REF_STEPS) if not o.startswith("rollout.reward=")]
    over.append(f"rollout.reward={ROOT / 'tests' / 'train' / 'loop_fixtures.py'}:coin_crash_once")
    e = _env_vars()
    e.update(NPROC="2", MAX_RESTARTS="1", CRASH_RANK="1", CRASH_SENTINEL=str(sentinel),
             CRASH_AFTER=str(run_dir / "checkpoints" / "step_2" / "manifest.json"),
             PATH=f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}")
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "launch_single_node.sh"), str(recipe)] + over, env=e,
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, _launch_report(out, tmp_path / "launch.log")
    assert sentinel.read_text().startswith("crashed with TORCHELASTIC_RESTART_COUNT=0")
    assert "(exitcode: 17)" in out and out.count("[train] torchrun restarted the workers") == 1
    assert f"[train] resumed from {run_dir / 'checkpoints'} step 2" in out
    _same_run(dp2_reference, run_dir)


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(env):
    # with a dev evaluation after the second update: logged in step 1's record, before the
    # checkpoint of step 2 the resume starts from, so the resumed file keeps it
    steps = ["train.steps=4", "pool.oversample=2", "train.eval_every=2", "eval.batch_size=4"]
    _run(CLI + ["train"] + _overrides(env, "straight", *steps))
    straight = _metrics(env["out"] / "straight")

    # Kill the second run during step 2 (index 2), after the checkpoint of step 2 is complete.
    name = "killed"
    run_dir = env["out"] / name
    proc = subprocess.Popen(CLI + ["train"] + _overrides(env, name, *steps), env=_env_vars(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if (run_dir / "checkpoints" / "step_2" / "manifest.json").is_file():
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint of step 2 appeared")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "checkpoints" / "step_4").exists()
    _run(CLI + ["train", "--resume"] + _overrides(env, name, *steps))
    resumed = _metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    keys = ["candidates", "effective_batch", "reward_mean", "train/loss", "recycled_share", "zv_all_wrong",
            "eval/dev_pass@1"]
    for a, b in zip(straight, resumed):
        for key in keys:
            assert _same_value(a.get(key), b.get(key)), (a["step"], key, a.get(key), b.get(key))
    assert [("eval/dev_pass@1" in r) for r in resumed] == [False, True, False, True]
    assert _decisions(env["out"] / "straight") == _decisions(run_dir)
    # the pool history, rewritten at every checkpoint, ends the same
    assert (run_dir / "pool_history.csv").read_text() == (env["out"] / "straight" / "pool_history.csv").read_text()


def test_resume_refuses_a_mismatched_checkpoint(env):
    name = "mismatch"
    data = env["out"] / f"{name}_data"  # its own copy: its train file is rewritten below
    shutil.copytree(env["data"], data)
    _run(CLI + ["train"] + _overrides(env, name, "train.steps=1", "pool.oversample=2", f"data.dir={data}"))
    proc = subprocess.run(CLI + ["train", "--resume"] + _overrides(env, name, "train.steps=2", "pool.oversample=1",
                                                                   f"data.dir={data}"),
                          capture_output=True, text=True, timeout=240, env=_env_vars(), cwd=ROOT)
    assert proc.returncode != 0
    assert "pool" in (proc.stderr + proc.stdout) and "oversample" in (proc.stderr + proc.stdout)
    # the same number of questions in another order: the pool's ids would index other questions
    train = data / "train.jsonl"
    train.write_text("".join(reversed(train.read_text().splitlines(keepends=True))))
    proc = subprocess.run(CLI + ["train", "--resume"] + _overrides(env, name, "train.steps=2", "pool.oversample=2",
                                                                   f"data.dir={data}"),
                          capture_output=True, text=True, timeout=240, env=_env_vars(), cwd=ROOT)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{train} no longer holds the questions the checkpoint's run trained on" in proc.stderr
    # the refused resume left config.yaml describing the checkpoints, so they still export
    assert "oversample: 2" in (env["out"] / name / "config.yaml").read_text()
    _run(CLI + ["export", str(env["out"] / name), "--out", str(env["out"] / f"{name}_hf")])
    assert (env["out"] / f"{name}_hf" / "config.json").is_file()


def test_a_fresh_run_in_a_used_folder_moves_the_earlier_run_aside(env):
    # Before: the earlier run's step_3 outlived the new run's checkpoints, and a --resume (or a
    # torchrun restart) of the new run took it up: "steps 3->2", the old run's weights and pool.
    name = "reused_dir"
    run_dir = env["out"] / name
    _run(CLI + ["train"] + _overrides(env, name, "train.steps=3"))
    first_metrics = (run_dir / "metrics.jsonl").read_text()
    out = _run(CLI + ["train"] + _overrides(env, name, "train.steps=1")).stdout
    assert "holds an earlier run (not resuming): moved its checkpoints" in out
    (earlier,) = (run_dir / "previous").iterdir()
    assert "step_3" in {p.name for p in (earlier / "checkpoints").iterdir()}
    assert (earlier / "metrics.jsonl").read_text() == first_metrics  # nothing lost
    assert (earlier / "pool_history.csv").is_file() and (earlier / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1"]
    # the resume continues this run, from its own step 1; a crash may have left the pool
    # history behind its checkpoint: the resume rewrites it from the restored pool
    history = (run_dir / "pool_history.csv").read_text()
    (run_dir / "pool_history.csv").unlink()
    out = _run(CLI + ["train", "--resume"] + _overrides(env, name, "train.steps=1")).stdout
    assert f"resumed from {run_dir / 'checkpoints'} step 1" in out and "steps 1->1" in out
    assert (run_dir / "pool_history.csv").read_text() == history
    out = _run(CLI + ["train", "--resume"] + _overrides(env, name, "train.steps=2")).stdout
    assert "steps 1->2" in out
    assert [r["step"] for r in _metrics(run_dir)] == [0, 1]


def test_bf16_distributed_optimizer_resume_gives_the_uninterrupted_weights(env, tmp_path):
    """The GPU recipes' optimizer settings (bf16, Megatron's distributed optimizer) through the
    trainer's own checkpoint and --resume: a run resumed after its first step ends with the same
    weights as the uninterrupted run, bit for bit. (Its checkpoints used to lack the Adam moments
    and fp32 main weights, and the first one failed when no step had run yet.)"""
    import shutil

    from safetensors.torch import load_file

    extra = ["train.steps=2", "pool.oversample=2", "model.bf16=true", "optim.use_distributed_optimizer=true"]
    _run(CLI + ["train", "--save-hf", str(tmp_path / "straight")] + _overrides(env, "distopt_a", *extra))
    # the same run stopped after step 1: a copy of its folder without the last checkpoint
    shutil.copytree(env["out"] / "distopt_a", env["out"] / "distopt_b")
    shutil.rmtree(env["out"] / "distopt_b" / "checkpoints" / "step_2")
    out = _run(CLI + ["train", "--resume", "--save-hf", str(tmp_path / "resumed")]
               + _overrides(env, "distopt_b", *extra)).stdout
    assert "resumed from" in out and "step 1" in out, out[-2000:]

    def weights(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a and sorted(a) == sorted(b)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) == 0.0
    assert [r["train/loss"] for r in _metrics(env["out"] / "distopt_a")] == [
        r["train/loss"] for r in _metrics(env["out"] / "distopt_b")
    ]


@pytest.mark.distributed
def test_resume_on_another_layout_reshards_the_checkpoint(env, tmp_path):
    """A run saved by two ranks with TP 2, bf16 and the distributed optimizer (and sequence
    parallelism with selective recomputation), resumed by one process with the plain optimizer
    (train/reshard.py): it starts from the checkpoint's weights exactly, and goes on training (with
    full recomputation: the memory options may change on resume)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_recycle.train.reshard import SavedModelSpace

    name = "reshard"
    extra = ["pool.oversample=2", "model.bf16=true"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "megatron_recycle.cli", "train"]
    out = _run(torchrun + _overrides(env, name, "train.steps=1", "model.tp=2", "optim.use_distributed_optimizer=true",
                                     "model.sequence_parallel=true", "model.recompute=selective", *extra),
               timeout=400).stdout
    assert "(tp 2 pp 1 dp 1, selective recomputation (core_attn), sequence parallel, packed groups, attention " in out, out[-3000:]
    step1 = env["out"] / name / "checkpoints" / "step_1"
    records = [torch.load(step1 / f"rank_0000{r}.pt", weights_only=True)["parts"]["model_space"] for r in (0, 1)]
    saved = SavedModelSpace(records, AutoConfig.from_pretrained(env["model"]))

    out = _run(CLI + ["train", "--resume", "--save-hf", str(tmp_path / "at1")] + _overrides(env, name, "train.steps=1", *extra)).stdout
    assert "saved by 2 ranks: TP 2, PP 1, VPP 1, DP 1, distributed optimizer on" in out, out[-3000:]
    assert "this run has 1 ranks: TP 1, PP 1, VPP 1, DP 1, distributed optimizer off: resharding" in out
    exported = {k: v for f in sorted((tmp_path / "at1").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert exported and set(exported) <= set(saved.owner_of) | {"lm_head.weight"}
    for k, v in exported.items():
        if k in saved.owner_of:
            assert torch.equal(v.float(), saved.getter("weight")(k).float()), k

    # the same checkpoint exported offline (`megatron-recycle export`: one process, no Megatron model)
    def weights(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    out = _run(CLI + ["export", str(env["out"] / name), "--step", "1", "--out", str(tmp_path / "export")]).stdout
    assert "checkpoint step 1 (2 rank files, model weights)" in out, out
    offline = weights(tmp_path / "export")
    assert sorted(offline) == sorted(exported) and all(torch.equal(offline[k], exported[k]) for k in offline)
    assert (tmp_path / "export" / "tokenizer.json").is_file() and (tmp_path / "export" / "config.json").is_file()
    _run(CLI + ["export", str(env["out"] / name), "--main-weights", "--out", str(tmp_path / "main")])
    main = weights(tmp_path / "main")
    assert all(v.dtype == torch.float32 for v in main.values())
    # the bf16 weights are the fp32 main weights rounded (Megatron's copy after each step)
    assert all(torch.equal(main[k].to(torch.bfloat16), exported[k]) for k in exported)
    bad = subprocess.run(CLI + ["export", str(tmp_path), "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, timeout=120, env=_env_vars(), cwd=ROOT)
    assert bad.returncode == 2 and "CheckpointError" in bad.stderr and "no config.yaml" in bad.stderr, bad.stderr
    # a training checkpoint where a Hugging Face folder belongs: the error says how to export it
    for args in (["eval", "--checkpoint", str(step1)], ["train", "--init-from", str(step1)]):
        bad = subprocess.run(CLI + args + _overrides(env, name, *extra), capture_output=True, text=True,
                             timeout=120, env=_env_vars(), cwd=ROOT)
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert f"megatron-recycle export {env['out'] / name} --step 1 --out DIR" in bad.stderr, bad.stderr[-2000:]

    out = _run(CLI + ["train", "--resume"] + _overrides(env, name, "train.steps=2", "model.recompute=full",
                                                        "model.recompute_num_layers=2", *extra)).stdout
    assert "(tp 1 pp 1 dp 1, full recomputation (uniform, 2 layers per unit), packed groups, attention " in out, out[-3000:]
    assert [r["step"] for r in _metrics(env["out"] / name)] == [0, 1]
    manifest = json.loads((env["out"] / name / "checkpoints" / "step_2" / "manifest.json").read_text())
    assert manifest["world_size"] == 1


@pytest.mark.slow
def test_sigint_writes_a_final_checkpoint_and_save_hf(env, tmp_path):
    name = "sigint"
    run_dir = env["out"] / name
    hf_dir = tmp_path / "hf"
    proc = subprocess.Popen(
        CLI + ["train", "--save-hf", str(hf_dir)] + _overrides(env, name, "train.steps=50", "run.save_every=0"),
        env=_env_vars(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
        time.sleep(0.05)
    while time.time() < deadline and not (run_dir / "metrics.jsonl").read_text().strip():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(steps) == 1 and 1 <= steps[0] < 50  # one checkpoint, written on the stop
    assert len(_metrics(run_dir)) == steps[0]
    # the exported policy loads in transformers and matches the checkpoint's step count of updates
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.num_hidden_layers == 2


@pytest.mark.slow
def test_nan_loss_stops_without_a_new_checkpoint(env):
    name = "diverge"
    run_dir = env["out"] / name
    proc = subprocess.run(CLI + ["train"] + _overrides(env, name, "train.steps=6", "optim.lr=1e30", "optim.clip_grad=0"),
                          capture_output=True, text=True, timeout=240, env=_env_vars(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "TrainingDiverged" in proc.stderr and "without writing a checkpoint" in proc.stderr
    rows = _metrics(run_dir)  # the diverged step is not logged
    assert len(rows) < 6 and all(math.isfinite(r.get("train/loss", 0.0)) for r in rows)
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    # no checkpoint of the diverged step: the newest one is the last step whose loss was finite
    assert max(saved, default=0) <= len(rows)


@pytest.mark.slow
def test_resume_keeps_the_kl_reference_of_the_run(env, tmp_path):
    """A run started with --init-from X measures its KL against X; a resume without it (or with
    another model) would have measured it against model.name_or_path: refused, with the fix."""
    start = tmp_path / "start"
    _run(CLI + ["train", "--save-hf", str(start)] + _overrides(env, "kl_start", "train.steps=1"))
    name = "kl_ref"
    kl = ["loss.kl_beta=0.01", "pool.strategy=grpo", "pool.oversample=1"]
    _run(CLI + ["train", "--init-from", str(start)] + _overrides(env, name, "train.steps=1", *kl))
    proc = subprocess.run(CLI + ["train", "--resume"] + _overrides(env, name, "train.steps=2", *kl),
                          capture_output=True, text=True, timeout=240, env=_env_vars(), cwd=ROOT)
    assert proc.returncode != 0
    assert f"resume with --init-from {start} as it was" in proc.stderr, proc.stderr[-3000:]
    out = _run(CLI + ["train", "--resume", "--init-from", str(start)] + _overrides(env, name, "train.steps=2", *kl)).stdout
    assert "steps 1->2" in out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["grpo", "dapo"])
def test_an_exhausted_pool_ends_training_with_a_checkpoint(env, strategy):
    """pool.on_exhausted=stop with 4 training queries and B = 2: training ends when the pool runs
    out, exit 0, the steps done logged and checkpointed (dapo: the step that ran out mid-step
    trains on what it drew); a resume meets the same end and changes nothing."""
    name = f"exhaust_{strategy}"
    run_dir = env["out"] / name
    extra = ["pool.on_exhausted=stop", "data.max_train_queries=4", f"pool.strategy={strategy}", "pool.oversample=1",
             "train.steps=6", "run.save_every=0"] + (["pool.max_gen_batches=3"] if strategy == "dapo" else [])
    out = _run(CLI + ["train"] + _overrides(env, name, *extra)).stdout
    rows = _metrics(run_dir)
    assert 1 <= len(rows) <= 2, rows
    if strategy == "grpo":  # two draws of 2 use up the 4 queries; the third finds none
        assert len(rows) == 2 and "training ends before step 2 (pool.on_exhausted=stop)" in out, out[-2000:]
    else:  # drawn until B signal groups or 3 batches: the pool runs out mid-step or before the next one
        assert "pool.on_exhausted=stop" in out, out[-2000:]
    assert sum(r["candidates"] for r in rows) == 4
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved == [len(rows)]
    again = _run(CLI + ["train", "--resume"] + _overrides(env, name, *extra)).stdout
    assert f"training ends before step {len(rows)}" in again, again[-2000:]
    assert len(_metrics(run_dir)) == len(rows)


@pytest.mark.slow
def test_sft_checkpoints_and_resume_give_the_uninterrupted_weights(env):
    """sft.save_every=2: a second run resumed from the first one's checkpoint of step 2 (model,
    optimizer, schedule, RNG, the rest of the data order, which runs out after step 4 here and is
    reshuffled) ends with bit-identical weights and the same losses, and its checkpoint of step 4
    exports the same weights as the first run's."""
    import shutil

    from safetensors.torch import load_file

    steps = ["sft.steps=6", "sft.batch_size=2", "sft.save_every=2"]
    _run(CLI + ["sft"] + _overrides(env, "sft_straight", *steps))
    straight = env["out"] / "sft_straight" / "sft"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_2", "step_4"]  # none at the end
    resumed = env["out"] / "sft_resumed" / "sft"
    shutil.copytree(straight / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")  # the resume drops its lines >= 2
    proc = _run(CLI + ["sft", "--resume"] + _overrides(env, "sft_resumed", *steps))
    assert f"[sft] resumed from {resumed / 'checkpoints'} step 2" in proc.stdout
    assert "steps 2->6" in proc.stdout and "[sft] step 1/6" not in proc.stdout
    want, got = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in got] == list(range(6))
    assert [r["sft/loss"] for r in got] == [r["sft/loss"] for r in want]
    def same_weights(x: Path, y: Path) -> None:
        files = sorted(p.name for p in x.glob("*.safetensors"))
        assert files and files == sorted(p.name for p in y.glob("*.safetensors"))
        for name in files:
            a, b = load_file(x / name), load_file(y / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    same_weights(straight / "hf", resumed / "hf")
    # the resumed run's own checkpoint of step 4 is the first run's (`export` reads RUN_DIR/sft)
    for run in (straight, resumed):
        _run(CLI + ["export", str(run), "--out", str(run / "step4_hf"), "--step", "4"])
    same_weights(straight / "step4_hf", resumed / "step4_hf")


def _interrupt_when(proc: subprocess.Popen, metrics_file: Path) -> str:
    """SIGINT once ``metrics_file`` has a line; the process's output."""
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics_file.is_file() and metrics_file.read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"ended (rc {proc.returncode}) before it could be interrupted:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=240)[0]


@pytest.mark.slow
def test_sft_ctrl_c_checkpoints_without_a_result_and_resumes(env):
    """Ctrl-C in `sft`: the step finishes, a checkpoint is written, no Hugging Face folder (a later
    `run --resume` would take it for the finished SFT), exit code 130; `sft --resume` finishes."""
    name = "sft_sigint"
    sft_dir = env["out"] / name / "sft"
    over = _overrides(env, name, "sft.steps=40", "sft.batch_size=2")  # sft.save_every 0: only the stop's
    proc = subprocess.Popen(CLI + ["sft"] + over, env=_env_vars(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = _interrupt_when(proc, sft_dir / "metrics.jsonl")
    assert proc.returncode == 130, out[-3000:]
    stopped = int(re.search(r"\[sft\] stopped after (\d+) steps; resume with --resume", out)[1])
    assert 1 <= stopped < 40 and [p.name for p in (sft_dir / "checkpoints").iterdir()] == [f"step_{stopped}"]
    assert not (sft_dir / "hf").exists()
    again = _run(CLI + ["sft", "--resume"] + over)
    assert f"resumed from {sft_dir / 'checkpoints'} step {stopped}" in again.stdout
    assert [r["step"] for r in _metrics(sft_dir)] == list(range(40))
    assert (sft_dir / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_run_ctrl_c_during_grpo_stops_before_the_final_evaluation(env):
    """Ctrl-C in `run` during GRPO: GRPO checkpoints, and the run ends there (exit code 130)
    instead of evaluating and reporting the half-trained policy as the recipe's result."""
    name = "run_sigint"
    run_dir = env["out"] / name
    over = _overrides(env, name, "sft.steps=1", "sft.batch_size=2", "train.steps=50", "run.save_every=0",
                      "eval.batch_size=4")
    proc = subprocess.Popen(CLI + ["run"] + over, env=_env_vars(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = _interrupt_when(proc, run_dir / "metrics.jsonl")
    assert proc.returncode == 130, out[-3000:]
    assert re.search(r"\[run\] GRPO stopped after \d+ of 50 steps: no final evaluation or report", out), out[-3000:]
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 1
    assert not (run_dir / "report.json").exists() and not (run_dir / "eval" / "after_test.json").exists()
    assert not (run_dir / "final_hf").exists()


@pytest.mark.slow
def test_run_pipeline_end_to_end(env):
    name = "pipeline"
    proc = _run(CLI + ["run"] + _overrides(env, name, "sft.steps=2", "sft.batch_size=2", "train.steps=1",
                                             "eval.batch_size=4", "train.eval_every=1"))
    run_dir = env["out"] / name
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["test_pass@1"]) == {"untrained", "after_sft", "after_grpo"}
    assert all(0.0 <= v <= 1.0 for v in report["test_pass@1"].values())
    for f in ("before_test.json", "after_sft_test.json", "after_test.json"):
        assert (run_dir / "eval" / f).is_file()
    assert (run_dir / "sft" / "hf" / "config.json").is_file() and (run_dir / "final_hf" / "config.json").is_file()
    # the source model's stop ids travel through the SFT export into the final one
    source = json.loads((Path(env["model"]) / "generation_config.json").read_text())
    for folder in ("sft/hf", "final_hf"):
        assert json.loads((run_dir / folder / "generation_config.json").read_text())["eos_token_id"] == source["eos_token_id"]
    assert (run_dir / "plots" / "recycled_share.png").stat().st_size > 1000
    assert any("eval/dev_pass@1" in r for r in _metrics(run_dir))
    assert "Report:" in proc.stdout


def test_the_rollout_budget_ends_training_and_survives_a_resume(env):
    """train.rollout_budget: training stops once that many trajectories were rolled out (k*B*K =
    2*2*4 = 16 per step here), and a resume counts the steps before its checkpoint."""
    out = _run(CLI + ["train"] + _overrides(env, "budget", "pool.oversample=2", "train.steps=3",
                                            "train.rollout_budget=16")).stdout
    rows = _metrics(env["out"] / "budget")
    assert [r["step"] for r in rows] == [0] and rows[0]["rollouts_total"] == 16
    assert "rollout budget 16 reached" in out
    _run(CLI + ["train"] + _overrides(env, "budget_resume", "pool.oversample=2", "train.steps=1"))
    _run(CLI + ["train", "--resume"] + _overrides(env, "budget_resume", "pool.oversample=2", "train.steps=3",
                                                  "train.rollout_budget=32"))
    rows = _metrics(env["out"] / "budget_resume")
    assert [r["step"] for r in rows] == [0, 1] and rows[-1]["rollouts_total"] == 32


def test_the_decision_log_keeps_only_the_steps_before_a_resume(tmp_path):
    from megatron_recycle.train.grpo import _DecisionLog

    log = _DecisionLog(tmp_path, 0, None)
    for step in range(4):
        log.write(step, [{"sampled": [step], "chosen": []}])
    _DecisionLog(tmp_path, 0, 2)  # resumed from step_2: steps 0 and 1 stay, 2 and 3 are run again
    assert [json.loads(x)["step"] for x in log.path.read_text().splitlines()] == [0, 1]
