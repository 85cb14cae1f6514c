"""Worker functions for test_dist_helper.py (loaded by file path in each rank's process)."""

import os
import time


def rank1_fails(rank, world_size, out_dir):
    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    time.sleep(120)  # a peer stuck in a collective
    return rank


def all_ok(rank, world_size, out_dir):
    return {"rank": rank, "world": world_size, "env_rank": int(os.environ["RANK"])}


def print_then_hang(rank, world_size, out_dir):
    print(f"rank {rank} got this far", flush=True)
    time.sleep(120)  # a hang (a collective that never completes)
