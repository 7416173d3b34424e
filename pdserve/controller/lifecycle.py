"""The lifecycle's executor, run inside the controller: it carries out the plan's actions (`reconcile.plan`)
through Ray and reports each outcome to the registry as an event: a start (wire peers, then ready), a drain
(leave the router, migrate, stop), a death, a shutdown. Every operation is idempotent: cleanup may run twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from pdserve.config import NAMESPACE, ROLES, ServeConfig, decode_capable
from pdserve.controller.frontends import Frontends
from pdserve.controller.metrics import ControllerMetrics
from pdserve.controller.migrations import Migrations
from pdserve.controller.reconcile import (
    Action,
    Desired,
    DrainWorker,
    KillWorker,
    StartFrontend,
    StartWorker,
    StopFrontend,
    StopWorker,
    plan,
)
from pdserve.controller.registry import Registry, WorkerRecord
from pdserve.controller.spawn import create_worker
from pdserve.router.router import Router

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class Lifecycle:
    def __init__(self, config: ServeConfig, registry: Registry, router: Router, metrics: ControllerMetrics, me) -> None:
        self.config, self.registry, self.router, self.metrics = config, registry, router, metrics
        self.call_timeout_s = config.controller.call_timeout_s
        self.me = me  # this controller's own handle, handed to workers and frontends
        self.serve_http = False  # set by `discover`: whether this controller runs the frontends
        self.fronts = Frontends(config, registry, self._spawn, self._failed)
        self.last_failure: str | None = None
        self._failures = 0
        self._not_before = 0.0  # backoff after a failed start
        self._tasks: set[asyncio.Task] = set()
        self._drains: dict[str, asyncio.Task] = {}
        self.stopped = False
        self._wiring = asyncio.Lock()
        self.migrations = Migrations(config, registry, metrics)

    def _failed(self, what: str) -> None:
        self.last_failure = what

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- discovery after a (re)start ----------------------------------------------------------------
    async def discover(self, serve_http: bool) -> None:
        self.serve_http = serve_http
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
                self.registry.restore_targets(max(notes, key=lambda n: n["time"])["targets"])
                log.info("pool targets recovered from the workers: %s", self.registry.targets)
        await self.fronts.discover(names)
        self.reconcile()

    async def _adopt(self, actor_name: str) -> str | None:
        handle = ray.get_actor(actor_name, namespace=NAMESPACE)
        try:
            info = await asyncio.wait_for(handle.info.remote(), self.call_timeout_s)
        except Exception as e:  # dead or hung: not part of the deployment any more
            log.warning("found %s but it does not answer (%r); stopping it", actor_name, e)
            ray.kill(handle)
            return None
        self.registry.note_existing_id(info.worker_id)
        self.registry.add(
            WorkerRecord(
                info.worker_id, info.role, handle, node_id=info.node_id, pid=info.pid, started_at=info.started_at,
                peer=info.peer,
            )
        )  # fmt: skip
        await handle.set_controller.remote(self.me)
        self._join(info.worker_id)
        return info.worker_id

    # ---- the plan, carried out ----------------------------------------------------------------------
    def desired(self) -> Desired:
        return Desired(
            targets=self.registry.targets,
            frontends=self.config.frontend.frontends if self.serve_http else 0,
            leaving=frozenset(w for w, r in self.registry.workers.items() if r.leaving),
            may_start=time.monotonic() >= self._not_before,
            stopping=self.stopped,
        )

    def reconcile(self) -> list[Action]:
        """Plan against the registry and carry out what can be done now (drains and starts go on as tasks)."""
        if self.stopped:
            return []
        actions = plan(self.desired(), self.registry.workers.values(), self.registry.frontends, self._unique_blocks)
        for action in actions:
            if isinstance(action, StartWorker):
                self._start(action.role)
            elif isinstance(action, DrainWorker):
                self._drain(action.worker_id)
            elif isinstance(action, KillWorker):
                self.mark_dead(action.worker_id, "exited")
            elif isinstance(action, StartFrontend):
                self.fronts.start(action.index)
        return actions

    def _unique_blocks(self, worker_id: str) -> int:
        return self.router.index.unique_blocks(worker_id)

    # ---- starting a worker ----------------------------------------------------------------------------
    def _start(self, role: str) -> None:
        worker_id = self.registry.new_id(role)
        handle = create_worker(self.config, worker_id, role)
        self.registry.add(WorkerRecord(worker_id, role, handle))
        self._spawn(self._start_worker(worker_id, handle))

    async def _start_worker(self, worker_id: str, handle) -> None:
        try:
            # creation waits for resources (a new node from Ray's or KubeRay's autoscaler) up to the timeout
            peer = await asyncio.wait_for(handle.start.remote(), self.config.controller.worker_start_timeout_s)
            info = await asyncio.wait_for(handle.info.remote(), self.call_timeout_s)
            self.registry.set_info(worker_id, node_id=info.node_id, pid=info.pid)
            async with self._wiring:  # one join at a time: each pair of workers is wired exactly once
                others = [r for r in self.registry.workers.values() if r.peer is not None]
                await asyncio.wait_for(handle.add_peers.remote([r.peer for r in others]), self.call_timeout_s)
                await asyncio.gather(
                    *(asyncio.wait_for(o.handle.add_peers.remote([peer]), self.call_timeout_s) for o in others),
                    return_exceptions=True,  # a peer dying meanwhile is the watcher's business
                )
                self.registry.set_info(worker_id, peer=peer)
            await handle.set_controller.remote(self.me)
        except Exception as e:
            self._start_failed(worker_id, e)
            return
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state != "starting":  # removed while starting
            return
        self._failures = 0
        self._join(worker_id)

    def _start_failed(self, worker_id: str, error: BaseException) -> None:
        self._failures += 1
        delay = RETRY_BACKOFF_S[min(self._failures, len(RETRY_BACKOFF_S)) - 1]
        self._not_before = time.monotonic() + delay
        self.last_failure = f"{worker_id}: {type(error).__name__}: {error}"
        log.error("worker %s failed to start (%s); retrying in %.0fs", worker_id, self.last_failure, delay)
        self.mark_dead(worker_id, "start_failed")

    def _join(self, worker_id: str) -> None:
        rec = self.registry.set_state(worker_id, "ready")  # the registry's feed puts it in the router
        if rec is None:
            return
        self._spawn(self._watch_worker(worker_id, rec.handle))
        rec.handle.keep_note.remote(self.note())

    def note(self) -> dict:
        return {"targets": self.registry.targets, "time": time.time()}

    def publish_targets(self) -> None:
        """Replicate the pool targets on every live worker (see `keep_note`)."""
        note = self.note()
        for rec in self.registry.workers.values():
            if rec.state in ("ready", "draining"):
                rec.handle.keep_note.remote(note)

    # ---- leaving ----------------------------------------------------------------------------------------
    async def _watch_worker(self, worker_id: str, handle) -> None:
        try:
            await handle.wait_closed.remote()
            cause = "exited"
        except Exception:  # RayActorError: the process died
            cause = "actor_died"
        self.mark_dead(worker_id, cause)

    def mark_dead(self, worker_id: str, cause: str) -> None:
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state == "dead":
            return
        if rec.state != "draining" and cause != "exited":
            log.error("worker %s (%s) is dead: %s", worker_id, rec.role, cause)
            self.metrics.worker_deaths.labels(rec.role, cause).inc()
            if not self.config.failure.replace_dead_workers and cause != "start_failed" and not rec.leaving:
                self.registry.shrink_target(rec.role)
                self.publish_targets()
        self.registry.set_state(worker_id, "dead")  # out of the router and the peers' list
        try:
            ray.kill(rec.handle)  # a hung (not dead) worker must not come back
        except Exception:  # already gone
            pass

    async def remove(self, worker_id: str) -> None:
        """Ask `worker_id` to leave (its role's target shrinks by one) and wait until it has drained."""
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state == "dead":
            raise ValueError(f"no live worker {worker_id!r} in deployment {self.config.name!r}")
        if rec.state in ("starting", "ready") and not rec.leaving:
            self.registry.shrink_target(rec.role)
            self.publish_targets()
        self.registry.ask_to_leave(worker_id)
        self.reconcile()
        if (task := self._drains.get(worker_id)) is not None:
            await asyncio.shield(task)

    def _drain(self, worker_id: str) -> None:
        """Leave the router at once (the registry's feed); the rest goes on as a task."""
        rec = self.registry.workers.get(worker_id)
        if rec is None or rec.state != "ready":
            return
        self.registry.ask_to_leave(worker_id)
        self.registry.set_state(worker_id, "draining")
        task = self._drains[worker_id] = self._spawn(self._drain_worker(rec))
        task.add_done_callback(lambda _: self._drains.pop(worker_id, None))

    async def _drain_worker(self, rec: WorkerRecord) -> None:
        """Wait for the worker's requests and handoffs to finish (moving them when migrating); stop it."""
        worker_id, handle = rec.worker_id, rec.handle
        try:
            deadline = time.monotonic() + self.config.controller.drain_timeout_s
            if self.config.migration.drain_mode == "migrate" and decode_capable(rec.role):
                await self.migrations.drain(worker_id, deadline)  # what cannot move finishes here
            await asyncio.wait_for(handle.drain.remote(), max(1.0, deadline - time.monotonic()))
            leak = await asyncio.wait_for(handle.leak_report.remote(), self.call_timeout_s)
            if leak:
                log.error("worker %s drained but still holds KV blocks: %s", worker_id, leak)
            await asyncio.wait_for(handle.shutdown.remote(), self.call_timeout_s)
        except Exception as e:  # it died or hung while draining: stop it anyway
            log.warning("draining %s ended early: %r", worker_id, e)
        self.mark_dead(worker_id, "exited")

    def at_target(self) -> bool:
        ready = [r for r in self.registry.workers.values() if r.state == "ready"]
        counts = {role: sum(r.role == role for r in ready) for role in ROLES}
        workers_ok = all(counts[role] >= n for role, n in self.registry.targets.items())
        return workers_ok and self.registry.frontends_ready(self.desired().frontends)

    async def shutdown(self) -> None:
        self.stopped = True
        actions = plan(self.desired(), self.registry.workers.values(), self.registry.frontends)
        self.registry.restore_targets({role: 0 for role in ROLES})
        workers = [self.registry.workers[a.worker_id] for a in actions if isinstance(a, StopWorker)]
        fronts = [self.registry.forget_frontend(a.index) for a in actions if isinstance(a, StopFrontend)]
        handles = [r.handle for r in workers] + [f.handle for f in fronts if f is not None]
        await asyncio.gather(
            *(asyncio.wait_for(h.shutdown.remote(), self.call_timeout_s) for h in handles), return_exceptions=True
        )
        for h in handles:
            try:
                ray.kill(h)
            except Exception:  # already gone
                pass
        for rec in workers:
            self.registry.set_state(rec.worker_id, "dead")
