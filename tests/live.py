"""A live deployment for autoscaling and observability tests: a real Prometheus (1 s scrapes, pdserve's
rules) and a deployment it scrapes on free ports, whose autoscaler reads it; everything stopped on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from pdserve.autoscale.local_prometheus import LocalPrometheus
from pdserve.controller.deploy import deploy
from tests.conftest import serve_config
from tests.loadgen import free_port


@dataclass
class Live:
    dep: object
    url: str
    prom: LocalPrometheus
    metrics_port: int

    def status(self) -> dict:
        return ray.get(self.dep.controller.status.remote())

    def ready(self, role: str) -> list[dict]:
        return [w for w in self.status()["workers"] if w["role"] == role and w["state"] == "ready"]

    def decisions(self) -> list[dict]:
        return ray.get(self.dep.controller.autoscaler_decisions.remote())

    def actions(self) -> list[str]:
        return [d["action"] for d in self.decisions()]


@contextlib.contextmanager
def live_deployment(
    autoscaling: dict, namespace: str, rule_window: str | None = None, ray_resources: dict | None = None, **config
) -> Iterator[Live]:
    """`autoscaling` (prometheus_url is filled in) and the other `config` sections; frontend and controller
    ports are chosen here."""
    port, metrics_port = free_port(), free_port()
    prom = LocalPrometheus([f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}"], interval_s=1, rule_window=rule_window)
    dep = None
    try:
        prom.wait_ready()
        cfg = serve_config(
            autoscaling={"enabled": True, **autoscaling, "prometheus_url": prom.url},
            frontend={"port": port, "host": "127.0.0.1", **config.pop("frontend", {})},
            controller={"metrics_port": metrics_port, **config.pop("controller", {})},
            **config,
        )
        ray.init(num_cpus=10, resources=ray_resources, include_dashboard=False, namespace=namespace)
        dep = asyncio.run(deploy(cfg, serve_http=True))
        yield Live(dep, f"http://127.0.0.1:{port}", prom, metrics_port)
    finally:
        if dep is not None:
            asyncio.run(dep.shutdown())
        if ray.is_initialized():
            ray.shutdown()
        prom.stop()
