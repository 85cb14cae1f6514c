"""The typed config tree, recipe loading with overrides, validation messages, and the CLI skeleton."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_recycle.cli import build_parser, main
from megatron_recycle.config import Config, ConfigError, check_against_data, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pool:\n  batch_size: 8\n  strategy: grpo\n  oversample: 1\noptim:\n  lr: 1\n")
    cfg = load_config(recipe, ["pool.batch_size=16", "loss.clip_c=3", "model.vpp=null", "optim.min_lr=1e-7"])
    assert cfg.optim.min_lr == 1e-7  # YAML 1.1 reads 1e-7 as a string; a float field accepts it
    assert isinstance(cfg, Config)
    assert cfg.pool.batch_size == 16 and cfg.pool.strategy == "grpo"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for a float
    assert cfg.loss.clip_c == 3.0 and cfg.model.vpp is None
    assert "batch_size: 16" in cfg.to_yaml()


@pytest.mark.parametrize(
    "override,match",
    [
        ("pool.oversample=0", r"pool.oversample=0: k must be >= 1"),
        ("pool.batchsize=3", r"unknown config key 'pool.batchsize'; did you mean pool.batch_size"),
        ("nosection.x=1", r"unknown config key 'nosection'"),
        ("pool.batch_size=two", r"pool.batch_size: expected an integer, got 'two'"),
        ("pool.batch_size=2.5", r"expected an integer"),
        ("sft.enabled=3", r"sft.enabled: expected true/false"),
        ("pool.strategy=magic", r"pool.strategy: 'magic' is not one of"),
        ("loss.clip_c=0.5", r"loss.clip_c=0.5: the dual clip constant must be > 1"),
        ("loss.agg=seq-mean-token-sum-norm", r"loss.max_len"),
        ("rollout.max_total_tokens=10", r"must exceed rollout.max_new_tokens"),
        ("eval.n_samples=4", r"need a temperature > 0"),
        ("model.vpp=2", r"virtual pipeline stages need model.pp > 1"),
        ("pool.strategy=dapo", r"set pool.oversample=1"),
        ("pool", r"must look like section.key=value"),
        ("rollout.vllm_kv_cache_gib=-1", r"rollout.vllm_kv_cache_gib=-1.0: must be >= 0"),
        ("rollout.vllm_sleep=maybe", r"rollout.vllm_sleep: expected true/false"),
        ("model.recompute=some", r"model.recompute: 'some' is not one of"),
        ("model.recompute_method=every", r"model.recompute_method: 'every' is not one of"),
        ("model.recompute_num_layers=0", r"model.recompute_num_layers=0: must be >= 1"),
        ("model.sequence_parallel=true", r"model.sequence_parallel=True: .* needs model.tp > 1"),
        ("optim.ddp_bucket_size=0", r"optim.ddp_bucket_size=0: must be >= 1"),
        ("optim.ddp_bucket_size=1000", r"optim.ddp_bucket_size=1000: only applies with optim.overlap_grad_reduce"),
        ("optim.ddp_bucket_size=4e7", r"optim.ddp_bucket_size: expected an integer"),
        ("retriever.max_split_requests=-1", r"retriever.max_split_requests=-1: must be >= 0"),
        # found late before: after the model was loaded, after rollouts, or never
        ("sft.warmup_steps=-5", r"sft.warmup_steps=-5: must be >= 0"),
        ("optim.adam_beta1=1.5", r"optim.adam_beta1=1.5: must be in \[0, 1\)"),
        ("optim.adam_beta2=1", r"optim.adam_beta2=1.0: must be in \[0, 1\)"),
        ("sft.max_examples=-1", r"sft.max_examples=-1: must be >= 0"),
        ("eval.max_examples=-3", r"eval.max_examples=-3: must be >= 0"),
        ("rollout.group_size=1", r"rollout.group_size=1: K must be >= 2"),
        ("rollout.temperature=0", r"rollout.temperature=0.0: must be > 0: greedy rollouts"),
        ("rollout.reward=no_such_pkg.mod:fn", r"rollout.reward='no_such_pkg.mod:fn': cannot load the custom reward"),
        ("run.name=..", r"run.name='..': must be a folder name"),
        ("run.name=.", r"run.name='.': must be a folder name"),
        ("run.collective_timeout_min=.inf", r"run.collective_timeout_min: expected a finite number, got inf"),
        ("optim.lr=.nan", r"optim.lr: expected a finite number"),
        ("rollout.vllm_kv_cache_gib=inf", r"rollout.vllm_kv_cache_gib: expected a finite number, got 'inf'"),
    ],
)
def test_invalid_values_name_key_and_value(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_http_url_and_transformer_engine_are_checked_at_validation():
    with pytest.raises(ConfigError, match=r"optim.min_lr=5e-05: SFT decays to it too, so it must be <= sft.lr=2e-05"):
        load_config(None, ["optim.lr=1e-4", "optim.min_lr=5e-5"])
    with pytest.raises(ConfigError, match=r"retriever.url='notaurl': must start with http://"):
        load_config(None, ["retriever.kind=http", "retriever.url=notaurl"])
    load_config(None, ["retriever.url=notaurl"])  # not used by bm25
    from megatron_recycle.model.build import te_available

    if te_available():
        pytest.skip("transformer-engine is usable here")
    with pytest.raises(ConfigError, match=r"model.layer_spec='te': needs transformer-engine"):
        load_config(None, ["model.layer_spec=te"])


def test_environment_checks_can_be_skipped_for_a_saved_run(tmp_path):
    # a run trained with vLLM (or a custom reward) is read back, for `export`, where neither exists
    saved = tmp_path / "config.yaml"
    saved.write_text(load_config(None, []).to_yaml().replace("engine: auto", "engine: vllm")
                     .replace("reward: em", "reward: gone_pkg.rewards:fn"))
    cfg = load_config(saved, check_environment=False)
    assert cfg.rollout.engine == "vllm" and cfg.rollout.reward == "gone_pkg.rewards:fn"
    with pytest.raises(ConfigError, match="rollout.reward|vLLM is not installed"):
        load_config(saved)


def test_overlapped_grad_reduction_options():
    cfg = load_config(None, ["optim.overlap_grad_reduce=true", "optim.ddp_bucket_size=20000000"])
    assert cfg.optim.overlap_grad_reduce and cfg.optim.ddp_bucket_size == 20_000_000
    assert load_config(None, ["optim.overlap_grad_reduce=true"]).optim.ddp_bucket_size is None  # Megatron's


def test_vllm_engine_without_vllm_fails_at_validation():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(ConfigError, match=r"rollout.engine='vllm': vLLM is not installed.*pip install"):
        load_config(None, ["rollout.engine=vllm"])


def test_memory_options_against_the_model():
    """model.recompute* and model.sequence_parallel: the TransformerConfig fields they set, and the
    layer counts checked against the model's (virtual) pipeline stages before any process group."""
    from types import SimpleNamespace

    from megatron_recycle.model.build import memory_options
    from megatron_recycle.train.runtime import check_model_options, model_options

    assert memory_options() == {"sequence_parallel": False}
    assert memory_options("selective", sequence_parallel=True) == {
        "sequence_parallel": True, "recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    assert memory_options("full", "block", 3) == {
        "sequence_parallel": False, "recompute_granularity": "full", "recompute_method": "block",
        "recompute_num_layers": 3}
    with pytest.raises(ValueError, match="recompute='all'"):
        memory_options("all")
    hf = SimpleNamespace(num_hidden_layers=12)
    ok = load_config(None, ["model.recompute=full", "model.recompute_num_layers=3", "model.pp=2"])
    assert model_options(ok.model)["recompute_num_layers"] == 3
    check_model_options(ok.model, hf)  # 6 layers per stage, units of 3
    cases = [
        (["model.recompute_num_layers=4", "model.pp=2"], r"recompute_method=uniform needs recompute_num_layers=4 "
                                                         r"to divide the 6 layers"),
        (["model.recompute_num_layers=4", "model.pp=2", "model.vpp=2"], r"recompute_num_layers=4 exceeds the 3 layers of each"),
        (["model.recompute_num_layers=7", "model.pp=2", "model.recompute_method=block"], r"recompute_num_layers=7 exceeds the 6 layers"),
    ]
    for overrides, match in cases:
        cfg = load_config(None, ["model.recompute=full", *overrides])
        with pytest.raises(ConfigError, match=r"model.recompute=full .*: " + match):
            check_model_options(cfg.model, hf)
    block = load_config(None, ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=5"])
    check_model_options(block.model, hf)  # block: any count up to the stage's layers
    check_model_options(load_config(None, ["model.recompute_num_layers=5"]).model, hf)  # ignored without full


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    bad.write_text("pool: 3\n")
    with pytest.raises(ConfigError, match="pool: expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad.write_bytes(b"pool:\n  strategy: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(bad)
    # a key given twice: PyYAML would keep the last one, silently turning a baseline into recycling
    bad.write_text("pool:\n  strategy: grpo\n  oversample: 1\noptim:\n  lr: 1e-6\npool:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"key 'pool' appears twice in one mapping \(lines 1 and 6\)"):
        load_config(bad)
    bad.write_text("optim:\n  lr: 1e-6\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        load_config(bad)


def test_empty_sections_and_section_overrides_merge(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pool:\n  strategy: grpo\n  oversample: 1\n  batch_size: 8\nsft:\n  # enabled: false\n")
    cfg = load_config(recipe)
    assert cfg.sft.enabled is True  # a section with every key commented out: the defaults
    # a mapping override merges into the section instead of replacing the recipe's keys
    cfg = load_config(recipe, ["pool={batch_size: 16}", "sft.enabled=false"])
    assert (cfg.pool.strategy, cfg.pool.oversample, cfg.pool.batch_size) == ("grpo", 1, 16)
    assert cfg.sft.enabled is False
    with pytest.raises(ConfigError, match="unknown config key 'pool.batchsize'"):
        load_config(recipe, ["pool={batchsize: 16}"])


def test_every_recipe_launch_line_names_its_own_file():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        launches = re.findall(r"^# Launch: .*?(recipes/\S+\.yaml)", recipe.read_text(), flags=re.M)
        assert launches in ([], [f"recipes/{recipe.name}"]), recipe.name


def test_serve_retriever_port_must_be_a_port(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve-retriever", "--port", "99999"])
    assert e.value.code == 2 and "port 99999 is outside 0-65535" in capsys.readouterr().err

def test_checks_against_data():
    cfg = load_config(None, ["pool.batch_size=8", "pool.oversample=2"])
    check_against_data(cfg, 16)
    with pytest.raises(ConfigError, match="only 15 queries"):
        check_against_data(cfg, 15)


def test_every_recipe_in_the_repository_validates():
    import importlib.util

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    have_vllm = importlib.util.find_spec("vllm") is not None
    for recipe in recipes:
        if "engine: vllm" in recipe.read_text() and not have_vllm:
            with pytest.raises(ConfigError, match="vLLM is not installed"):
                load_config(recipe)
            load_config(recipe, ["rollout.engine=hf"])  # everything else in a GPU recipe is valid
        else:
            load_config(recipe)


def test_cli_help_for_every_subcommand(capsys):
    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert {"gen-data", "sft", "train", "eval", "serve-retriever", "analyze", "simulate"} <= set(names)
    for name in names:
        if name == "simulate":
            continue
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: megatron-recycle" in capsys.readouterr().out


def test_cli_reports_config_errors(capsys):
    assert main(["train", "pool.oversample=0"]) == 2
    assert "pool.oversample=0" in capsys.readouterr().err


def test_cli_overrides_before_between_and_after_options(monkeypatch, capsys):
    """`eval a=1 --resume b=2`: argparse alone refuses the overrides after an option; every one of
    them reaches the config, in order (the last of a key wins), and real strays are still refused."""
    from megatron_recycle import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.update(resume=args.resume, over=args.overrides) or 0)
    parser = build_parser()  # the handler is bound when the parser is built
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["eval"].set_defaults(handler=cli.cmd_eval)
    assert main(["eval", "eval.batch_size=2", "--resume", "rollout.max_turns=1", "eval.batch_size=3"]) == 0
    assert seen == {"resume": True, "over": ["eval.batch_size=2", "rollout.max_turns=1", "eval.batch_size=3"]}
    with pytest.raises(SystemExit) as e:
        main(["eval", "eval.batch_size=2", "--resume", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--resume", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_simulator_runs_every_strategy_small():
    from megatron_recycle import simulate as sim

    out = sim.main(["--queries", "300", "--batch-size", "8", "--budget", "3000", "--oversample", "1", "2"])
    rows = {(r["strategy"], r["oversample"]): r for r in out["results"]}
    assert set(rows) == {("recycle", 1), ("recycle", 2), ("soft_recycle", 1), ("soft_recycle", 2),
                         ("bounded_dapo", 1), ("bounded_dapo", 2), ("grpo", 1), ("dapo", 1)}
    for r in rows.values():
        assert r["rollouts"] >= 3000
        assert 0 <= r["final_fill"] <= 1 and 0 <= r["final_recycled_share"] <= 1
        assert r["final_recovery_share"] + r["final_drift_share"] == pytest.approx(r["final_recycled_share"])
    # grpo never recycles within an epoch, and dapo fills its batch more than grpo does.
    assert rows[("dapo", 1)]["final_fill"] >= rows[("grpo", 1)]["final_fill"]
    # with k = 2 recycling draws twice the candidates per step, so it takes half the steps
    assert rows[("recycle", 2)]["steps"] * 2 == pytest.approx(rows[("recycle", 1)]["steps"], abs=2)


def test_cli_out_of_memory_names_the_memory_options(monkeypatch, capsys):
    """A CUDA out-of-memory error keeps its traceback and is preceded by what to change on resume;
    every config key it names exists, and none is a resume key."""
    import re

    import torch

    import megatron_recycle.cli as cli
    from megatron_recycle.train.checkpoint import RESUME_KEYS

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_train", oom)
    with pytest.raises(torch.OutOfMemoryError):
        cli.main(["train"])
    err = capsys.readouterr().err
    assert "out of device memory" in err and "--resume" in err
    named = set(re.findall(r"\b(model|optim|rollout)\.([a-z_]+)", err))
    assert {("model", "recompute"), ("model", "sequence_parallel"), ("optim", "micro_batch_size")} <= named
    for section, key in named:
        assert hasattr(getattr(Config(), section), key), f"{section}.{key}"
    changeable = {f"{s}.{k}" for s, k in named} - {"model.tp", "model.pp"}  # these reshard instead
    assert not changeable & set(RESUME_KEYS)


def test_http_retriever_options_reach_the_client():
    from megatron_recycle.train.runtime import build_retriever_from_config

    cfg = load_config(None, ["retriever.kind=http", "retriever.url=http://127.0.0.1:9", "retriever.timeout_s=2.5",
                             "retriever.retries=1", "retriever.max_batch=7", "retriever.max_query_chars=99",
                             "retriever.max_split_requests=5"])
    client = build_retriever_from_config(cfg)
    try:
        got = (client.url, client.timeout, client.max_retries, client.max_batch, client.max_query_chars,
               client.max_split_requests)
    finally:
        client.close()
    assert got == ("http://127.0.0.1:9/retrieve", 2.5, 1, 7, 99, 5)


def test_simulator_refuses_bad_arguments_and_reports_nothing_trained(tmp_path, capsys):
    from megatron_recycle import simulate as sim

    for bad, match in ((["--group-size", "0"], "--group-size must be >= 1"), (["--budget", "0"], "--budget must be >= 1"),
                       (["--oversample", "0"], "--oversample values must be >= 1"),
                       (["--queries", "50", "--batch-size", "32"], r"k\*B = 2\*32 candidates .* only 50 queries")):
        with pytest.raises(SystemExit):
            sim.main(["--queries", "300", "--batch-size", "8", "--budget", "100", *bad])
        assert re.search(match, capsys.readouterr().err), bad
    # K = 1: every group has zero variance, nothing is ever trained: roll/grp is undefined, not a count
    out = sim.main(["--queries", "200", "--batch-size", "8", "--budget", "400", "--group-size", "1",
                    "--strategies", "recycle", "--oversample", "1", "--out", str(tmp_path / "sim.json")])
    (r,) = out["results"]
    assert r["trained_groups"] == 0 and r["rollouts"] >= 400 and math.isinf(r["rollouts_per_effective_group"])
    saved = json.loads((tmp_path / "sim.json").read_text())["results"][0]
    assert saved["rollouts_per_effective_group"] is None and saved["rollouts"] == r["rollouts"]
    # shares of nothing trained are undefined: NaN in the result, null in the file (timeline too)
    assert math.isnan(r["final_recycled_share"]) and saved["final_recycled_share"] is None
    assert all(t["recycled_share"] is None for t in saved["timeline"])
    assert "inf" in capsys.readouterr().out


def test_simulate_command_runs_from_the_installed_package(tmp_path):
    # the simulator is part of the package: `megatron-recycle simulate` needs no checkout's tools/
    code = ("import sys; sys.path.remove(sys.path[0]) if sys.path[0] == '' else None; "
            "from megatron_recycle.cli import main; "
            "sys.exit(main(['simulate', '--queries', '64', '--batch-size', '4', '--budget', '64', "
            "'--strategies', 'grpo']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "grpo" in proc.stdout and "synthetic learner" in proc.stdout


def test_serve_retriever_serves_with_the_clients_limits(monkeypatch):
    import megatron_recycle.agent.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda **kw: seen.update(kw))
    assert main(["serve-retriever", "retriever.max_batch=2048", "retriever.max_query_chars=8000",
                 "retriever.topk=150", "--port", "8123"]) == 0
    assert (seen["max_queries"], seen["max_query_chars"], seen["default_topk"], seen["max_topk"]) == (2048, 8000, 150, 150)
    assert seen["port"] == 8123 and seen["retriever_kind"] == "bm25"


def test_overrides_are_read_by_the_type_of_their_key(monkeypatch):
    """Text keys take the text as it is (dates, numbers, 'no', ' #' were refused or cut at the '#');
    integers are base 10 (YAML 1.1 read 010 as octal 8 and 1:30 as base-60 90); ~ is the home folder."""
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = load_config(None, ["run.name=2024-12-01", "data.dir=/data/set #2", "model.name_or_path=1.5",
                             "retriever.corpus=no", "train.steps=010", "run.seed=007", "optim.lr=2",
                             "run.output_dir=~/runs", "eval.data_dir=~", "sft.enabled=false"],
                      check_environment=False)
    assert (cfg.run.name, cfg.data.dir, cfg.model.name_or_path, cfg.retriever.corpus) == (
        "2024-12-01", "/data/set #2", "1.5", "no")
    assert (cfg.train.steps, cfg.run.seed, cfg.optim.lr, cfg.sft.enabled) == (10, 7, 2.0, False)
    assert (cfg.run.output_dir, cfg.eval.data_dir) == ("/home/someone/runs", "/home/someone")
    # quotes around a text value are removed, as in YAML; inner quotes stay
    cfg = load_config(None, ["run.name='exp 3'", "data.dir=\"it's\"", "run.name= spaced "], check_environment=False)
    assert (cfg.run.name, cfg.data.dir) == ("spaced", "it's")
    for bad, match in (("run.seed=1:30", "expected an integer, got '1:30'"),
                       ("optim.lr=1:30", "expected a number, got '1:30'"),
                       ("train.steps=ten", "train.steps: expected an integer")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad], check_environment=False)
    # the recipe's own paths too
    cfg = load_config(None, ["model.cache_dir=~/.cache/m"], check_environment=False)
    assert cfg.model.cache_dir == "/home/someone/.cache/m" and cfg.model.name_or_path == "smollm2-135m"


def test_a_section_cannot_be_set_to_a_value(tmp_path):
    """`retriever=null` threw away the recipe's whole section (every key back to its default)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("retriever:\n  topk: 2\n")
    for bad in ("retriever=null", "retriever=3", "pool=grpo"):
        with pytest.raises(ConfigError, match="is a section; set its keys"):
            load_config(recipe, [bad], check_environment=False)
    assert load_config(recipe, ["retriever={kind: bm25}"], check_environment=False).retriever.topk == 2


def test_yaml_merge_keys_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pool: &p\n  batch_size: 8\n  <<: {oversample: 3}\noptim:\n  lr: 1e-6\n")
    cfg = load_config(recipe, check_environment=False)
    assert (cfg.pool.batch_size, cfg.pool.oversample) == (8, 3)
    recipe.write_text("pool:\n  <<: {oversample: 3}\n  batch_size: 8\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match="key 'batch_size' appears twice"):
        load_config(recipe, check_environment=False)


def test_file_system_mistakes_are_one_line_errors(tmp_path, capsys):
    """simulate writing to a folder path: one line and exit 2, not a traceback."""
    assert main(["simulate", "--queries", "64", "--batch-size", "4", "--budget", "16", "--strategies", "recycle",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("IsADirectoryError:") and "Traceback" not in err


def test_a_reward_module_beside_the_user_loads_under_python_dash_p(tmp_path, monkeypatch):
    """The heavy commands re-run Python with -P (the working directory off sys.path): a reward
    module in the working directory is still found, after every installed package."""
    from megatron_recycle.agent.reward import load_reward_fn

    (tmp_path / "my_reward_mod_x.py").write_text("def coin(response, golds, truncated):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), ".")])
    fn = load_reward_fn("my_reward_mod_x:coin")
    assert fn("a", ["b"], False) == 0.5 and sys.path[-1] == str(tmp_path)
    with pytest.raises(ValueError, match="No module named 'no_such_reward_mod'"):
        load_reward_fn("no_such_reward_mod:f")


def test_every_pool_statistic_has_a_pool_heading():
    from megatron_recycle.pool import RecyclingPool
    from megatron_recycle.train.metrics import POOL_KEYS

    for strategy in ("recycle", "soft_recycle", "grpo", "bounded_dapo", "dapo"):
        pool = RecyclingPool(16, batch_size=2, oversample=1 if strategy in ("grpo", "dapo") else 2, strategy=strategy)
        while True:
            ids = pool.sample()
            import torch

            pool.update(ids, torch.tensor([[1.0, 0.0]] * len(ids)))
            if not pool.needs_more:
                break
        assert set(pool.stats()) - {"step"} <= POOL_KEYS, strategy


def test_environment_variables_are_checked_with_the_config(monkeypatch):
    """A bad route or kernel implementation is a config error up front (it was a traceback after
    the model was built, or inside the first training step)."""
    import megatron_recycle_kernels as K

    from megatron_recycle.config import KERNEL_IMPLS, PACKED_ATTENTION_ROUTES
    from megatron_recycle.model.attention import ROUTES

    assert set(KERNEL_IMPLS) == {i for i in K._IMPLS if i} and ROUTES == PACKED_ATTENTION_ROUTES
    for var, value, match in (("MEGATRON_RECYCLE_PACKED_ATTENTION", "bogus", "not a group attention route"),
                              ("MEGATRON_RECYCLE_KERNELS_IMPL", "cuda", "not one of triton, torch")):
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError, match=match):
            load_config(None, [])
        load_config(None, [], check_environment=False)  # reading a saved run elsewhere: not checked
        monkeypatch.delenv(var)
    for route in ("auto", "varlen", ""):
        monkeypatch.setenv("MEGATRON_RECYCLE_PACKED_ATTENTION", route)
        load_config(None, [])


def test_caches_default_to_the_shared_cache_folder(tmp_path, monkeypatch):
    """model.cache_dir and retriever.cache_dir default to $MEGATRON_RECYCLE_CACHE (the README's
    promise), not to a .cache/ of the working directory, which every new directory filled again."""
    from megatron_recycle.agent.retrievers import BM25Retriever
    from megatron_recycle.model.hf_loading import _gguf_cache_folder

    cfg = load_config(None, [], check_environment=False)
    assert cfg.model.cache_dir == "" and cfg.retriever.cache_dir == ""
    monkeypatch.setenv("MEGATRON_RECYCLE_CACHE", str(tmp_path / "shared"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert _gguf_cache_folder(str(gguf), cfg.model.cache_dir).parent == tmp_path / "shared" / "models"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "1", "contents": "Paris\nParis is the capital of France."}) + "\n")
    r = BM25Retriever(str(corpus), cache_dir=cfg.retriever.cache_dir)
    assert r.index_dir.parent == tmp_path / "shared"


def test_periodic_dev_evaluation_needs_a_dev_split(tmp_path):
    """n_dev=0 wrote an empty dev.jsonl, and the run died at its first dev evaluation."""
    with pytest.raises(ConfigError, match=r"data.n_dev=0: must be >= 1 while train.eval_every > 0"):
        load_config(None, ["data.n_dev=0", "train.eval_every=5"])
    load_config(None, ["data.n_dev=0", "train.eval_every=0"])
    load_config(None, ["data.n_dev=0", "train.eval_every=5", f"data.dev_file={tmp_path / 'dev.jsonl'}"])


def test_existing_generated_data_with_other_settings_is_named(tmp_path, capsys):
    from megatron_recycle.train import runtime as rtm

    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"question": "q", "golden_answers": ["a"]}\n')
    stats = {"seed": 0, "topk": 3, "max_passage_words": 0,
             "requested": {"train": 200, "sft": 1000, "dev": 100, "test": 200}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    same = load_config(None, [f"data.dir={tmp_path}", "data.n_train=200", "retriever.topk=3"])
    assert rtm.generated_data_differences(same) == []
    rtm.ensure_data(same)
    assert "[data] note" not in capsys.readouterr().out
    other = load_config(None, [f"data.dir={tmp_path}", "data.n_train=50", "retriever.topk=2", "run.seed=7"])
    rtm.ensure_data(other)  # used as it is, and said so
    out = capsys.readouterr().out
    assert "run.seed 0 -> 7" in out and "data.n_train 200 -> 50" in out and "retriever.topk 3 -> 2" in out
    assert "data.n_dev" not in out
    # data of a generator before the held-out SFT set: its SFT came from the train questions
    del stats["requested"]["sft"]
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    assert "data.n_sft 0 -> 1000" in rtm.generated_data_differences(same)[0]
    (tmp_path / "stats.json").write_text("{broken")
    assert rtm.generated_data_differences(other) == []


def test_generated_data_and_evaluations_follow_the_retrievers_corpus(tmp_path):
    """The oracle searches of generated data, and evaluations a resume reuses, depend on the
    corpus's bytes and the retriever kind, not only the corpus's path."""
    from megatron_recycle.train import runtime as rtm

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "1", "contents": "A\nx"}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_config(None, [f"data.dir={data}", f"retriever.corpus={corpus}"])
    stats = {"seed": cfg.run.seed, "topk": cfg.retriever.topk, "retriever": rtm.data_retriever_info(cfg),
             "requested": {"sft": cfg.data.n_sft}}
    (data / "stats.json").write_text(json.dumps(stats))
    test_file = tmp_path / "test.jsonl"
    test_file.write_text('{"question": "q", "golden_answers": ["a"]}\n')
    identity = rtm.eval_identity(cfg, test_file)
    assert rtm.generated_data_differences(cfg) == []
    corpus.write_text(json.dumps({"id": "1", "contents": "B\ny"}) + "\n")  # the same path, other passages
    assert rtm.eval_identity(cfg, test_file)["retriever_digest"] != identity["retriever_digest"]
    (note,) = rtm.generated_data_differences(cfg)
    assert "retriever's corpus or encoder corpus sha1" in note
    http = load_config(None, [f"data.dir={data}", "retriever.kind=http", "retriever.url=http://127.0.0.1:9/retrieve"])
    (note,) = rtm.generated_data_differences(http)
    assert f"retriever bm25 {corpus} -> http http://127.0.0.1:9/retrieve" in note
    assert rtm.eval_identity(http, test_file)["retriever_digest"] is None


def test_a_bad_dev_file_stops_training_before_the_model_is_built(tmp_path, monkeypatch):
    """The dev file was read at the first evaluation: a bad one lost every step before it."""
    from megatron_recycle.data.datasets import QAFormatError
    from megatron_recycle.train import grpo
    from megatron_recycle.train import runtime as rtm

    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"question": f"q{i}", "golden_answers": ["a"]}) + "\n" for i in range(40)))
    for split in ("dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text("")
    monkeypatch.setattr(rtm, "setup_runtime", lambda *a, **k: pytest.fail("the model was built first"))
    cfg = load_config(None, [f"data.dir={tmp_path}", "train.eval_every=2", f"run.output_dir={tmp_path / 'runs'}"])
    with pytest.raises(QAFormatError, match="dev.jsonl"):
        grpo.run_grpo(cfg)


def test_a_train_file_without_dev_and_test_files_says_nothing_is_generated(tmp_path):
    from megatron_recycle.train import runtime as rtm

    train = tmp_path / "mine.jsonl"
    train.write_text('{"question": "q", "golden_answers": ["a"]}\n')
    cfg = load_config(None, [f"data.train_file={train}", f"data.dir={tmp_path / 'gen'}"])
    with pytest.raises(FileNotFoundError, match="data.train_file is set, so nothing is generated"):
        rtm.ensure_data(cfg)


def test_a_warm_up_as_long_as_the_run_is_cut_with_a_note(monkeypatch, capsys):
    from megatron_recycle.model import parallel
    from megatron_recycle.train import runtime as rtm

    class Stop(Exception):
        pass

    monkeypatch.setattr(rtm, "check_trainer_config", lambda *a: None)
    monkeypatch.setattr(parallel, "init_distributed", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    cfg = load_config(None, [])
    with pytest.raises(Stop):
        rtm.setup_runtime(cfg, model_path="m", lr=1e-6, warmup_steps=10, total_steps=4)
    assert "a warm-up of 10 updates in a run of 4 is cut to 3" in capsys.readouterr().out
    with pytest.raises(Stop):
        rtm.setup_runtime(cfg, model_path="m", lr=1e-6, warmup_steps=3, total_steps=4)
    assert "warm-up" not in capsys.readouterr().out


def test_each_command_checks_only_what_it_builds(monkeypatch):
    """gen-data, serve-retriever and sft build no rollout engine: a GPU recipe (engine vllm) is
    theirs to run on a machine without vLLM; train runs no SFT, so SFT's learning-rate floor is
    not its rule. A library caller (command None) and the commands that build an engine keep every check."""
    import importlib.util

    from megatron_recycle import config as C

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    recipe = ROOT / "recipes" / "qwen3_1p7b_recycle.yaml"
    assert "engine: vllm" in recipe.read_text()
    for command in ("gen-data", "serve-retriever", "sft"):
        assert load_config(recipe, command=command).rollout.engine == "vllm"
    for command in ("train", "eval", "run", None):
        with pytest.raises(ConfigError, match="vLLM is not installed"):
            load_config(recipe, command=command)
    floor = ["rollout.engine=hf", "optim.lr=1e-4", "optim.min_lr=3e-5", "sft.lr=2e-5"]
    assert load_config(recipe, floor, command="train").optim.min_lr == 3e-5
    assert "enabled: false" in recipe.read_text()  # its SFT phase runs through `sft`, not `run`
    assert load_config(recipe, floor, command="run").optim.min_lr == 3e-5
    for command, extra in (("sft", []), ("run", ["sft.enabled=true"]), (None, [])):
        with pytest.raises(ConfigError, match="SFT decays to it too"):
            load_config(recipe, floor + extra, command=command)
    # a custom reward is read by the GRPO commands only; transformer-engine by the Megatron ones
    bad_reward = ["rollout.engine=hf", "rollout.reward=gone_pkg.rewards:fn"]
    load_config(None, bad_reward, command="sft")
    with pytest.raises(ConfigError, match="rollout.reward"):
        load_config(None, bad_reward, command="train")
    monkeypatch.setattr("megatron_recycle.model.build.te_available", lambda: False)
    load_config(None, ["model.layer_spec=te"], command="eval")
    with pytest.raises(ConfigError, match="model.layer_spec"):
        load_config(None, ["model.layer_spec=te"], command="sft")
    assert C.command_needs(load_config(None, []), "analyze") == C.ALL_NEEDS  # unlisted: everything
    assert C.command_needs(load_config(None, []), "export") == frozenset()  # a saved run, read to export it


def test_train_save_hf_is_checked_before_training(tmp_path, monkeypatch, capsys):
    """A --save-hf that writing would refuse after training (hours on a GPU recipe) is refused first,
    as is one naming the folder training starts from (the atomic replace would delete it)."""
    import megatron_recycle.train.grpo as grpo

    trained = []
    monkeypatch.setattr(grpo, "run_grpo", lambda *a, **kw: trained.append(1) or {})
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, extra, says in ((not_a_folder, [], "not a model folder"), (stray, [], "not a model folder"),
                             (model, [f"model.name_or_path={model}"], "model.name_or_path folder training starts")):
        assert main(["train", "--save-hf", str(out), *extra]) == 2
        assert says in capsys.readouterr().err
    assert main(["train", "--save-hf", str(model) + "/", "--init-from", str(model)]) == 2
    assert "--init-from folder training starts from" in capsys.readouterr().err
    assert trained == [] and (stray / "notes.txt").read_text() == "mine"


def test_numbers_are_base_10_in_recipes_and_section_overrides_too(tmp_path):
    """YAML 1.1 reads 010 as 8, 0x1F as 31 and 1:30 as 90; the documented rule is base 10."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 010}\nrun: {seed: 7, save_every: 1_0}\noptim: {lr: 1.0e-4}\n")
    cfg = load_config(recipe)
    assert (cfg.train.steps, cfg.run.save_every, cfg.optim.lr) == (10, 10, 1e-4)
    assert load_config(None, ["train={steps: 010}"]).train.steps == 10
    for text, key in (("run: {seed: 0x1F}", "run.seed"), ("run: {save_every: 1:30}", "run.save_every"),
                      ("train: {steps: 0b11}", "train.steps")):
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=f"{key}: expected an integer"):
            load_config(recipe)
    for over in ("train.steps=0x10", "train.steps=0b11", "optim.lr=0x10", "train={steps: 0o7}"):
        with pytest.raises(ConfigError, match="expected"):
            load_config(None, [over])
    # text settings keep such words as text
    assert load_config(None, ["run.name=0x1F"]).run.name == "0x1F"


def test_a_yaml_alias_is_a_copy_and_odd_recipes_are_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft: &s {batch_size: 8}\neval: *s\n")
    cfg = load_config(recipe, ["eval.batch_size=2"])
    assert (cfg.sft.batch_size, cfg.eval.batch_size) == (8, 2)
    for text in ("false", "0", "[]", "''"):
        recipe.write_text(text)
        with pytest.raises(ConfigError, match="must be a mapping of sections"):
            load_config(recipe)
    recipe.write_text("# only a comment\n")
    assert load_config(recipe) == Config()


def test_huge_numbers_and_seeds_are_config_errors():
    for over in ("optim.lr=1" + "0" * 400, "model.vpp=" + "9" * 5000, "run.seed=18446744073709551616",
                 "run.seed=-1"):
        with pytest.raises(ConfigError):
            load_config(None, [over])
    assert load_config(None, [f"run.seed={2**62 - 1}"]).run.seed == 2**62 - 1


def test_a_reward_file_under_home_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "myreward.py").write_text("def fn(response, golds, truncated):\n    return 1.0\n")
    cfg = load_config(None, ["rollout.reward=~/myreward.py:fn"])
    assert cfg.rollout.reward == f"{tmp_path}/myreward.py:fn"


def test_simulate_refuses_non_finite_learner_settings(capsys):
    from megatron_recycle.simulate import main as simulate

    base = ["--queries", "64", "--batch-size", "4", "--budget", "64", "--strategies", "grpo"]
    for bad, says in ((["--transfer", "nan"], "--transfer must be a finite number"),
                      (["--learn", "inf"], "--learn must be a finite number"),
                      (["--drift", "-1"], "--drift is a standard deviation")):
        with pytest.raises(SystemExit):
            simulate(base + bad)
        assert says in capsys.readouterr().err


def test_the_template_cap_is_a_data_setting(tmp_path, monkeypatch):
    from megatron_recycle.train import runtime as rtm

    with pytest.raises(ConfigError, match="data.max_template_share=1.5: must be in"):
        load_config(None, ["data.max_template_share=1.5"])
    stats = {"seed": 0, "topk": 3, "max_passage_words": 0, "max_share": None,
             "requested": {"train": 2000, "sft": 1000, "dev": 100, "test": 200}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    capped = load_config(None, [f"data.dir={tmp_path}", "data.max_template_share=0.4"])
    assert "data.max_template_share None -> 0.4" in rtm.generated_data_differences(capped)[0]
    seen = {}
    monkeypatch.setattr("megatron_recycle.data.synthetic.generate_dataset", lambda *a, **kw: seen.update(kw))
    rtm.generate_data(capped)
    assert seen["max_share"] == 0.4


def test_text_made_of_digits_survives_a_recipe_and_a_saved_config(tmp_path):
    """Base-10 integers made "0912" an integer: a run named so was saved unquoted and its config.yaml
    no longer loaded (export reads it); a recipe's `name: 0912` was refused."""
    for name in ("0912", "09", "+08", "0_9", "123", "1e5", "0x1F"):
        cfg = load_config(None, [f"run.name={name}"])
        saved = tmp_path / "config.yaml"
        saved.write_text(cfg.to_yaml())
        assert load_config(saved).run.name == name, (name, saved.read_text().splitlines()[1])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {name: 0912, seed: 010}\n")
    cfg = load_config(recipe)
    assert (cfg.run.name, cfg.run.seed) == ("0912", 10) and type(cfg.run.seed) is int
    assert "seed: 10\n" in cfg.to_yaml()


def test_export_reads_a_grpo_runs_config_without_the_sft_rule(tmp_path):
    """train accepts optim.min_lr above sft.lr (no SFT phase); export must read that run's config."""
    floor = ["optim.lr=1e-4", "optim.min_lr=3e-5", "sft.lr=2e-5"]
    saved = tmp_path / "config.yaml"
    saved.write_text(load_config(None, floor, command="train").to_yaml())
    assert load_config(saved, check_environment=False, command="export").optim.min_lr == 3e-5
    with pytest.raises(ConfigError, match="SFT decays to it too"):
        load_config(saved, check_environment=False)
