"""The controller: a detached, named Ray actor that owns one deployment: its config, the registry (the only
writer of membership), the router (its views a projection of the registry, so membership and routing never
disagree), and the lifecycle (a pure plan, carried out by an executor: add, drain, replace, frontends).

Health: a worker's report is its heartbeat; a worker whose reports stop for `failure.worker_timeout_s`, or
whose actor dies (a pending `wait_closed` call fails), is dead whatever its role: it leaves the router and
the index, frontends drop it, and a replacement starts. Workers and frontends are detached named actors,
so a restarted controller (Ray `max_restarts`) finds them by name and rebuilds its registry from them;
their next reports resync the prefix index.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray

from pdserve.config import ROLES, ServeConfig
from pdserve.controller.lifecycle import Lifecycle
from pdserve.controller.metrics import ControllerMetrics
from pdserve.controller.registry import Registry
from pdserve.hashing import BlockHash
from pdserve.protocol import KVEventBatch, MigrationRecord, RouteRequest, WorkerStats
from pdserve.router.router import NoCapacity, Router, RouterConfig

log = logging.getLogger(__name__)

DEAD_RECORD_TTL_S = 60.0  # dead workers stay listed in `status` this long


@ray.remote(num_cpus=0)
class Controller:
    def __init__(self, config: dict, serve_http: bool = True) -> None:
        self.config = ServeConfig.model_validate(config)
        self.name = self.config.name
        self.serve_http = serve_http
        self.registry = Registry({role: self.config.pools.size(role) for role in ROLES})
        self.router = Router(RouterConfig.of(self.config))
        self.registry.listen(self.router.project)  # the router's membership and load: a projection
        self.registry.on_version(self._notify)  # membership long-polls wake on a change
        self.metrics = ControllerMetrics(lambda: self.registry)
        self.metrics_port: int | None = None
        self.lifecycle: Lifecycle | None = None
        self._boot: asyncio.Future | None = None
        self._changed: asyncio.Event | None = None
        self._shutting_down = asyncio.Event()  # set once, when `shutdown` begins
        self.started_at = time.time()
        self.autoscaler = None

    # ---- start-up and recovery ---------------------------------------------------------------------
    async def _ready(self) -> None:
        """Idempotent: the first call after a (re)start discovers the deployment's actors and starts the
        monitor; every public method awaits it, so a restarted controller recovers on its first call."""
        if self._boot is None:
            self._boot = asyncio.ensure_future(self._start())
        await asyncio.shield(self._boot)

    async def _start(self) -> None:
        self._changed = asyncio.Event()
        try:
            self.metrics_port = self.metrics.serve(self.config.controller.metrics_port)
        except OSError as e:  # the port is taken: the deployment still serves, without controller metrics
            log.error("controller metrics on port %s unavailable: %s", self.config.controller.metrics_port, e)
        me = ray.get_runtime_context().current_actor
        self.lifecycle = Lifecycle(self.config, self.registry, self.router, self.metrics, me)
        await self.lifecycle.discover(self.serve_http)
        asyncio.ensure_future(self._monitor())
        if self.config.migration.rebalance:
            asyncio.ensure_future(self.lifecycle.migrations.rebalancer())
        if self.config.autoscaling.enabled:
            self._start_autoscaler()

    def _start_autoscaler(self) -> None:
        from pdserve.autoscale.actuate import Autoscaler
        from pdserve.autoscale.observe import PrometheusObserver

        url = self.config.autoscaling.prometheus_url
        if not url:
            log.error("autoscaling.enabled needs autoscaling.prometheus_url (pdserve serve --autoscale starts one)")
            return
        observer = PrometheusObserver(url, self.config.autoscaling)
        self.autoscaler = Autoscaler(self.config, self.registry, self.router, self.lifecycle, self.metrics, observer)
        asyncio.ensure_future(self.autoscaler.run())

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _monitor(self) -> None:
        while True:
            try:
                now = time.monotonic()
                for rec in list(self.registry.workers.values()):
                    if (
                        rec.state in ("ready", "draining")
                        and now - rec.last_report > self.config.failure.worker_timeout_s
                    ):
                        self.lifecycle.mark_dead(rec.worker_id, "heartbeat_timeout")
                    elif rec.state == "dead" and now - rec.last_report > DEAD_RECORD_TTL_S:
                        self.registry.forget(rec.worker_id)
                self.lifecycle.reconcile()
            except Exception:  # the monitor must keep running
                log.exception("controller monitor pass failed")
            await asyncio.sleep(self.config.controller.monitor_interval_s)

    # ---- data plane's control calls ---------------------------------------------------------------------
    async def report(self, stats: WorkerStats, events: KVEventBatch | None = None) -> bool:
        await self._ready()
        if self.registry.report(stats) is None:  # unknown or dead
            return True
        return self.router.apply_events(stats.worker_id, events)

    async def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[BlockHash]) -> None:
        await self._ready()
        self.router.resync(worker_id, epoch, seq, hashes)

    async def route_batch(self, reqs: list[RouteRequest]) -> list:
        """Many decisions in one call (frontends batch the requests that arrive together); a refusal is
        returned as a `NoCapacity` value, not raised."""
        await self._ready()
        out = []
        policy = self.config.routing.policy
        for req in reqs:
            try:
                route = self.router.route(req)
            except NoCapacity as e:
                out.append(e)
                continue
            self.metrics.routing_decisions.labels(policy, route.policy_reason).inc()
            self.metrics.disagg_decisions.labels(route.reason).inc()
            self.metrics.router_decision_seconds.observe(route.decision_s)
            out.append(route)
        return out

    async def worker_failed(self, worker_id: str, cause: str = "actor_died") -> None:
        """A frontend saw a worker's actor die: drop it now instead of waiting for the watcher."""
        await self._ready()
        self.lifecycle.mark_dead(worker_id, cause)

    async def membership(self, version: int = -1, timeout_s: float = 5.0) -> tuple[int, list, list[str]]:
        """(version, [(worker_id, role, state, handle)], ready roles); waits up to `timeout_s` for a change
        past `version`, so frontends long-poll it."""
        await self._ready()
        if version == self.registry.version:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.registry.version, self.registry.membership(), sorted(self.registry.ready_roles())

    # ---- operations -----------------------------------------------------------------------------------
    async def ping(self) -> bool:
        await self._ready()
        return True

    async def status(self) -> dict:
        await self._ready()
        return {
            "name": self.name,
            "workers": [r.row() for r in self.registry.workers.values()],
            "targets": dict(self.registry.targets),
            "frontends": self.registry.frontend_rows(),
            "controller": {
                "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "metrics_port": self.metrics_port,
                "started_at": self.started_at,
            },
            "index_blocks": len(self.router.index),
        }

    async def wait_ready(self, timeout_s: float = 300.0) -> dict:
        """Wait until every target is met with ready workers (and the frontends serve); returns status."""
        await self._ready()
        deadline = time.monotonic() + timeout_s
        while not self.lifecycle.at_target():
            failure = self.lifecycle.last_failure
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {self.name!r} not ready within {timeout_s}s (last failure: {failure})")
            await asyncio.sleep(0.1)
        return await self.status()

    async def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None) -> dict:
        await self._ready()
        self.registry.set_targets(prefill=prefill, decode=decode, colocated=colocated)
        self.lifecycle.publish_targets()
        self.lifecycle.reconcile()
        return self.registry.targets

    async def drain(self, worker_id: str) -> None:
        """Remove one worker, draining it first; its role's target shrinks by one."""
        await self._ready()
        await self.lifecycle.remove(worker_id)

    # ---- live migration ---------------------------------------------------------------------------------
    async def migrate(self, request_id: str, target_worker: str | None = None) -> list[MigrationRecord]:
        """Operators: move the API request `request_id` (every choice of it) to `target_worker`, or to the
        least loaded decode-capable worker. KeyError if it runs nowhere; ValueError for a bad target."""
        await self._ready()
        return await self.lifecycle.migrations.operator(request_id, target_worker)

    async def migration_target(self, worker_id: str, num_blocks: int):
        """A worker out of KV blocks asks where a request holding `num_blocks` could go: (worker id, handle),
        or None when no other decode-capable worker has room."""
        await self._ready()
        return self.lifecycle.migrations.target_for(worker_id, num_blocks)

    async def record_migration(self, record: MigrationRecord) -> None:
        await self._ready()
        self.lifecycle.migrations.record(record)

    async def autoscaler_decisions(self) -> list[dict]:
        """The autoscaler's latest decisions with their inputs, oldest first (empty when it is off)."""
        await self._ready()
        return [] if self.autoscaler is None else list(self.autoscaler.decisions)

    async def migrations(self) -> list[MigrationRecord]:
        """The latest migrations' records, oldest first."""
        await self._ready()
        return list(self.lifecycle.migrations.history)

    async def wait_shutdown(self, timeout_s: float = 60.0) -> bool:
        """True once `shutdown` has begun; False after `timeout_s` without it. A long-poll: a foreground
        `pdserve serve` learns from it that another process shut its deployment down."""
        await self._ready()
        try:
            await asyncio.wait_for(self._shutting_down.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return self._shutting_down.is_set()

    async def shutdown(self) -> None:
        """Stop every worker and frontend of the deployment (the caller then kills this actor)."""
        self._shutting_down.set()
        await self._ready()
        await self.lifecycle.shutdown()
