"""A tiny random Llama with SmolLM2's tokenizer, a small QA data set, and a test reward.

Shared by the trainer tests, which run the real loop in subprocesses (the CPU compatibility
patches of megatron-core are process-wide, so they stay out of the pytest process).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FACTS = [
    ("Who wrote Hamlet?", ["William Shakespeare"]),
    ("What is the capital of France?", ["Paris"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci"]),
    ("In which year was Albert Einstein born?", ["1879"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("Who composed the Ninth Symphony?", ["Ludwig van Beethoven", "Beethoven"]),
    ("On which continent is Kenya?", ["Africa"]),
    ("What is the capital of Italy?", ["Rome"]),
]


def coin(response: str, golds: list[str], truncated: bool) -> float:
    """A deterministic 0/1 reward from the response text: makes random-model groups signal-bearing."""
    return float(int(hashlib.sha1(response.encode()).hexdigest(), 16) % 2)


def coin_crash_once(response: str, golds: list[str], truncated: bool) -> float:
    """``coin``, but one process dies (``os._exit``: no clean-up, like a segfault) the first time it
    scores a rollout after the checkpoint file CRASH_AFTER exists: global rank CRASH_RANK, or with
    CRASH_NODE set the process of the node whose NODE_NAME it names, which first kills its parent,
    the node's torchrun agent (SIGKILL: a lost node). CRASH_SENTINEL records that the crash
    happened, so it happens once."""
    sentinel = Path(os.environ["CRASH_SENTINEL"])
    node = os.environ.get("CRASH_NODE")
    here = os.environ.get("NODE_NAME") == node if node else os.environ.get("RANK", "0") == os.environ["CRASH_RANK"]
    if here and not sentinel.exists() and Path(os.environ["CRASH_AFTER"]).is_file():
        sentinel.write_text(f"crashed with TORCHELASTIC_RESTART_COUNT={os.environ.get('TORCHELASTIC_RESTART_COUNT')}\n")
        if node:
            os.kill(os.getppid(), 9)
        os._exit(17)
    return coin(response, golds, truncated)


def write_tiny_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_recycle.model.hf_loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_data(folder: Path, n_train: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(n):
            q, a = FACTS[(i + offset) % len(FACTS)]
            out.append({"id": f"q{offset + i}", "question": f"{q} (variant {offset + i})", "golden_answers": a,
                        "metadata": {"template": "fixture", "source": "synthetic"}})
        return out

    for name, n, off in (("train", n_train, 0), ("dev", 4, 100), ("test", 4, 200)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, off)))
    sft = []
    for r in rows(4, 0):
        sft.append({"id": r["id"], "question": r["question"], "golden_answers": r["golden_answers"], "turns": [
            {"generated": f"<think>I need to look this up.</think>\n<search> {r['question']} </search>",
             "information": "\n\n<information>Doc 1 (Title: X) some text</information>\n\n"},
            {"generated": f"<think>Found it.</think>\n<answer> {r['golden_answers'][0]} </answer>"},
        ]})
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return folder


def base_overrides(model_dir: Path, data_dir: Path, out_dir: Path, cache_dir: Path, name: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", f"data.dir={data_dir}", "data.generate_if_missing=false",
        f"run.output_dir={out_dir}", f"run.name={name}", "run.save_every=1", "run.threads=1",
        f"retriever.cache_dir={cache_dir}", "rollout.max_new_tokens=12", "rollout.max_total_tokens=400",
        "rollout.max_turns=1", "rollout.group_size=4", "rollout.reward=tests.train.loop_fixtures:coin",
        "pool.batch_size=2", "optim.micro_batch_size=2", "optim.lr=1e-3", "train.steps=2",
    ]
