"""The `megatron-recycle` command: one subcommand per job, all driven by one config tree.

    megatron-recycle <command> [--config RECIPE.yaml] [section.key=value ...]

Every command loads the recipe, applies the dotted overrides, validates the result before any
heavy work, and prints the resolved config.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_recycle.config import Config, ConfigError, load_config

# Exceptions whose message says what is wrong and what to do: printed without a traceback.
USER_ERRORS = {
    "CheckpointError", "QAFormatError", "SFTDataError", "AnalyzeError", "TrainingDiverged", "PoolExhausted",
    "SyntheticDataError", "IncompleteModelError", "EvalOutputError", "FileNotFoundError", "FileExistsError", "NotADirectoryError", "IsADirectoryError", "PermissionError",
}

EPILOG = (
    "Overrides are dotted keys, e.g. pool.batch_size=8 optim.lr=1e-6 model.tp=2 run.name=2024-12-01 "
    "(text keys take the text as it is; numbers are base 10; booleans and sections are YAML). "
    "Every key is documented in megatron_recycle/config.py; the recipes document the ones they set."
)


KEEP_MEMORY_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
HEAVY_COMMANDS = ("run", "train", "sft", "eval")


def _maybe_reexec_keep_memory(argv: list[str]) -> None:
    """Restart a heavy command with glibc told to keep freed memory (PLATFORM.md: a CPU GRPO step
    spent a third of its time in page faults without it). Must happen before Python starts, hence
    the exec. MEGATRON_RECYCLE_KEEP_MEMORY=0 turns it off; an existing GLIBC_TUNABLES is respected."""
    if (
        not argv
        or argv[0] not in HEAVY_COMMANDS
        or "-h" in argv
        or "--help" in argv
        or not sys.platform.startswith("linux")
        or "GLIBC_TUNABLES" in os.environ
        or os.environ.get("MEGATRON_RECYCLE_KEEP_MEMORY", "1") == "0"
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=KEEP_MEMORY_TUNABLES)
    # -P (Python >= 3.11): do not put the working directory on sys.path, so that a checkout's
    # folders (kernels/) never shadow installed packages.
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    os.execve(sys.executable, [sys.executable, *flags, "-m", "megatron_recycle.cli", *argv], env)


def _setup_environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(args: argparse.Namespace, quiet: bool = False) -> Config:
    cfg = load_config(args.config, args.overrides, command=args.command)
    if not quiet:
        print("# resolved config", flush=True)
        print(cfg.to_yaml(), flush=True)
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    return cfg


# `run` and `sft` stopped on request (Ctrl-C, SIGTERM) before their result exists: checkpointed,
# resumable, but not done (128 + SIGINT, as a shell reports an interrupted command). `train`
# stopped early returns 0: its checkpoint (and --save-hf folder) is its result.
STOPPED_EXIT_CODE = 130


def cmd_simulate(args: argparse.Namespace) -> int:
    from megatron_recycle.simulate import main as simulate

    simulate(args.sim_args, prog="megatron-recycle simulate")
    return 0


def cmd_gen_data(args: argparse.Namespace) -> int:
    from megatron_recycle.train.runtime import generate_data

    cfg = _load(args)
    out = generate_data(cfg)
    for name, path in out["paths"].items():
        print(f"[gen-data] {name}: {path}", flush=True)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from megatron_recycle.train.sft import run_sft

    cfg = _load(args)
    res = run_sft(cfg, resume=args.resume)  # a torchrun restart resumes too (run_sft decides)
    if res.get("stopped"):
        return STOPPED_EXIT_CODE
    if res["runtime"].is_rank0:
        print(f"[sft] done: {res['hf_dir']}", flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from megatron_recycle.train.grpo import run_grpo

    cfg = _load(args)
    for option, path in (("--init-from", args.init_from), ("model.name_or_path", cfg.model.name_or_path)):
        if path:
            _refuse_training_checkpoint(path, option)
    if args.save_hf:  # checked before the training it would otherwise fail after
        _check_save_hf(args.save_hf, {"--init-from": args.init_from, "model.name_or_path": cfg.model.name_or_path})
    summary = run_grpo(cfg, resume=args.resume, init_from=args.init_from)
    rt = summary.pop("runtime")
    if args.save_hf:
        from megatron_recycle.model.convert import save_hf_checkpoint

        save_hf_checkpoint(rt.chunks, rt.hf_config, args.save_hf, tokenizer=rt.tokenizer,
                           generation_config=rt.generation_config)
        if rt.is_rank0:
            print(f"[train] saved a Hugging Face checkpoint to {args.save_hf}", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from megatron_recycle.train.pipeline import run_pipeline

    report = run_pipeline(_load(args), resume=args.resume)
    return STOPPED_EXIT_CODE if report.get("stopped") else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_recycle.train.pipeline import eval_files, evaluate_files, resume_after_restart

    cfg = _load(args)
    files = eval_files(cfg, args.data)
    if not files:
        f = Path(cfg.data.test_file or Path(cfg.data.dir) / "test.jsonl")
        files = eval_files(cfg, [str(f)], benchmarks=False)
    model = args.checkpoint or cfg.model.name_or_path
    _refuse_training_checkpoint(model, "--checkpoint")
    resume = resume_after_restart(cfg, args.resume, "eval", "results already written are reused")
    evaluate_files(cfg, model, files, Path(args.out or cfg.run_dir / "eval"), resume=resume)
    return 0


def _check_save_hf(path: str, sources: dict[str, str | None]) -> None:
    """``train --save-hf DIR``: refused up front where writing it after training would be refused (a
    file, a non-empty folder without config.json), or would replace the model training starts from."""
    from pathlib import Path

    from megatron_recycle.model.convert import hf_output_refusal

    if why := hf_output_refusal(path):
        raise FileExistsError(f"--save-hf: {why}")
    target = Path(path).resolve()  # the path as it will be written (a quoted ~ is not the home folder)
    for option, source in sources.items():
        if source and Path(source).exists() and Path(source).resolve() == target:
            raise FileExistsError(f"--save-hf {path} is the {option} folder training starts from; writing the "
                                  "trained model there would replace it: choose another folder")


def _refuse_training_checkpoint(path: str, option: str) -> None:
    """A training checkpoint folder (RUN/checkpoints/step_N) where a Hugging Face folder is expected:
    say how to export it instead of failing inside transformers."""
    from pathlib import Path

    p = Path(path)
    if (p / "manifest.json").is_file() and p.parent.name == "checkpoints" and p.name.startswith("step_"):
        from megatron_recycle.train.checkpoint import CheckpointError

        raise CheckpointError(
            f"{option} {path} is a training checkpoint, not a Hugging Face folder; export it first: "
            f"megatron-recycle export {p.parent.parent} --step {p.name.split('_', 1)[1]} --out DIR"
        )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def cmd_serve_retriever(args: argparse.Namespace) -> int:
    from megatron_recycle.agent.server import serve

    cfg = _load(args)
    r = cfg.retriever
    if r.kind == "http":
        raise ConfigError("retriever.kind=http: serve-retriever serves a local index; use bm25 or dense")
    # the server's limits are the ones the same config's HTTP client keeps to (retriever.max_batch,
    # retriever.max_query_chars), so that a client and its server never disagree
    serve(host=args.host, port=args.port, retriever_kind=r.kind,
          corpus="wiki" if r.corpus == "wiki-offline" else r.corpus, cache_dir=r.cache_dir,
          model=None if r.dense_model == "minilm" else r.dense_model, default_topk=r.topk,
          max_topk=max(100, r.topk), max_queries=r.max_batch, max_query_chars=r.max_query_chars)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from megatron_recycle.train.reshard import export_checkpoint

    info = export_checkpoint(args.run_dir, args.out, step=args.step, main_weights=args.main_weights)
    print(f"[export] checkpoint step {info['step']} ({info['ranks']} rank files, {info['weights']}): "
          f"{info['tensors']} tensors -> {info['out']}", flush=True)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from megatron_recycle.analyze import main as analyze_main

    argv = [args.run_dir] + (["--every", str(args.every)] if args.every is not None else [])
    return analyze_main(argv + (["--no-plots"] if args.no_plots else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-recycle",
        description="GRPO with query recycling for LLM search agents on megatron-core.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_text: str, handler, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG if config else None)
        if config:
            p.add_argument("--config", "-c", default=None, help="recipe YAML (default: built-in defaults)")
            p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
        p.set_defaults(handler=handler)
        return p

    add("gen-data", "Generate the synthetic multi-hop QA data and oracle SFT trajectories.", cmd_gen_data)
    p = add("sft", "Supervised warm-up on the oracle trajectories (masked next-token loss).", cmd_sft)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete SFT checkpoint "
                   "(RUN_DIR/sft/checkpoints, written every sft.save_every steps)")
    p = add("train", "GRPO training with query recycling (or a baseline strategy).", cmd_train)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint "
                   "(on this run's layout: a checkpoint of other TP/PP/DP sizes is resharded)")
    p.add_argument("--init-from", default=None, help="start from this HF folder instead of model.name_or_path")
    p.add_argument("--save-hf", default=None, metavar="DIR", help="also export the final policy as a HF folder")
    p = add("run", "The whole recipe: data, eval before, SFT warm-up, GRPO, eval after, plots, report.", cmd_run)
    p.add_argument("--resume", action="store_true", help="reuse finished phases and resume GRPO from its checkpoint")
    p = add("eval", "Pass@1 on a dataset file (FlashRAG jsonl or Search-R1 parquet) or the seven benchmarks.",
            cmd_eval)
    p.add_argument("--data", action="append", default=[], help="dataset file (repeatable); eval.data_dir adds the benchmarks")
    p.add_argument("--checkpoint", default=None, help="model to evaluate (default: model.name_or_path)")
    p.add_argument("--out", default=None, help="folder for the JSON results (default: RUN_DIR/eval): one per "
                   "file, and summary.json with each file's Pass@1/F1 and their average")
    p.add_argument("--resume", action="store_true", help="reuse a file's result already in --out when it is of "
                   "the same model weights, data file, question count, evaluation settings and retriever "
                   "(an interrupted evaluation goes on)")
    p = add("serve-retriever", "Serve a retriever over HTTP with the Search-R1 /retrieve contract.",
            cmd_serve_retriever)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free one; default 8000)")
    p = add("export", "Write a training checkpoint's policy as a Hugging Face folder (one process, any "
            "layout the checkpoint was saved on).", cmd_export, config=False)
    p.add_argument("run_dir", help="a run directory (runs/NAME) with checkpoints/")
    p.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face folder to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--main-weights", action="store_true", help="write the optimizer's fp32 main weights "
                   "instead of the model's own (bf16 in a bf16 run)")
    p = add("analyze", "Plots and tables of a run's recycling dynamics from its metrics.jsonl.", cmd_analyze,
            config=False)
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--every", type=int, default=None, metavar="N",
                   help="print every Nth step and the last (default: every step up to 50, else about 40 rows)")
    p.add_argument("--no-plots", action="store_true", help="only print the table")
    p = add("simulate", "Pool simulator: every strategy against a synthetic learner (not real training).",
            cmd_simulate, config=False)
    p.add_argument("sim_args", nargs="*", help="options of the simulator (`megatron-recycle simulate --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    _setup_environment()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if from_command_line:
        _maybe_reexec_keep_memory(argv)
    if argv[:1] == ["simulate"]:  # every option after it belongs to megatron_recycle/simulate.py
        return _run_handler(cmd_simulate, argparse.Namespace(sim_args=argv[1:]))
    # key=value overrides may come before, between or after the options (`eval nq.x=1 --resume y=2`):
    # argparse takes the first run of them as the positional and leaves the later ones over
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):
        args.overrides += late
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return _run_handler(args.handler, args)


def _run_handler(handler, args: argparse.Namespace) -> int:
    try:
        return int(handler(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors meant for the user get one clear line, not a traceback
        if type(e).__name__ in USER_ERRORS:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return 2
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA); torch not imported here
            print(OOM_HINT, file=sys.stderr)  # the traceback follows: where it ran out matters
        raise


OOM_HINT = (
    "out of device memory. Checkpoints already written are intact (RUN_DIR/checkpoints); `--resume` "
    "continues from the newest with any of these changed (none is a resume key): model.recompute=full "
    "(or selective), model.sequence_parallel=true (with model.tp > 1), a smaller optim.micro_batch_size, "
    "a smaller rollout.vllm_gpu_memory_utilization with rollout.engine=vllm. A larger model.tp or model.pp "
    "also fits (the checkpoint is resharded)."
)


if __name__ == "__main__":
    sys.exit(main())
