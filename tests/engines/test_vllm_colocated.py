"""The colocated vLLM path end to end on CPU, with ``vllm.LLM`` replaced by an HF-backed stand-in
(tests/engines/_colocated_workers.py): which ranks build an engine for several (world, tp, pp,
vllm_tp) layouts, identical requests on the ranks of one vLLM TP group (and a refusal when they
differ), every DP replica getting its own share, the weight sync reaching every rank's engine with
full tensors, the sleep/wake order of real GRPO steps under vLLM's sleep levels, and evaluations
sharded over the vLLM blocks.

Nothing here runs vLLM itself: its real process groups, CUDA memory pool and weight loaders are
only exercised on a GPU (tests/engines/test_vllm.py::test_vllm_end_to_end_matches_hf_engine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.train.loop_fixtures import write_tiny_data, write_tiny_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IDS = [3, 7, 11, 2, 5]  # the query ids sampled for one generation batch (sharded over DP inside)
K = 4  # rollout.group_size in loop_fixtures.base_overrides


def run_world(fn: str, world: int, args: dict, timeout: float = 400.0) -> list:
    """Run ``_colocated_workers.<fn>(args)`` on ``world`` local gloo ranks; every rank's result."""
    from tests.train._dist import free_port

    with tempfile.TemporaryDirectory(prefix=f"colocated_{fn}_") as tmp:
        port = free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ)
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
            env.pop("TRITON_INTERPRET", None)
            log = open(Path(tmp) / f"log{rank}.txt", "w")  # noqa: SIM115 - closed below
            cmd = [sys.executable, str(HERE / "_colocated_workers.py"), fn, tmp, json.dumps(args)]
            procs.append((subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        codes: dict[int, object] = {}
        while len(codes) < world:
            for rank, (p, _) in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
            if any(c != 0 for c in codes.values()) or time.monotonic() > deadline:
                for rank, (p, _) in enumerate(procs):  # one rank failed: the others would wait forever
                    if rank not in codes:
                        p.kill()
                        p.wait()
                        codes[rank] = "killed"
                break
            time.sleep(0.05)
        for _, log in procs:
            log.close()
        failed = [r for r, c in sorted(codes.items()) if c != 0]
        if failed:
            logs = "\n".join(f"--- rank {r} ({codes[r]}) ---\n{(Path(tmp) / f'log{r}.txt').read_text()[-5000:]}"
                             for r in failed)
            raise RuntimeError(f"{fn} failed on ranks {failed}:\n{logs}")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("colocated")
    return {"model": str(write_tiny_model(base / "model")), "data": str(write_tiny_data(base / "data")),
            "out": str(base / "runs"), "cache": str(base / "cache")}


def _shares(dp: int) -> list[list[int]]:
    from megatron_recycle.pool import shard

    return [shard(torch.tensor(IDS), r, dp).tolist() for r in range(dp)]


# (world, trainer tp, trainer pp, vllm_tp, engine) -> the vLLM groups expected to generate
LAYOUTS = [
    (2, 1, 1, 2, "vllm"),  # DP=2 replicas, one vLLM TP=2 group generates both shares
    (2, 2, 1, 1, "vllm"),  # trainer TP=2, vLLM TP=1: rank 0 generates, rank 1's engine stays idle
    (2, 1, 2, 2, "vllm"),  # PP=2: the pp-1 rank takes part in the pp-0 leader's generation
    (2, 2, 1, 1, "hf"),  # the HF path is unchanged: the model-parallel leader alone
]


@pytest.mark.distributed
@pytest.mark.parametrize("world,tp,pp,vtp,engine", LAYOUTS, ids=[f"w{w}-tp{t}-pp{p}-vtp{v}-{e}" for w, t, p, v, e in LAYOUTS])
def test_engine_ranks_identical_requests_shares_and_sync(env, world, tp, pp, vtp, engine):
    res = run_world("layout", world, {**env, "tp": tp, "pp": pp, "vllm_tp": vtp, "engine": engine, "ids": IDS,
                                      "name": f"w{world}tp{tp}pp{pp}v{vtp}{engine}"})
    dp = world // (tp * pp)
    assert all(r["dp"] == dp for r in res)
    leaders = [r["rank"] for r in res if r["tp_rank"] == 0 and r["pp_rank"] == 0]

    # Which ranks build an engine: every rank for vLLM (external launcher), MP leaders for HF.
    built = [r["rank"] for r in res if r["built"]]
    assert built == (list(range(world)) if engine == "vllm" else leaders)

    # Every rank of a DP replica gets exactly its replica's share, K trajectories per query, the
    # same ones on every rank of the replica.
    shares = _shares(dp)
    for r in res:
        assert [q for q, _ in r["trajs"]] == [q for q in shares[r["dp_rank"]] for _ in range(K)]
        assert all(len(tok) > 0 for _, tok in r["trajs"])
    for d in range(dp):
        replica = [r["trajs"] for r in res if r["dp_rank"] == d]
        assert all(t == replica[0] for t in replica)

    # The weight sync reaches every engine, with full (unsharded) HF tensors.
    assert len({r["n_sync"] for r in res}) == 1 and res[0]["n_sync"] > 0
    if engine == "hf":
        return
    for r in res:
        assert r["ctor"]["tensor_parallel_size"] == vtp and r["ctor"]["seed"] == 0
        assert len(r["loaded"]) == r["n_sync"]
        assert all(r["hf_names"][n] == shape for n, shape in r["loaded"])  # full shapes, even with trainer TP
        assert r["loaded"] == res[0]["loaded"]

    # vLLM groups are blocks of vtp consecutive ranks; inside one, the requests are identical; a
    # group generates iff it holds a model-parallel leader.
    for g in range(world // vtp):
        members = [res[i] for i in range(g * vtp, (g + 1) * vtp)]
        assert all(m["group_ranks"] == (None if vtp == 1 else list(range(g * vtp, (g + 1) * vtp))) for m in members)
        assert all(m["requests"] == members[0]["requests"] for m in members)
        has_leader = any(m["rank"] in leaders for m in members)
        assert bool(members[0]["requests"]) == has_leader
        if vtp > 1:  # different prompts on the ranks of one group are refused on every rank
            assert all("issued different requests" in m["mismatch"] for m in members)
    if (world, tp, pp, vtp) == (2, 1, 1, 2):  # one group, both shares in one batch: 5 queries x K prompts
        assert res[0]["requests"][0].startswith(f"{len(IDS) * K}:")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("level", [1, 2])
def test_grpo_step_sleeps_after_rollouts_and_wakes_after_the_sync(env, level):
    (res,) = run_world("grpo_sleep_wake", 1, {**env, "sleep_level": level, "name": f"sleep{level}"})
    assert res["steps"] == 2 and res["finite"] and res["loaded"] > 0
    ev = res["events"]
    trains = [i for i, e in enumerate(ev) if e == "train"]
    assert len(trains) == 2, ev
    for t in trains:
        # Between the rollouts and the training: sleep; then the sync wakes the weights alone (so they
        # are present when written), the KV cache comes back after it, before any new generation.
        assert ev[t - 1] == f"sleep:{level}" and ev[t - 2] == "generate", ev
        assert ev[t + 1:t + 3] == ["wake:('weights',)", "wake:('kv_cache',)"], ev
    assert ev[0] == "generate" and ev[trains[0] + 3] == "generate"  # step 2 rolls out awake
    assert ev.count(f"sleep:{level}") == 2


@pytest.mark.distributed
def test_evaluation_sharded_over_vllm_blocks(env):
    """Two ranks, the real VLLMEngine and build_engine over the HF-backed stand-in: with vLLM TP 2
    the block's two ranks issue identical requests (one shard, checked before every generate);
    with vLLM TP 1 each rank's engine rolls out its own batches (two shards). Rank 0 alone gets
    the result, the same in both layouts; the engine sleeps after the evaluation."""
    results = {}
    for vtp in (2, 1):
        res = run_world("sharded_eval", 2, {**env, "vllm_tp": vtp, "name": f"eval_v{vtp}"})
        assert res[0]["result"] is not None and res[1]["result"] is None
        assert res[0]["result"]["overall"]["n"] == 4 and all(r["slept"] == [("sleep", 1)] for r in res)
        if vtp == 2:
            assert res[0]["group_ranks"] == [0, 1] and res[0]["requests"] == res[1]["requests"]
            assert len(res[0]["requests"]) == 4 and res[0]["result"]["config"]["shards"] == 1
        else:
            assert len(res[0]["requests"]) == len(res[1]["requests"]) == 2  # batches 0, 2 and 1, 3
            assert set(res[0]["requests"]).isdisjoint(res[1]["requests"])
            assert res[0]["result"]["config"]["shards"] == 2
        results[vtp] = res[0]
    assert results[1]["predictions"] == results[2]["predictions"]
    assert results[1]["result"]["overall"] == results[2]["result"]["overall"]
