"""Two-rank gloo check of the vocab-parallel token_logprobs and chunked_token_logprobs (run by test_logprobs.py).

Each rank holds half the vocabulary (Megatron's layout: rank r owns ids [r*V/2, (r+1)*V/2)) and
must reproduce the single-rank float64 reference: outputs everywhere, the logits / weight
gradient of its own shard, and the full hidden gradient (all-reduced by the chunked backward).
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(rank: int, world: int, impl: str) -> None:
    from megatron_recycle_kernels import chunked_token_logprobs, token_logprobs
    from megatron_recycle_kernels.reference import chunked_token_logprobs_reference, token_logprobs_reference

    g = torch.Generator().manual_seed(0)  # identical on every rank
    rows, vocab, hid = 11, 96, 8
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    # targets in both halves, including the shard boundary
    targets[0], targets[1], targets[2] = vocab // 2 - 1, vocab // 2, vocab - 1
    w_lp, w_ent = (
        torch.randn(rows, generator=g, dtype=torch.float64),
        torch.randn(rows, generator=g, dtype=torch.float64),
    )
    hidden = torch.randn(rows, hid, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hid, generator=g, dtype=torch.float64) * 0.5
    lo, hi = rank * vocab // world, (rank + 1) * vocab // world
    group = dist.group.WORLD
    tol = dict(rtol=1e-5, atol=1e-5) if impl == "triton" else dict(rtol=1e-10, atol=1e-10)

    x = logits.clone().requires_grad_()
    rlp, rent = token_logprobs_reference(x, targets, 0.8, return_entropy=True)
    (rgrad,) = torch.autograd.grad((w_lp * rlp).sum() + (w_ent * rent).sum(), x)
    shard = logits[:, lo:hi].clone().requires_grad_()
    lp, ent = token_logprobs(shard, targets, 0.8, tp_group=group, return_entropy=True, impl=impl)
    (grad,) = torch.autograd.grad((w_lp * lp.double()).sum() + (w_ent * ent.double()).sum(), shard)
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(ent.double(), rent, **tol)
    torch.testing.assert_close(grad.double(), rgrad[:, lo:hi], **tol)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rlp, rent = chunked_token_logprobs_reference(h, w, targets, 0.8, True)
    rh, rw = torch.autograd.grad((w_lp * rlp).sum() + (w_ent * rent).sum(), (h, w))
    hs, ws = hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()
    lp, ent = chunked_token_logprobs(
        hs, ws, targets, 0.8, tp_group=group, chunk_size=4, return_entropy=True, impl=impl
    )
    gh, gw = torch.autograd.grad((w_lp * lp.double()).sum() + (w_ent * ent.double()).sum(), (hs, ws))
    torch.testing.assert_close(lp.double(), rlp, **tol)
    torch.testing.assert_close(ent.double(), rent, **tol)
    torch.testing.assert_close(gh.double(), rh, **tol)
    torch.testing.assert_close(gw.double(), rw[lo:hi], **tol)

    # unvalidated ids outside the whole vocabulary (one in neither shard, -100): NaN on every rank,
    # though each rank alone sees only "not mine"; the other rows as before
    bad_targets = targets.clone()
    bad_targets[3], bad_targets[4] = vocab + 1, -100
    lp = token_logprobs(logits[:, lo:hi], bad_targets, 0.8, tp_group=group, impl=impl, validate_targets=False)
    rlp = token_logprobs_reference(logits, targets, 0.8)
    assert torch.isnan(lp[3:5]).all() and not torch.isnan(lp[5:]).any() and not torch.isnan(lp[:3]).any()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[3:5] = False
    torch.testing.assert_close(lp.double()[keep], rlp[keep], **tol)

    # row_mask: masked rows (ids there out of range too) give 0 on both ranks, where each rank's
    # merge alone would report -log(world); their logits' gradient is 0, the kept rows' as before
    row_mask = torch.ones(rows, dtype=torch.bool)
    row_mask[3:6] = False
    shard = logits[:, lo:hi].clone().requires_grad_()
    lp, ent = token_logprobs(shard, bad_targets, 0.8, tp_group=group, return_entropy=True, impl=impl,
                             row_mask=row_mask)
    (grad,) = torch.autograd.grad((w_lp * lp.double()).sum() + (w_ent * ent.double()).sum(), shard)
    x = logits.clone().requires_grad_()
    rlp, rent = token_logprobs_reference(x, targets, 0.8, return_entropy=True)
    kept = row_mask.double()
    (rgrad,) = torch.autograd.grad((w_lp * rlp * kept).sum() + (w_ent * rent * kept).sum(), x)
    assert torch.equal(lp[3:6], torch.zeros(3, dtype=lp.dtype)) and torch.equal(ent[3:6], torch.zeros(3, dtype=ent.dtype))
    torch.testing.assert_close(lp.double()[row_mask], rlp[row_mask], **tol)
    torch.testing.assert_close(ent.double()[row_mask], rent[row_mask], **tol)
    torch.testing.assert_close(grad.double(), rgrad[:, lo:hi], **tol)


def _run(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import megatron_recycle_kernels

        impls = ["torch"] + (["triton"] if megatron_recycle_kernels.INTERPRETED else [])
        for impl in impls:
            _check(rank, world, impl)
        print(f"rank ok {rank} impls={impls}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(2, _free_port()), nprocs=2, join=True)
    sys.exit(0)
