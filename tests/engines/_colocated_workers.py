"""Worker functions for tests/engines/test_vllm_colocated.py; each runs on every rank of a small
gloo world (``python _colocated_workers.py <fn> <outdir> <json args>``, rank r's return value is
saved to ``<outdir>/rank<r>.pt``).

vLLM cannot run here, so ``vllm.LLM`` is replaced by :class:`HFBackedLLM`: generation by the
project's HFEngine, weights loaded into its HF model, and vLLM's sleep semantics enforced (level 1
offloads the weights, level 2 discards them, both release the KV cache; generating or writing
weights while they are released is an error). Everything else is the project's real code: the
real ``VLLMEngine`` (from_llm), ``runtime.build_engine``'s vllm branch with its request groups,
``setup_runtime``, ``grpo.rollout_share``, ``sync_engine_weights`` and ``run_grpo``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class HFBackedLLM:
    """The ``vllm.LLM`` methods VLLMEngine uses, over an HFEngine, recording every call."""

    def __init__(self, hf_engine: Any, vllm_module: Any) -> None:
        self.hf = hf_engine
        self.V = vllm_module
        self.events: list[tuple] = []
        self.weights_awake = self.kv_awake = True
        self.loaded: list[tuple[str, tuple[int, ...]]] = []
        proxy = SimpleNamespace(load_weights=self._load, named_parameters=hf_engine.model.named_parameters,
                                config=hf_engine.model.config)
        self.model = proxy

    def _load(self, weights):
        if not self.weights_awake:
            raise AssertionError("weights written while vLLM's weights are asleep (offloaded or discarded)")
        batch = list(weights)
        self.loaded += [(n, tuple(t.shape)) for n, t in batch]
        self.hf.load_weights(batch)
        return {n for n, _ in batch}

    def apply_model(self, fn):
        return [fn(self.model)]

    def generate(self, prompts, sampling, use_tqdm=False):
        from megatron_recycle.engines.base import SamplingParams

        if not (self.weights_awake and self.kv_awake):
            raise AssertionError(f"generate while asleep (weights awake {self.weights_awake}, KV {self.kv_awake})")
        self.events.append(("generate", self.V.request_digest(prompts, sampling)))
        params = [SamplingParams(temperature=kw["temperature"], top_p=kw["top_p"], max_new_tokens=kw["max_tokens"],
                                 stop=tuple(kw["stop"] or ()), seed=kw["seed"]) for kw in sampling]
        gens = self.hf.generate([p["prompt_token_ids"] for p in prompts], params)
        out = []
        for g in gens:
            reason = "length" if g.finish_reason == "length" else "stop"
            stop_reason = g.stop_str if g.finish_reason == "stop" else None
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(g.token_ids), finish_reason=reason,
                                                                stop_reason=stop_reason, logprobs=None)]))
        return out

    def sleep(self, level=1):
        self.events.append(("sleep", level))
        self.weights_awake = self.kv_awake = False
        if level == 2:  # discarded: whatever is read before the next sync is garbage
            with torch.no_grad():
                for p in self.hf.model.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags=None):
        tags = list(tags) if tags else ["weights", "kv_cache"]
        self.events.append(("wake", tuple(tags)))
        if "weights" in tags:
            self.weights_awake = True
        if "kv_cache" in tags:
            self.kv_awake = True

    def reset_prefix_cache(self):
        return True


def install_fake_vllm(sleep_level: int = 1) -> dict[str, Any]:
    """Make ``runtime.build_engine``'s vllm branch build a real VLLMEngine over HFBackedLLM;
    returns a dict that receives the constructor's keyword arguments and the fake LLM."""
    from megatron_recycle.engines import vllm as V
    from megatron_recycle.engines.hf import HFEngine
    from megatron_recycle.model.hf_loading import load_hf_model

    seen: dict[str, Any] = {}
    real = V.VLLMEngine

    def factory(model_path, tokenizer, **kw):
        seen["kwargs"] = {k: v for k, v in kw.items() if k != "request_group"}
        group = kw.get("request_group")
        seen["group_ranks"] = None if group is None else torch.distributed.get_process_group_ranks(group)
        llm = HFBackedLLM(HFEngine(load_hf_model(model_path), tokenizer, device="cpu", max_batch_size=64), V)
        seen["llm"] = llm
        return real.from_llm(llm, dict, tokenizer, sleep_level=sleep_level, max_model_len=kw.get("max_model_len"),
                             request_group=group)

    V.require_vllm = lambda: None
    V.VLLMEngine = factory
    return seen


def _config(args: dict, *extra: str):
    from megatron_recycle.config import load_config
    from tests.train.loop_fixtures import base_overrides

    over = base_overrides(Path(args["model"]), Path(args["data"]), Path(args["out"]), Path(args["cache"]),
                          args.get("name", "colocated"))
    cfg = load_config(None, over + list(extra))  # validated with engine=hf (vLLM is not installed here)
    return cfg


