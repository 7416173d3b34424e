"""The observer reads signals through Prometheus' query API only; when Prometheus is unreachable or has no
data, the signals are missing and the policy holds the current sizes (never scales in)."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import yaml

from pdserve.autoscale.observe import PrometheusObserver, attainment_query
from pdserve.autoscale.policy import PolicyState, decide
from pdserve.config import AutoscalingConfig
from tests.conftest import needs_binary

CFG = AutoscalingConfig(scale_in_window_s=0, cooldown_s=0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


def test_attainment_reads_the_bucket_at_or_under_the_slo():
    q = attainment_query("b", 2.2, (0.5, 1.0, 2.0, 3.0))
    assert q == 'sum(b{le="2.0"}) / sum(b{le="+Inf"})'


def test_every_series_the_observer_reads_is_recorded_by_the_autoscaling_rules():
    rules = yaml.safe_load((Path(__file__).parents[2] / "deploy/rules/pdserve.rules.yml").read_text())
    group = next(g for g in rules["groups"] if g["name"] == "pdserve.autoscaling")
    recorded = {r["record"] for r in group["rules"]}
    obs = PrometheusObserver("http://127.0.0.1:9", CFG)
    asyncio.run(obs.close())
    read = {name for expr in obs.queries.values() for name in re.findall(r"pdserve:\w+:\w+", expr)}
    assert "pdserve:prefill_prompt_tokens:rate1m" in read and read <= recorded, read - recorded


def run_observer(url: str):
    async def main():
        obs = PrometheusObserver(url, CFG)
        try:
            sizes, starting = {"prefill": 2, "decode": 3, "colocated": 0}, {"prefill": 1}
            return await obs.observe(sizes, starting), obs.last_error
        finally:
            await obs.close()

    return asyncio.run(main())


def test_unreachable_prometheus_holds_the_sizes():
    signals, error = run_observer(f"http://127.0.0.1:{closed_port()}")
    assert error and "Connect" in error
    assert (signals.prefill, signals.decode) == (2, 3) and signals.decode_tokens_per_s is None
    assert signals.totals() == {"prefill": 3, "decode": 3, "colocated": 0}  # a starting worker counts
    state = PolicyState()
    for t in range(0, 300, 10):
        d = decide(signals, state, CFG, now=t)
        assert (d.action, d.reason) == ("hold", "no_data") and d.targets["decode"] == 3


@needs_binary("prometheus")
def test_a_prometheus_without_data_holds_the_sizes():
    from pdserve.autoscale.local_prometheus import LocalPrometheus

    prom = LocalPrometheus([f"127.0.0.1:{closed_port()}"], interval_s=1).wait_ready()
    try:
        signals, error = run_observer(prom.url)
    finally:
        prom.stop()
    assert error is None  # it answered: there is simply nothing to see
    assert signals.decode_tokens_per_s is None and signals.prefill_tokens_queued is None
    assert decide(signals, PolicyState(), CFG, now=0).reason == "no_data"
