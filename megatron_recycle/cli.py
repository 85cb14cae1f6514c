"""The `megatron-recycle` command: one subcommand per job, all driven by one config tree.

    megatron-recycle <command> [--config RECIPE.yaml] [section.key=value ...]

Every command loads the recipe, applies the dotted overrides, validates the result before any
heavy work, and prints the resolved config.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from megatron_recycle.config import Config, ConfigError, load_config

EPILOG = (
    "Overrides are dotted keys with YAML values, e.g. pool.batch_size=8 optim.lr=1e-6 "
    "model.tp=2. Every key is documented in megatron_recycle/config.py and in the recipes."
)


def _setup_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(args: argparse.Namespace, quiet: bool = False) -> Config:
    cfg = load_config(args.config, args.overrides)
    if not quiet:
        print("# resolved config", flush=True)
        print(cfg.to_yaml(), flush=True)
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    return cfg


class NotBuiltYet(RuntimeError):
    pass


def _not_built(what: str, provider: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        _load(args, quiet=True)
        print(f"megatron-recycle {what}: not built yet; {provider} provides it.", file=sys.stderr)
        return 2

    return run


def cmd_simulate(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "simulate_pool.py"
    spec = importlib.util.spec_from_file_location("simulate_pool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args.sim_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-recycle",
        description="GRPO with query recycling for LLM search agents on megatron-core.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, handler, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        if config:
            p.add_argument("--config", "-c", default=None, help="recipe YAML (default: built-in defaults)")
            p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        p.set_defaults(handler=handler)
        return p

    add("gen-data", "Generate the synthetic multi-hop QA data and oracle SFT trajectories.",
        _not_built("gen-data", "the search-agent issue (#5: megatron_recycle/data/synthetic.py)"))
    add("sft", "Supervised warm-up on the oracle trajectories (masked next-token loss).",
        _not_built("sft", "the end-to-end trainer issue (#6)"))
    p = add("train", "GRPO training with query recycling (or a baseline strategy).",
            _not_built("train", "the end-to-end trainer issue (#6)"))
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p = add("eval", "Pass@1 on a dataset file (FlashRAG jsonl or Search-R1 parquet) or the seven benchmarks.",
            _not_built("eval", "the search-agent issue (#5: megatron_recycle/evaluate.py)"))
    p.add_argument("--data", action="append", default=[], help="dataset file (repeatable)")
    p.add_argument("--checkpoint", default=None, help="model to evaluate (default: model.name_or_path)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p = add("serve-retriever", "Serve a retriever over HTTP with the Search-R1 /retrieve contract.",
            _not_built("serve-retriever", "the search-agent issue (#5: megatron_recycle/agent/server.py)"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p = add("analyze", "Plots and tables of a run's recycling dynamics from its metrics.jsonl.",
            _not_built("analyze", "the end-to-end trainer issue (#6)"), config=False)
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p = add("simulate", "Pool simulator: every strategy against a synthetic learner (not real training).",
            cmd_simulate, config=False)
    p.add_argument("sim_args", nargs="*", help="options of tools/simulate_pool.py (`megatron-recycle simulate --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_environment()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["simulate"]:  # every option after it belongs to tools/simulate_pool.py
        return cmd_simulate(argparse.Namespace(sim_args=argv[1:]))
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
