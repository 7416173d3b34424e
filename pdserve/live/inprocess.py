"""A deployment in this process's Ray: `deployed(config)` starts Ray (unless it runs), deploys and yields a
`Live` (the `Deployment`, its frontends' URLs); `running(config)` does it inside an event loop; and
`live_deployment(...)` adds a real Prometheus (1 s scrapes, pdserve's rules) that the autoscaler reads.
Everything started here is stopped on exit, Ray only if started here."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import ray

from pdserve.autoscale.local_prometheus import LocalPrometheus
from pdserve.config import ServeConfig
from pdserve.controller.deploy import deploy
from pdserve.live.ports import free_port


def config(**sections) -> ServeConfig:
    """A ServeConfig with a name of its own (several deployments may share one Ray cluster) and a free port for
    its controller's metrics unless `controller` says otherwise."""
    sections.setdefault("name", f"t{uuid.uuid4().hex[:8]}")
    sections.setdefault("controller", {"metrics_port": 0})
    return ServeConfig(**sections)


@dataclass
class Live:
    dep: object
    url: str  # frontend 0
    prom: LocalPrometheus | None = None
    metrics_port: int = 0  # the controller's /metrics

    @property
    def urls(self) -> list[str]:
        fe = self.dep.config.frontend
        return [f"http://{fe.host}:{fe.port + i}" for i in range(fe.frontends)]

    def status(self) -> dict:
        return ray.get(self.dep.controller.status.remote())

    def ready(self, role: str) -> list[dict]:
        return [w for w in self.status()["workers"] if w["role"] == role and w["state"] == "ready"]

    def decisions(self) -> list[dict]:
        return ray.get(self.dep.controller.autoscaler_decisions.remote())

    def actions(self) -> list[str]:
        return [d["action"] for d in self.decisions()]


@contextlib.asynccontextmanager
async def running(cfg: ServeConfig, timeout_s: float = 600.0) -> AsyncIterator[Live]:
    """`cfg` deployed with HTTP frontends in the Ray this process joined (the caller's); shut down on exit."""
    dep = await deploy(cfg, serve_http=True, timeout_s=timeout_s)
    try:
        yield Live(dep, f"http://{cfg.frontend.host}:{cfg.frontend.port}", metrics_port=cfg.controller.metrics_port)
    finally:
        await dep.shutdown()


@contextlib.contextmanager
def deployed(cfg: ServeConfig, *, num_cpus: int = 10, namespace: str = "pdserve-live", resources=None,
             timeout_s: float = 600.0) -> Iterator[Live]:  # fmt: skip
    """`cfg` deployed with HTTP frontends, in this process's Ray (started here, and shut down on exit, unless
    one runs)."""
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=False, namespace=namespace)
    dep = None
    try:
        dep = asyncio.run(deploy(cfg, serve_http=True, timeout_s=timeout_s))
        yield Live(dep, f"http://{cfg.frontend.host}:{cfg.frontend.port}", metrics_port=cfg.controller.metrics_port)
    finally:
        if dep is not None:
            asyncio.run(dep.shutdown())
        if own_ray and ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def live_deployment(
    autoscaling: dict, namespace: str, rule_window: str | None = None, ray_resources: dict | None = None, **sections
) -> Iterator[Live]:
    """An autoscaled deployment and the Prometheus it reads: `autoscaling` (prometheus_url is filled in) and the
    other config `sections`; the frontend's and the controller's metrics ports are chosen here."""
    port, metrics_port = free_port(), free_port()
    prom = LocalPrometheus([f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}"], interval_s=1, rule_window=rule_window)
    try:
        prom.wait_ready()
        cfg = config(
            autoscaling={"enabled": True, **autoscaling, "prometheus_url": prom.url},
            frontend={"port": port, "host": "127.0.0.1", **sections.pop("frontend", {})},
            controller={"metrics_port": metrics_port, **sections.pop("controller", {})},
            **sections,
        )
        with deployed(cfg, namespace=namespace, resources=ray_resources) as live:
            live.prom = prom
            yield live
    finally:
        prom.stop()
