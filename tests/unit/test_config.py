"""The one config tree: precedence (CLI > env > file > defaults), every flag maps to a key, named errors for
unknown keys and bad values, `pdserve config` round-trips, and the tree stays torch-free."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

from pdserve.cli import build_parser
from pdserve.cli_flags import ALIASES, add_config_flags, flag_of, leaves, overrides
from pdserve.config import POLICY_NAMES, ServeConfig, load_config, to_yaml


def parse(*argv: str) -> ServeConfig:
    args = build_parser().parse_args(["config", *argv])
    return load_config(args.config, overrides(args))


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("PDSERVE_")]:
        monkeypatch.delenv(k)


def test_defaults_are_the_trees():
    c = parse()
    assert c == ServeConfig()
    assert (c.pools.prefill, c.pools.decode, c.pools.colocated) == (1, 1, 0)
    assert c.engine.block_size == 16 and c.frontend.port == 8000 and c.routing.policy == "prefix_aware"


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path, monkeypatch):
    file = tmp_path / "c.yaml"
    file.write_text(
        yaml.safe_dump({"engine": {"block_size": 8, "max_num_seqs": 7, "seed": 3}, "frontend": {"port": 1}})
    )
    monkeypatch.setenv("PDSERVE_ENGINE__BLOCK_SIZE", "32")
    monkeypatch.setenv("PDSERVE_ENGINE__MAX_NUM_SEQS", "9")
    c = parse("--config", str(file), "--block-size", "64")
    assert c.engine.block_size == 64  # CLI beats env and file
    assert c.engine.max_num_seqs == 9  # env beats file
    assert c.engine.seed == 3 and c.frontend.port == 1  # file beats defaults
    assert c.engine.max_num_batched_tokens == 2048  # default


def test_every_leaf_has_a_flag_and_every_flag_a_key():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help", "--config"}
    keys = {k for k, _ in leaves()}
    assert {flag_of(k) for k in keys} <= flags
    assert flags == {flag_of(k) for k in keys} | set(ALIASES)
    assert set(ALIASES.values()) <= keys
    for action in parser._actions:
        if action.dest.startswith("cfg:"):
            assert action.dest[4:] in keys


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--engine.block-size", "0"], "engine.block_size"),
        (["--port", "70000"], "frontend.port"),
        (["--routing", "fastest"], "routing.policy"),
        (["--dtype", "int8"], "engine.dtype"),
        (["--prefill-workers", "-1"], "pools.prefill"),
        (["--engine.device", "tpu"], "engine.device"),
        (["--pools.resources", '{"prefill": {"gpu_a": "x"}}'], "pools.resources.prefill.gpu_a"),
        (["--worker.lease-s", "1"], "worker.lease_s"),
    ],
)
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        parse(*argv)


def test_unknown_keys_are_named_errors(tmp_path, monkeypatch):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"engine": {"block_sise": 8}}))
    with pytest.raises(ValueError, match=r"engine\.block_sise"):
        parse("--config", str(file))
    file.write_text(yaml.safe_dump({"enginee": {}}))
    with pytest.raises(ValueError, match="enginee"):
        parse("--config", str(file))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["config", "--engine.block-sise", "8"])


def test_cross_field_rules():
    with pytest.raises(ValueError, match="pools"):
        parse("--decode-workers", "0")
    with pytest.raises(ValueError, match=r"kv\.transport"):
        parse("--transport", "local")
    assert parse("--transport", "local", "--prefill-workers", "0").kv.transport == "local"


def test_config_round_trips_through_yaml(tmp_path):
    resources = '{"prefill": {"pdserve_prefill": 1}}'
    c = parse("--prefill-workers", "2", "--decode-workers", "3", "--routing-temperature", "0.5", "--api-key", "k",
              "--pools.resources", resources, "--engine.enable-prefix-caching", "false")  # fmt: skip
    file = tmp_path / "round.yaml"
    file.write_text(to_yaml(c))
    assert load_config(str(file)) == c
    assert c.pools.resources == {"prefill": {"pdserve_prefill": 1.0}} and not c.engine.enable_prefix_caching


def test_pdserve_config_command_prints_the_effective_yaml(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "config", "--decode-workers", "2", "--name", "prod"],
        capture_output=True, text=True, check=True, env={"PDSERVE_ENGINE__SEED": "5", "PATH": ""},
    )  # fmt: skip
    data = yaml.safe_load(out.stdout)
    assert data["pools"]["decode"] == 2 and data["name"] == "prod" and data["engine"]["seed"] == 5
    assert ServeConfig.model_validate(data) == parse("--decode-workers", "2", "--name", "prod", "--engine.seed", "5")


def test_routing_names_match_the_scheduler_and_the_tree_imports_no_torch():
    from pdserve.router.policies import POLICIES

    assert set(POLICY_NAMES) == set(POLICIES)
    code = "import sys, pdserve.config, pdserve.cli_flags; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", ["serve", "config"])
def test_help_lists_every_key(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag_of(key) in text for key, _ in leaves())


def test_generate_takes_the_engine_keys_from_the_tree_and_sampling_from_one_record():
    from pdserve.cli import GENERATE_SAMPLING
    from pdserve.cli_flags import sampling_params

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {s for a in commands.choices["generate"]._actions for s in a.option_strings}
    assert {flag_of(k) for k, _ in leaves() if k.startswith("engine.")} <= flags
    assert {"--model", "--dtype", "--num-kv-blocks", "--max-tokens", "--temperature", "--seed", "--chat"} <= flags
    assert not [f for f in flags if f.startswith(("--routing", "--kv", "--pools"))]
    args = parser.parse_args(["generate", "hi"])
    assert sampling_params(args, GENERATE_SAMPLING) == GENERATE_SAMPLING and overrides(args) == {}
    args = parser.parse_args(["generate", "hi", "--dtype", "bfloat16", "--seed", "none", "--top-k", "5"])
    params = sampling_params(args, GENERATE_SAMPLING)
    assert (params.seed, params.top_k, params.max_tokens, params.temperature) == (None, 5, 64, 0.0)
    assert overrides(args) == {"engine": {"dtype": "bfloat16"}}


def test_generate_runs_the_demo_model_and_refuses_bad_engine_keys(capsys):
    from pdserve.cli import main

    assert main(["generate", "Hello", "--max-tokens", "4", "--num-kv-blocks", "32"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "[4 tokens in" in out.err and "finish_reason=length" in out.err
    assert main(["generate", "Hello", "--engine.attention-backend", "flash"]) == 2
    assert "engine.attention_backend" in capsys.readouterr().err