def layout(args: dict) -> dict:
    """setup_runtime + one rollout_share + one weight sync for one (tp, pp, vllm_tp, engine) layout."""
    from megatron_recycle.engines.base import SamplingParams
    from megatron_recycle.pool import shard
    from megatron_recycle.train import grpo
    from megatron_recycle.train import runtime as rtm

    cfg = _config(args, f"model.tp={args['tp']}", f"model.pp={args['pp']}", f"rollout.vllm_tp={args['vllm_tp']}")
    cfg.rollout.engine = args["engine"]
    seen = install_fake_vllm()
    rt = rtm.setup_runtime(cfg, model_path=str(args["model"]), lr=1e-3, warmup_steps=0, total_steps=2)
    rt.retriever = rtm.build_retriever_from_config(cfg) if rt.is_mp_leader else None  # as run_grpo does
    examples = rtm.read_examples(rtm.data_paths(cfg)["train"], cfg)
    lay = rt.layout
    ids = torch.tensor(args["ids"], dtype=torch.long)
    mine = shard(ids, lay.dp_rank, lay.dp)
    trajs = grpo.rollout_share(rt, examples, mine, step=3, gen_batch=1)
    n_sync = rtm.sync_engine_weights(rt)
    out: dict[str, Any] = {
        "rank": lay.rank, "tp_rank": lay.tp_rank, "pp_rank": lay.pp_rank, "dp_rank": lay.dp_rank, "dp": lay.dp,
        "mine": mine.tolist(), "built": rt.engine is not None, "ctor": seen.get("kwargs"),
        "group_ranks": seen.get("group_ranks"), "n_sync": n_sync,
        "trajs": [(t.query_id, list(t.token_ids)) for t in trajs],
    }
    llm = seen.get("llm")
    if llm is not None:
        out["requests"] = [e[1] for e in llm.events if e[0] == "generate"]
        out["loaded"] = llm.loaded
        out["hf_names"] = {n: tuple(p.shape) for n, p in llm.hf.model.named_parameters()}
        if seen["group_ranks"] is not None:  # ranks of one vLLM group asking different things: refused on all
            try:
                rt.engine.generate([[1 + lay.rank]], SamplingParams(temperature=0, max_new_tokens=2))
                out["mismatch"] = None
            except RuntimeError as e:
                out["mismatch"] = str(e)
    return out


def grpo_sleep_wake(args: dict) -> dict:
    """run_grpo for a few steps with the vllm engine path over HFBackedLLM; the LLM's call record."""
    from megatron_recycle.train import grpo
    from megatron_recycle.train import step as step_mod

    cfg = _config(args, "train.steps=2", "pool.oversample=2", "run.save_every=0")
    cfg.rollout.engine = "vllm"
    seen = install_fake_vllm(sleep_level=args["sleep_level"])
    real_step = step_mod.grpo_train_step

    def recorded_step(*a, **kw):
        seen["llm"].events.append(("train",))
        return real_step(*a, **kw)

    step_mod.grpo_train_step = recorded_step
    summary = grpo.run_grpo(cfg)
    llm = seen["llm"]
    events = []
    for e in llm.events:
        events.append(e[0] if e[0] in ("generate", "train") else f"{e[0]}:{e[1]}")
    loads = sum(1 for _ in llm.loaded)
    return {"events": events, "steps": summary["steps"], "loaded": loads,
            "finite": all(bool(torch.isfinite(p).all()) for p in llm.hf.model.parameters())}


def sharded_eval(args: dict) -> dict:
    """pipeline.evaluate_model on every rank with the vllm engine path over HFBackedLLM: the
    requests each rank's engine saw, the LLM's sleep calls, and the result (rank 0 only)."""
    from megatron_recycle.train import pipeline

    cfg = _config(args, f"rollout.vllm_tp={args['vllm_tp']}", "eval.batch_size=1")
    cfg.rollout.engine = "vllm"
    seen = install_fake_vllm()
    out_path = Path(args["out"]) / args["name"] / "eval.json"
    res = pipeline.evaluate_model(cfg, str(args["model"]), "test", out_path, "sharded")
    llm = seen["llm"]
    predictions = out_path.with_name("eval.predictions.jsonl")
    return {"rank": torch.distributed.get_rank(), "result": res,
            "requests": [e[1] for e in llm.events if e[0] == "generate"],
            "slept": [e for e in llm.events if e[0] == "sleep"], "group_ranks": seen["group_ranks"],
            "predictions": predictions.read_text() if res is not None else None}


if __name__ == "__main__":
    fn, outdir, raw = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    result = globals()[fn](json.loads(raw))
    torch.save(result, Path(outdir) / f"rank{os.environ.get('RANK', '0')}.pt")
