"""Rank 0 owns the pool; every rank receives identical sampled ids and effective batches."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_recycle.pool import PoolClient, RecyclingPool, gather_rows, shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rewards(ids: torch.Tensor, step: int) -> torch.Tensor:
    """Deterministic fake rollouts: any rank computes the same rewards for the same ids."""
    g = torch.Generator().manual_seed(1000 * step + 7)
    table = torch.randint(0, 2, (200, 4), generator=g).float()
    return table[ids]


def _run_steps(client: PoolClient, steps: int, start: int, rank: int, world: int):
    log = []
    for step in range(start, start + steps):
        ids = client.sample()
        local = _rewards(shard(ids, rank, world), step)  # this rank's share of the rollouts
        rewards = gather_rows(local)  # on rank 0 only
        if rank == 0:  # the rows come back in the order shard() dealt them: each id's own rewards
            assert torch.equal(rewards, _rewards(ids, step)), step
        chosen = client.update(ids, rewards)
        log.append((ids.tolist(), chosen.tolist()))
    return log


def _worker(rank: int, world: int, port: int, strategy: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pool = RecyclingPool(200, batch_size=8, oversample=2 if strategy == "recycle" else 1,
                             strategy=strategy, seed=11) if rank == 0 else None
        client = PoolClient(pool)
        first = _run_steps(client, 15, 0, rank, world)
        if rank == 0:
            sd = pool.state_dict()
            cont = _run_steps(client, 10, 15, rank, world)
            # A fresh pool loaded from the checkpoint continues the same sequence.
            restored = RecyclingPool(200, batch_size=8, oversample=pool.oversample, strategy=strategy, seed=0)
            restored.load_state_dict(sd)
            client_r = PoolClient(restored)
            resumed = _run_steps(client_r, 10, 15, rank, world)
        else:
            cont = _run_steps(client, 10, 15, rank, world)
            resumed = _run_steps(PoolClient(None), 10, 15, rank, world)
        out[rank] = (first, cont, resumed)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["recycle", "grpo"])
def test_every_rank_sees_the_same_decisions(strategy):
    world = 3
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), strategy, out), nprocs=world, join=True)
    logs = [out[r] for r in range(world)]
    for r in range(1, world):
        assert logs[r] == logs[0]
    first, cont, resumed = logs[0]
    assert cont == resumed
    # the decisions are those of one process holding every rollout
    single = RecyclingPool(200, batch_size=8, oversample=2 if strategy == "recycle" else 1, strategy=strategy,
                           seed=11)
    expected = []
    for step in range(15):
        ids = single.sample()
        expected.append((ids.tolist(), single.update(ids, _rewards(ids, step)).tolist()))
    assert first == expected
    # the run did something non-trivial: several non-empty effective batches
    assert sum(len(c) for _, c in first) > 20


def _exhaust_worker(rank: int, world: int, port: int, out):
    from megatron_recycle.pool import PoolExhausted

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pool = RecyclingPool(6, batch_size=3, strategy="grpo", on_exhausted="stop", seed=1) if rank == 0 else None
        client = PoolClient(pool)
        drawn = _run_steps(client, 2, 0, rank, world)  # 6 queries, 3 a step: all consumed
        try:
            client.sample()
            out[rank] = ("no error", drawn)
        except PoolExhausted as e:
            out[rank] = (str(e), drawn)
        # the ranks are still in step: one more collective goes through
        t = torch.tensor([rank])
        dist.all_reduce(t)
        out[f"sum{rank}"] = int(t)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_an_exhausted_pool_raises_on_every_rank():
    """on_exhausted=stop: the owner's PoolExhausted reaches every rank (no rank left waiting for ids)."""
    world = 3
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_exhaust_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    assert "positive weight" in out[0][0]
    for r in (1, 2):
        assert "the pool (owned by rank 0) is exhausted" in out[r][0]
        assert out[r][1] == out[0][1]
    assert [out[f"sum{r}"] for r in range(world)] == [3, 3, 3]
