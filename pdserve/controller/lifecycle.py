"""Worker lifecycles, run inside the controller (frontends: `frontends.py`): start (wire peers, then join the router),
drain (leave the router, finish what runs, exit holding no blocks), death (leave everything at once) and
replacement. Every operation is idempotent: cleanup may run twice without harm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray

from pdserve.config import NAMESPACE, ROLES, ServeConfig, worker_actor_name
from pdserve.controller.frontends import Frontends
from pdserve.controller.metrics import ControllerMetrics
from pdserve.controller.migrations import DECODERS, Migrations
from pdserve.controller.registry import Registry, WorkerRecord
from pdserve.router.router import Router

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class Lifecycle:
    def __init__(
        self, config: ServeConfig, registry: Registry, router: Router, metrics: ControllerMetrics, me, notify
    ) -> None:
        self.config, self.registry, self.router, self.metrics = config, registry, router, metrics
        self.call_timeout_s = config.controller.call_timeout_s
        self.me = me  # this controller's own handle, handed to workers and frontends
        self.notify = notify
        self.peers: dict[str, object] = {}  # worker id -> PeerInfo
        self.fronts = Frontends(config, self._spawn, self._failed)
        self.last_failure: str | None = None
        self._failures = 0
        self._not_before = 0.0  # backoff after a failed start
        self._tasks: set[asyncio.Task] = set()
        self.stopped = False
        self._wiring = asyncio.Lock()
        self.migrations = Migrations(config, registry, metrics)

    def _failed(self, what: str) -> None:
        self.last_failure = what

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _changed(self) -> None:
        self.registry.version += 1
        self.notify()

    # ---- discovery after a (re)start ----------------------------------------------------------------
    async def discover(self, serve_http: bool) -> None:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        workers = [n for n in names if n.startswith(f"{self.config.name}.worker.")]
        infos = await asyncio.gather(*(self._adopt(n) for n in workers), return_exceptions=True)
        adopted = [i for i in infos if i is not None and not isinstance(i, BaseException)]
        if adopted:
            log.info("controller adopted %d running workers: %s", len(adopted), ", ".join(adopted))
            notes = await asyncio.gather(
                *(
                    asyncio.wait_for(self.registry.workers[w].handle.note.remote(), self.call_timeout_s)
                    for w in adopted
                ),
                return_exceptions=True,
            )
            notes = [n for n in notes if isinstance(n, dict) and "targets" in n]
            if notes:
                newest = max(notes, key=lambda n: n["time"])
                self.registry.targets.update(newest["targets"])
                log.info("pool targets recovered from the workers: %s", self.registry.targets)
        await self.fronts.discover(names)
        self.reconcile(serve_http)

    async def _adopt(self, actor_name: str) -> str | None:
        handle = ray.get_actor(actor_name, namespace=NAMESPACE)
        try:
            info = await asyncio.wait_for(handle.info.remote(), self.call_timeout_s)
        except Exception as e:  # dead or hung: not part of the deployment any more
            log.warning("found %s but it does not answer (%r); stopping it", actor_name, e)
            ray.kill(handle)
            return None
        self.registry.note_existing_id(info.worker_id)
        rec = self.registry.add(WorkerRecord(info.worker_id, info.role, handle, node_id=info.node_id, pid=info.pid))
        rec.started_at = info.started_at
        self.peers[info.worker_id] = info.peer
        await handle.set_controller.remote(self.me)
        self._join(rec)
        return info.worker_id

    # ---- workers ------------------------------------------------------------------------------------
    def _resources(self, role: str) -> dict:
        cfg = self.config
        cpus = cfg.worker.cpus if cfg.worker.cpus is not None else 1
        opts: dict = {"num_cpus": cpus}
        if role in cfg.pools.resources:
            opts["resources"] = dict(cfg.pools.resources[role])
        if cfg.engine.device.startswith("cuda"):
            opts["num_gpus"] = 1
        else:
            # CPU KV caches on transparent huge pages: NIXL's same-host READ (CMA) moves them ~1.5-2x faster
            opts["runtime_env"] = {"env_vars": {"THP_MEM_ALLOC_ENABLE": "1"}}
        return opts

    def add_worker(self, role: str) -> WorkerRecord:
        from pdserve.workers.actors import ACTOR_CLASSES

        cfg = self.config
        worker_id = self.registry.new_id(role)
        engine = cfg.engine.replace(device="cuda") if cfg.engine.device.startswith("cuda") else cfg.engine
        options = cfg.worker
        if options.torch_threads is None and not cfg.address:  # one machine: share its cores
            options = options.replace(torch_threads=max(1, (os.cpu_count() or 1) // max(1, cfg.pools.total)))
        handle = (
            ACTOR_CLASSES[role]
            .options(
                name=worker_actor_name(cfg.name, worker_id),
                namespace=NAMESPACE,
                lifetime="detached",
                **self._resources(role),
            )
            .remote(worker_id, engine, options, cfg.kv, cfg.migration, cfg.routing.max_waiting_per_worker)
        )
        rec = self.registry.add(WorkerRecord(worker_id, role, handle))
        self.notify()
        self._spawn(self._start_worker(rec))
        return rec

    async def _start_worker(self, rec: WorkerRecord) -> None:
        try:
            # creation waits for resources (a new node from Ray's or KubeRay's autoscaler) up to the timeout
            peer = await asyncio.wait_for(rec.handle.start.remote(), self.config.controller.worker_start_timeout_s)
            info = await asyncio.wait_for(rec.handle.info.remote(), self.call_timeout_s)
            rec.node_id, rec.pid = info.node_id, info.pid
            async with self._wiring:  # one join at a time: each pair of workers is wired exactly once
                others = [r for r in self.registry.workers.values() if r.worker_id in self.peers]
                await asyncio.wait_for(rec.handle.add_peers.remote(list(self.peers.values())), self.call_timeout_s)
                await asyncio.gather(
                    *(asyncio.wait_for(o.handle.add_peers.remote([peer]), self.call_timeout_s) for o in others),
                    return_exceptions=True,  # a peer dying meanwhile is the watcher's business
                )
                self.peers[rec.worker_id] = peer
            await rec.handle.set_controller.remote(self.me)
        except Exception as e:
            self._start_failed(rec, e)
            return
        if rec.state != "starting":  # removed while starting
            return
        self._failures = 0
        self._join(rec)

    def _start_failed(self, rec: WorkerRecord, error: BaseException) -> None:
        self._failures += 1
        delay = RETRY_BACKOFF_S[min(self._failures, len(RETRY_BACKOFF_S)) - 1]
        self._not_before = time.monotonic() + delay
        self.last_failure = f"{rec.worker_id}: {type(error).__name__}: {error}"
        log.error("worker %s failed to start (%s); retrying in %.0fs", rec.worker_id, self.last_failure, delay)
        self.mark_dead(rec.worker_id, "start_failed")

    def _join(self, rec: WorkerRecord) -> None:
        rec.state = "ready"
        rec.last_report = time.monotonic()
        self.router.register(rec.worker_id, rec.role)
        self._changed()
        self._spawn(self._watch_worker(rec))
        rec.handle.keep_note.remote(self.note())

    def note(self) -> dict:
        return {"targets": dict(self.registry.targets), "time": time.time()}

    def publish_targets(self) -> None:
        """Replicate the pool targets on every live worker (see `keep_note`)."""
        note = self.note()
        for rec in self.registry.workers.values():
            if rec.state in ("ready", "draining"):
                rec.handle.keep_note.remote(note)

    async def _watch_worker(self, rec: WorkerRecord) -> None:
        try:
            await rec.handle.wait_closed.remote()
            cause = "exited"
        except Exception:  # RayActorError: the process died
            cause = "actor_died"
        self.mark_dead(rec.worker_id, cause)

    def mark_dead(self, worker_id: str, cause: str) -> None:
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state == "dead":
            return
        if rec.state != "draining" and cause != "exited":
            log.error("worker %s (%s) is dead: %s", worker_id, rec.role, cause)
            self.metrics.worker_deaths.labels(rec.role, cause).inc()
            if not self.config.failure.replace_dead_workers and cause != "start_failed":
                self.registry.targets[rec.role] = max(0, self.registry.targets[rec.role] - 1)
                self.publish_targets()
        rec.state = "dead"
        rec.last_report = time.monotonic()
        self.router.remove(worker_id)
        self.peers.pop(worker_id, None)
        try:
            ray.kill(rec.handle)  # a hung (not dead) worker must not come back
        except Exception:  # already gone
            pass
        self._changed()

    def reconcile(self, serve_http: bool) -> None:
        """Start missing workers (after any backoff) and drain surplus ones; start missing frontends."""
        if self.stopped:
            return
        for role, n in self.registry.missing().items():
            if n > 0 and time.monotonic() >= self._not_before:
                for _ in range(n):
                    self.add_worker(role)
            elif n < 0:
                for rec in self._removal_order(role)[:-n]:
                    self._spawn(self.drain(rec.worker_id))
        if serve_http:
            self.fronts.reconcile()

    def _removal_order(self, role: str) -> list[WorkerRecord]:
        """Who leaves first: fewest running requests, then the fewest cached blocks (least to lose)."""

        def cost(rec: WorkerRecord):
            s = rec.stats
            view = self.router.views.get(rec.worker_id)
            return (rec.state == "ready", getattr(s, "num_running", 0), getattr(view, "num_cached_blocks", 0))

        return sorted(self.registry.live(role), key=cost)

    async def remove(self, worker_id: str) -> None:
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state == "dead":
            raise ValueError(f"no live worker {worker_id!r} in deployment {self.config.name!r}")
        if rec.state in ("starting", "ready"):
            self.registry.targets[rec.role] = max(0, self.registry.targets[rec.role] - 1)
            self.publish_targets()
        await self.drain(worker_id)

    async def drain(self, worker_id: str) -> None:
        """Leave the router at once; wait for the worker's requests and handoffs to finish; stop it."""
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state in ("draining", "dead"):
            return
        rec.replace = False
        if rec.state == "starting":
            self.mark_dead(worker_id, "exited")
            return
        rec.state = "draining"
        self.router.remove(worker_id)
        self._changed()
        try:
            deadline = time.monotonic() + self.config.controller.drain_timeout_s
            if self.config.migration.drain_mode == "migrate" and rec.role in DECODERS:
                await self.migrations.drain(worker_id, deadline)  # what cannot move finishes here
            await asyncio.wait_for(rec.handle.drain.remote(), max(1.0, deadline - time.monotonic()))
            leak = await asyncio.wait_for(rec.handle.leak_report.remote(), self.call_timeout_s)
            if leak:
                log.error("worker %s drained but still holds KV blocks: %s", worker_id, leak)
            await asyncio.wait_for(rec.handle.shutdown.remote(), self.call_timeout_s)
        except Exception as e:  # it died or hung while draining: stop it anyway
            log.warning("draining %s ended early: %r", worker_id, e)
        self.mark_dead(worker_id, "exited")

    def at_target(self, serve_http: bool) -> bool:
        ready = [r for r in self.registry.workers.values() if r.state == "ready"]
        counts = {role: sum(r.role == role for r in ready) for role in ROLES}
        workers_ok = all(counts[role] >= n for role, n in self.registry.targets.items())
        return workers_ok and (not serve_http or self.fronts.all_ready())

    async def shutdown(self) -> None:
        self.stopped = True
        self.registry.targets = {role: 0 for role in ROLES}
        handles = [r.handle for r in self.registry.workers.values() if r.state != "dead"]
        handles += self.fronts.take_all()
        await asyncio.gather(
            *(asyncio.wait_for(h.shutdown.remote(), self.call_timeout_s) for h in handles), return_exceptions=True
        )
        for h in handles:
            try:
                ray.kill(h)
            except Exception:  # already gone
                pass
        for rec in self.registry.workers.values():
            rec.state = "dead"
        self._changed()
