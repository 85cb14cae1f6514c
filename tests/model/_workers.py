"""Worker functions run on every rank by _dist.run_workers (TP=2 / PP=2 / PP=2+VPP=2 on gloo)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _tiny import tiny_hf_model, tiny_inputs  # on sys.path in the worker process

from megatron_recycle.model.build import build_model_chunks, unwrap_model
from megatron_recycle.model.convert import (
    export_hf_state_dict_to_cpu,
    load_hf_weights,
    save_hf_checkpoint,
)
from megatron_recycle.model.parallel import destroy_distributed, init_distributed


def _tp_logits(chunk, ids, pos) -> torch.Tensor:
    """Full-vocabulary logits (on the CPU) from a PP=1 model whose logits are TP-sharded by
    vocabulary; ids and pos go to the model's device (a GPU under NCCL)."""
    from megatron.core import parallel_state as ps

    dev = next(chunk.parameters()).device
    with torch.no_grad():
        local = chunk(ids.to(dev), pos.to(dev), None)
    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1).cpu()


def _pp_logits(chunk, ids, pos, vocab: int) -> torch.Tensor:
    """Logits (on the CPU) of a PP=2 model by hand: stage 0 sends its hidden states to stage 1,
    which computes the logits and broadcasts them so every rank can report the error. Everything
    sent lives on the model's device (NCCL moves GPU tensors only)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    rank = ps.get_pipeline_model_parallel_rank()
    first, last = dist.get_global_rank(group, 0), dist.get_global_rank(group, 1)
    b, s = ids.shape
    dev = next(chunk.parameters()).device
    ids, pos = ids.to(dev), pos.to(dev)
    with torch.no_grad():
        if rank == 0:
            dist.send(chunk(ids, pos, None).contiguous(), dst=last)
            logits = torch.empty(b, s, vocab, device=dev)
        else:
            hidden = torch.empty(s, b, chunk.config.hidden_size, device=dev)
            dist.recv(hidden, src=first)
            unwrap_model(chunk).set_input_tensor(hidden)
            logits = chunk(ids, pos, None).contiguous()
    dist.broadcast(logits, src=last)
    return logits.cpu()


_WATCHED = {
    "embedding.word_embeddings.weight",
    "output_layer.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
}


def sharded_roundtrip(rank: int, world_size: int, out_dir: str, layouts: list[dict]) -> dict:
    """For each layout: load a tiny HF model into the local shard, check shard shapes, logits
    against transformers, export bit-identical; optionally save a HF checkpoint."""
    torch.set_num_threads(1)
    results = {}
    for lay in layouts:
        tp, pp, vpp = lay["tp"], lay["pp"], lay.get("vpp")
        hf = tiny_hf_model(lay["kind"], lay["tied"], layers=lay.get("layers", 2), seed=lay.get("seed", 0))
        cfg = hf.config
        init_distributed(tp=tp, pp=pp, vpp=vpp, seed=1, model_config=cfg)
        chunks = build_model_chunks(cfg, bf16=lay.get("bf16", False), layer_spec="local")
        n_loaded = load_hf_weights(chunks, hf)
        local_layers = [
            [int(layer.layer_number) - 1 for layer in unwrap_model(c).decoder.layers] for c in chunks
        ]
        shapes = {
            name: list(p.shape) for name, p in unwrap_model(chunks[0]).named_parameters() if name in _WATCHED
        }
        exported = export_hf_state_dict_to_cpu(chunks, cfg)
        ref = {
            k: v
            for k, v in hf.state_dict().items()
            if not (cfg.tie_word_embeddings and k == "lm_head.weight")
        }
        if lay.get("bf16"):
            ref = {k: v.to(torch.bfloat16) for k, v in ref.items()}
        mismatched = sorted(k for k in ref if k not in exported or not torch.equal(exported[k], ref[k]))
        extra = sorted(set(exported) - set(ref))
        ids, pos = tiny_inputs()
        with torch.no_grad():
            want = hf(ids).logits
        logit_err = None
        if pp == 1:
            got = _tp_logits(chunks[0], ids, pos)
            logit_err = float((got - want).abs().max())
        elif vpp is None and pp == 2 and not lay.get("bf16"):
            got = _pp_logits(chunks[0], ids, pos, cfg.vocab_size)
            logit_err = float((got - want).abs().max())
        if lay.get("save"):
            save_hf_checkpoint(chunks, cfg, os.path.join(out_dir, lay["save"]), max_shard_bytes=60_000)
        results[lay["name"]] = {
            "n_loaded": n_loaded,
            "local_layers": local_layers,
            "shapes": shapes,
            "mismatched": mismatched,
            "extra": extra,
            "n_exported": len(exported),
            "n_ref": len(ref),
            "logit_err": logit_err,
        }
        destroy_distributed(keep_process_group=True)
    destroy_distributed()
    return results


def collective_timeout(rank: int, world_size: int, out_dir: str, timeout_s: float | None, late_s: float,
                       group: str) -> dict:
    """Rank 0 reaches an all_reduce ``late_s`` seconds after rank 1. With a collective timeout below
    ``late_s``, rank 1's call fails before rank 0 arrives; otherwise it waits and succeeds.
    ``group``: "default" (torch's world group) or "dp" (a megatron group, data parallel)."""
    import time

    from megatron.core import parallel_state as ps

    # gloo on every machine: what is tested is that the configured timeout reaches each group. A
    # timed-out NCCL collective does not raise in the waiting call: NCCL's watchdog tears the
    # process down, another contract.
    init_distributed(tp=1, pp=1, backend="gloo", timeout_min=None if timeout_s is None else timeout_s / 60)
    pg = None if group == "default" else ps.get_data_parallel_group()
    out: dict = {"error": None}
    if rank == 0:
        time.sleep(late_s)
        if timeout_s is not None and late_s > timeout_s:
            # rank 1 has given up by now: a collective here would only fail too
            destroy_distributed()
            return {"error": None, "skipped": True}
    t0 = time.monotonic()
    try:
        x = torch.ones(1)
        dist.all_reduce(x, group=pg)
        out["value"] = float(x)
    except Exception as e:  # noqa: BLE001 - the timeout is what this worker reports
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["waited_s"] = time.monotonic() - t0
    # Always tear the groups down, also after a timeout: a process that exits with a live gloo
    # group can abort in its destructor ("terminate called without an active exception").
    try:
        destroy_distributed()
    except Exception as e:  # noqa: BLE001 - reported, the timeout above is the result
        out["teardown_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def restart_counts(rank: int, world_size: int, out_dir: str, counts: list[str | None]) -> dict:
    """Each rank sees its own TORCHELASTIC_RESTART_COUNT (``counts[rank]``; None: unset), as the
    nodes of a torchrun job after one node's worker failed; restarted_anywhere agrees on every rank."""
    from megatron_recycle.model.parallel import elastic_restart_count, init_process_group, restarted_anywhere

    if counts[rank] is None:
        os.environ.pop("TORCHELASTIC_RESTART_COUNT", None)
    else:
        os.environ["TORCHELASTIC_RESTART_COUNT"] = counts[rank]
    init_process_group()
    out = {"local": elastic_restart_count(), "anywhere": restarted_anywhere()}
    destroy_distributed()
    return out
