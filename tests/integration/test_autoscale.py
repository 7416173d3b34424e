"""The autoscaling loop end to end with a real Prometheus (started here, time compressed: 1 s scrapes and
rule evaluations, 10 s rate windows): under a rising load the decode pool grows and a new worker serves;
when the load stops the pool shrinks back to its minimum after the stabilization window; no request fails
in between; the decisions and pool sizes are in the controller's /metrics and in Prometheus."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time

import httpx
import pytest
import ray

from pdserve.controller.deploy import deploy
from tests.conftest import serve_config

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="needs the prometheus binary (.ci/run installs it; as root: apt-get install prometheus)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """`concurrency` loops streaming completions until stopped; every non-200 or broken stream is kept."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url, self.stop, self.done, self.failures = url, threading.Event(), 0, []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(concurrency)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        body = {"model": "pdserve-demo", "prompt": f"load {i} " * 8, "max_tokens": 48, "ignore_eos": True}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 48:
                        self.failures.append(r.text[:300])
                    self.done += 1
                except Exception as e:  # a dropped connection is a failure too
                    self.failures.append(repr(e))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)
    return value


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
