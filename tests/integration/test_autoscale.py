"""The autoscaling loop end to end with a real Prometheus (started here, time compressed: 1 s scrapes and
rule evaluations, 10 s rate windows): under a rising load the decode pool grows and a new worker serves;
when the load stops the pool shrinks back to its minimum after the stabilization window; no request fails
in between; the decisions and pool sizes are in the controller's /metrics and in Prometheus."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import pytest
import ray

from pdserve.controller.deploy import deploy
from tests.conftest import serve_config
from tests.loadgen import Load, free_port, wait

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="needs the prometheus binary (.ci/run installs it; as root: apt-get install prometheus)",
    ),
]


def test_pools_grow_under_load_and_shrink_back_to_min(tmp_path):
    from pdserve.autoscale.local_prometheus import LocalPrometheus

    port, metrics_port = free_port(), free_port()
    prom = LocalPrometheus([f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}"], interval_s=1, rule_window="10s")
    prom.wait_ready()
    auto = {
        "enabled": True, "prometheus_url": prom.url, "interval_s": 1.0, "decode_tokens_per_worker": 40,
        "prefill_tokens_per_worker": 100000, "min_prefill": 1, "max_prefill": 1, "min_decode": 1, "max_decode": 3,
        "scale_in_window_s": 8, "cooldown_s": 2, "ttft_slo_s": 40, "tpot_slo_s": 5, "flip_roles": False,
    }  # fmt: skip
    cfg = serve_config(
        engine={"num_kv_blocks": 256}, pools={"prefill": 1, "decode": 1}, autoscaling=auto,
        frontend={"port": port, "host": "127.0.0.1"}, controller={"metrics_port": metrics_port},
    )  # fmt: skip
    ray.init(num_cpus=10, include_dashboard=False, namespace="pdserve-test-autoscale")
    dep = None
    try:
        dep = asyncio.run(deploy(cfg, serve_http=True))

        def st():
            return ray.get(dep.controller.status.remote())

        def ready(role):
            return [w for w in st()["workers"] if w["role"] == role and w["state"] == "ready"]

        load = Load(f"http://127.0.0.1:{port}", concurrency=6)
        try:
            wait(lambda: len(ready("decode")) >= 2 and all(w["requests_total"] for w in ready("decode")), 150,
                 "a second decode worker serving")  # fmt: skip
            grown = len(ready("decode"))
        finally:
            load.end()
        assert load.done > 0 and not load.failures, load.failures[:3]
        wait(lambda: len(ready("decode")) == 1 and all(w["state"] != "draining" for w in st()["workers"]), 150,
             "the decode pool back at its minimum")  # fmt: skip
        decisions = ray.get(dep.controller.autoscaler_decisions.remote())
        actions = [d["action"] for d in decisions]
        assert "scale_out" in actions and actions.count("scale_in") >= grown - 1, actions
        out = next(d for d in decisions if d["action"] == "scale_out")
        assert out["signals"]["decode_tokens_per_s"] > 40 and out["targets"]["decode"] > 1, out  # logged inputs
        assert len(ready("prefill")) == 1  # min_prefill kept
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'pdserve_autoscaler_desired_workers{role="decode"}' in text
        assert 'pdserve_autoscaler_decisions_total{action="scale_in",reason="demand_fell"}' in text

        def seen_in_prometheus():
            q = 'max_over_time(pdserve_workers{role="decode",state="ready"}[5m])'
            r = httpx.get(f"{prom.url}/api/v1/query", params={"query": q}, timeout=10).json()
            return r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 2

        wait(seen_in_prometheus, 30, "Prometheus to have recorded the grown pool")
    finally:
        if dep is not None:
            asyncio.run(dep.shutdown())
        ray.shutdown()
        prom.stop()


def test_a_prefill_worker_flips_to_decode_when_the_load_turns_decode_heavy(tmp_path):
    """2P1D at a GPU budget of 3: long prompts with short outputs keep both prefill workers busy; then short
    prompts with long outputs make decode short while prefill has slack. With no GPU to add, the autoscaler
    waits for prefill's slack to hold for the window, then drains a prefill worker (by migration) and starts
    a decode worker in its place, which serves; no request fails."""
    from pdserve.autoscale.local_prometheus import LocalPrometheus

    port, metrics_port = free_port(), free_port()
    prom = LocalPrometheus([f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}"], interval_s=1, rule_window="10s")
    prom.wait_ready()
    auto = {
        "enabled": True, "prometheus_url": prom.url, "interval_s": 1.0, "decode_tokens_per_worker": 40,
        "prefill_tokens_per_s_per_worker": 2000, "min_prefill": 1, "max_prefill": 2, "min_decode": 1,
        "max_decode": 2, "max_workers": 3, "scale_in_window_s": 8, "cooldown_s": 2, "ttft_slo_s": 40,
        "tpot_slo_s": 5, "flip_roles": True,
    }  # fmt: skip
    cfg = serve_config(
        engine={"num_kv_blocks": 1024}, pools={"prefill": 2, "decode": 1}, autoscaling=auto,
        frontend={"port": port, "host": "127.0.0.1"}, controller={"metrics_port": metrics_port},
    )  # fmt: skip
    ray.init(num_cpus=10, include_dashboard=False, namespace="pdserve-test-autoscale")
    dep = None
    try:
        dep = asyncio.run(deploy(cfg, serve_http=True))

        def st():
            return ray.get(dep.controller.status.remote())

        def ready(role):
            return [w for w in st()["workers"] if w["role"] == role and w["state"] == "ready"]

        def actions():
            return [d["action"] for d in ray.get(dep.controller.autoscaler_decisions.remote())]

        first_decode = {w["worker_id"] for w in ready("decode")}
        url = f"http://127.0.0.1:{port}"
        heavy = Load(url, concurrency=4, prompt_words=200, max_tokens=2)  # prefill-heavy: ~1k-token prompts
        try:
            time.sleep(20)  # longer than the window: both prefill workers stay wanted
            assert {"scale_in", "flip"}.isdisjoint(actions()), ray.get(dep.controller.autoscaler_decisions.remote())
        finally:
            heavy.end()
        light = Load(url, concurrency=6, prompt_words=4, max_tokens=48)  # decode-heavy
        try:
            wait(
                lambda: "flip" in actions(),
                120,
                "a flip",
                lambda: ray.get(dep.controller.autoscaler_decisions.remote())[-3:],
            )
            new = wait(lambda: [w for w in ready("decode") if w["worker_id"] not in first_decode
                                and w["requests_total"] > 0], 120, "the flipped worker serving decode")  # fmt: skip
        finally:
            light.end()
        assert heavy.done > 0 and light.done > 0, (heavy.done, light.done)
        assert not heavy.failures and not light.failures, (heavy.failures + light.failures)[:3]
        decisions = ray.get(dep.controller.autoscaler_decisions.remote())
        flip = next(d for d in decisions if d["action"] == "flip")
        assert flip["reason"] == "decode_short_prefill_slack", flip
        assert flip["targets"] == {"prefill": 1, "decode": 2, "colocated": 0}, flip
        assert "scale_out" not in [d["action"] for d in decisions], decisions  # no GPU beyond the budget
        assert len(ready("prefill")) == 1 and len(ready("decode")) == 2, st()["workers"]
        assert new, st()["workers"]
    finally:
        if dep is not None:
            asyncio.run(dep.shutdown())
        ray.shutdown()
        prom.stop()
