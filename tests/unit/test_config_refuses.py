"""The config refuses what it does not understand: a routing policy's unknown option or bad value, an attention
backend that does not exist, UCX's peer mode without the progress thread — each an error naming the key, from
`load_config` and from `pdserve config`; the tunables that were module constants are keys with their
defaults, and the values reach what uses them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.cli import main
from pdserve.config import ServeConfig, load_config
from pdserve.policy_options import POLICY_OPTIONS, PolicyOptions
from pdserve.router.policies import POLICIES, make_policy
from pdserve.router.router import Router, RouterConfig


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("PDSERVE_")]:
        monkeypatch.delenv(k)


BAD = [
    # (flags of `pdserve config`, the same as config overrides, the key the error names)
    (["--routing.policy-options", '{"bogus_option": 1}'], {"routing": {"policy_options": {"bogus_option": 1}}},
     "routing.policy_options.bogus_option"),
    (["--routing.policy-options", '{"temperature": "hot"}'], {"routing": {"policy_options": {"temperature": "hot"}}},
     "routing.policy_options.temperature"),
    (["--routing", "round_robin", "--routing.policy-options", '{"seed": 1}'],
     {"routing": {"policy": "round_robin", "policy_options": {"seed": 1}}}, "routing.policy_options.seed"),
    (["--routing", "dynamo_kv_cost", "--routing.policy-options", '{"overlap_weight": -1}'],
     {"routing": {"policy": "dynamo_kv_cost", "policy_options": {"overlap_weight": -1}}},
     "routing.policy_options.overlap_weight"),
    (["--routing", "least_loaded", "--routing-temperature", "0.5"],
     {"routing": {"policy": "least_loaded", "temperature": 0.5}}, "routing.temperature"),
    (["--engine.attention-backend", "bogus"], {"engine": {"attention_backend": "bogus"}}, "engine.attention_backend"),
    (["--kv.nixl.ucx-error-handling-mode", "peer"], {"kv": {"nixl": {"ucx_error_handling_mode": "peer"}}},
     "kv.nixl.ucx_error_handling_mode"),
    (["--kv.nixl.ucx-error-handling-mode", "always", "--kv.nixl.progress-thread", "true"],
     {"kv": {"nixl": {"ucx_error_handling_mode": "always", "progress_thread": True}}},
     "kv.nixl.ucx_error_handling_mode"),
    (["--kv.nixl.num-threads", "0"], {"kv": {"nixl": {"num_threads": 0}}}, "kv.nixl.num_threads"),
    (["--controller.call-timeout-s", "0"], {"controller": {"call_timeout_s": 0}}, "controller.call_timeout_s"),
    (["--routing.prediction-ttl-s", "-1"], {"routing": {"prediction_ttl_s": -1}}, "routing.prediction_ttl_s"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "overrides", "key"), BAD, ids=[b[2] for b in BAD])
def test_load_config_names_the_bad_key(argv, overrides, key):
    with pytest.raises(ValueError) as e:
        load_config(overrides=overrides, env=False)
    assert key in str(e.value)


@pytest.mark.parametrize(("argv", "overrides", "key"), BAD, ids=[b[2] for b in BAD])
def test_pdserve_config_exits_non_zero_naming_the_key(argv, overrides, key, capsys):
    assert main(["config", *argv]) != 0
    err = capsys.readouterr().err
    assert err.startswith("pdserve: error:") and key in err


def test_pdserve_config_subprocess_refuses_an_unknown_policy_option():
    out = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "config", "--routing.policy-options", '{"bogus_option": 1}'],
        capture_output=True, text=True, env={"PATH": ""},
    )  # fmt: skip
    assert out.returncode != 0 and out.stdout == ""
    assert "routing.policy_options.bogus_option" in out.stderr


def test_the_environment_and_files_are_refused_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_ROUTING__POLICY_OPTIONS", '{"bogus_option": 1}')
    with pytest.raises(ValueError, match=r"routing\.policy_options\.bogus_option"):
        load_config()
    monkeypatch.delenv("PDSERVE_ROUTING__POLICY_OPTIONS")
    file = tmp_path / "c.yaml"
    file.write_text("engine:\n  attention_backend: flashattn\n")
    with pytest.raises(ValueError, match=r"engine\.attention_backend"):
        load_config(str(file))


def test_new_keys_have_their_defaults():
    c = ServeConfig()
    assert c.controller.call_timeout_s == 10.0 and c.controller.monitor_interval_s == 0.2
    assert c.routing.prediction_ttl_s == 10.0
    assert c.frontend.stream_gap_timeout_s == 5.0
    assert c.migration.first_token_wait_s == 5.0
    assert c.engine.attention_backend == "auto"
    assert c.kv.nixl.model_dump() == {
        "progress_thread": False, "ucx_error_handling_mode": "none", "ucx_devices": "", "num_threads": 2,
        "split_bytes": 8 << 20,
    }  # fmt: skip
    assert c.routing.policy_options == {}


def test_every_policy_has_an_options_model_with_no_swallowing():
    assert set(POLICY_OPTIONS) == set(POLICIES)
    for name, cls in POLICIES.items():
        assert cls.Options is POLICY_OPTIONS[name]
        assert cls.Options.model_config["extra"] == "forbid" and cls.Options.model_config["frozen"]
        with pytest.raises(ValueError, match="bogus_option"):
            make_policy(name, {"bogus_option": 1})


def test_policy_options_reach_the_policy():
    r = Router(RouterConfig.of(load_config(overrides={"routing": {"policy_options": {
        "decode_seq_tokens": 7, "kv_full_tokens": 99, "seed": 3}}}, env=False)))  # fmt: skip
    assert (r.policy.name, r.policy.decode_seq_tokens, r.policy.kv_full_tokens) == ("prefix_aware", 7, 99)
    r = Router(RouterConfig(policy="sglang_cache_aware", policy_options={"cache_threshold": 0.9}))
    assert r.policy.threshold == 0.9
    r = Router(RouterConfig(policy="dynamo_kv_cost", policy_options={"overlap_weight": 2.0}, block_size=32))
    assert (r.policy.weight, r.policy.block_size) == (2.0, 32)


def test_routing_temperature_is_prefix_awares_temperature():
    r = Router(RouterConfig.of(load_config(overrides={"routing": {"temperature": 0.5}}, env=False)))
    assert r.policy.temperature == 0.5 and not r.policy.ranked
    same = load_config(overrides={"routing": {"temperature": 0.5, "policy_options": {"temperature": 0.5}}}, env=False)
    assert same.routing.options().temperature == 0.5
    with pytest.raises(ValueError, match=r"routing\.policy_options"):
        load_config(overrides={"routing": {"temperature": 0.5, "policy_options": {"temperature": 1.0}}}, env=False)


def test_policy_options_print_as_given_and_typed():
    c = load_config(overrides={"routing": {"policy_options": {"temperature": "0.25"}}}, env=False)
    assert c.routing.policy_options == {"temperature": 0.25}
    assert isinstance(c.routing.options(), PolicyOptions) and c.routing.options().request_overhead_tokens == 32


def test_prediction_ttl_reaches_the_index():
    r = Router(RouterConfig.of(load_config(overrides={"routing": {"prediction_ttl_s": 2.5}}, env=False)))
    assert r.index.prediction_ttl_s == 2.5
    assert Router().index.prediction_ttl_s == 10.0


def test_controller_and_frontend_timeouts_reach_their_users():
    from pdserve.cluster.client import ClusterClient
    from pdserve.controller.frontends import Frontends
    from pdserve.controller.migrations import Migrations
    from pdserve.controller.registry import Registry
    from pdserve.model_info import load_model_info

    c = load_config(
        overrides={"controller": {"call_timeout_s": 3}, "frontend": {"stream_gap_timeout_s": 0.5}}, env=False
    )
    assert Frontends(c, Registry({}), spawn=None, failed=None).call_timeout_s == 3.0
    assert Migrations(c, Registry({}), metrics=None).call_timeout_s == 3.0
    assert ClusterClient(load_model_info(None), None, c).stream_gap_timeout_s == 0.5


def test_a_stream_gap_fails_after_the_configured_timeout():
    import asyncio
    import time

    from pdserve.cluster.client import _in_order
    from pdserve.cluster.stream import StreamGap
    from pdserve.protocol import TokenDelta

    async def run() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(TokenDelta(request_id="r", new_token_ids=[7], text="x", index=1))  # token 0 never comes
        start = time.monotonic()
        with pytest.raises(StreamGap, match="token 0 never came"):
            async for _ in _in_order(queue, 0, gap_timeout_s=0.05):
                pass
        return time.monotonic() - start

    assert asyncio.run(run()) < 1.0  # the default (5 s) would not have ended it yet
