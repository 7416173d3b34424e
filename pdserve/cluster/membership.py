"""A frontend's view of the deployment's workers, kept by long-polling the controller's `membership`.

New workers get an output poller at once; a worker that leaves (dead, or drained and gone) fails the
streams it still owed; a poll that fails on a dead actor is reported to the controller, so a death seen
here reaches routing without waiting for the controller's own watcher. A controller that answers nothing
for `controller_timeout_s` (stopped or wedged: Ray still counts it alive, so it never restarts it) is
killed from here, and Ray restarts it (its `max_restarts`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import ray

from pdserve.engine_client import ServiceUnavailable, WorkerFailed

log = logging.getLogger(__name__)


def last_line(error: BaseException) -> str:
    """The last line of an error's text (a Ray error carries the remote traceback before it)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


POLL_TIMEOUT_S = 1.0
MEMBERSHIP_WAIT_S = 5.0
CONTROLLER_LIVE_S = 15.0  # a membership answer this recent means the controller is reachable
PING_S = 5.0  # a ping of a silent controller: no answer in this long and it is hung


class Membership:
    def __init__(
        self, controller, deliver: Callable, worker_left: Callable[[str, str], None], controller_timeout_s: float = 30.0
    ) -> None:
        self.controller = controller
        self.controller_timeout_s = controller_timeout_s
        self.controller_kills = 0  # hung controllers killed from here
        self._deliver = deliver
        self._worker_left = worker_left
        self.workers: dict[str, tuple[str, object]] = {}  # worker id -> (role, handle), not dead
        self.ready_roles: set[str] = set()
        self.dead: set[str] = set()
        self.version = -1
        self.last_answer = 0.0
        self._pollers: dict[str, asyncio.Task] = {}
        self._follower: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._closed = False
        self.consumer = f"frontend-{uuid.uuid4().hex[:12]}"  # this client's outbox on every worker

    async def start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._apply(*await asyncio.wait_for(self.controller.membership.remote(-1, 0.0), timeout_s))
                break
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise ServiceUnavailable("the controller did not answer") from None
                await asyncio.sleep(0.5)
        self._follower = asyncio.ensure_future(self._follow())
        self._watchdog = asyncio.ensure_future(self._watch_controller())

    async def _follow(self) -> None:
        while not self._closed:
            try:
                ref = self.controller.membership.remote(self.version, MEMBERSHIP_WAIT_S)
                self._apply(*await asyncio.wait_for(ref, MEMBERSHIP_WAIT_S + 10))
            except asyncio.CancelledError:
                return
            except Exception as e:  # the controller restarting: keep serving with what we know, and retry
                log.warning("membership update failed (%r); retrying", e)
                await asyncio.sleep(0.5)

    async def _watch_controller(self) -> None:
        """Kill a controller that is alive to Ray but answers nothing: no membership answer for
        `controller_timeout_s` and no answer to a ping. A controller Ray is restarting does not answer either,
        so the timeout must exceed a restart (seconds); after a kill, the restart gets a whole timeout."""
        while not self._closed:
            await asyncio.sleep(1.0)
            if time.monotonic() - self.last_answer < self.controller_timeout_s:
                continue
            try:
                await asyncio.wait_for(asyncio.ensure_future(self.controller.ping.remote()), PING_S)
                self.last_answer = time.monotonic()
            except asyncio.TimeoutError:
                silent = time.monotonic() - self.last_answer
                log.error("the controller answered nothing for %.0f s (hung): killing it for Ray to restart", silent)
                try:
                    ray.kill(self.controller, no_restart=False)
                    self.controller_kills += 1
                except Exception as e:  # gone already
                    log.warning("could not kill the controller: %r", e)
                self.last_answer = time.monotonic()
            except asyncio.CancelledError:
                return
            except Exception:  # dead, or refused while restarting: Ray is on it
                pass

    def _apply(self, version: int, members: list, ready_roles: list[str]) -> None:
        self.version, self.last_answer = version, time.monotonic()
        self.ready_roles = set(ready_roles)
        current = {}
        for worker_id, role, state, handle in members:
            if worker_id in self.dead or state == "starting":  # not serving yet: nothing to poll or route
                continue
            current[worker_id] = (role, handle)
            if worker_id not in self._pollers:
                self._pollers[worker_id] = asyncio.ensure_future(self._poll(worker_id, handle))
        for worker_id in set(self.workers) - set(current):
            self._gone(worker_id, "left the deployment")
        self.workers = current

    def _gone(self, worker_id: str, reason: str) -> None:
        task = self._pollers.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.workers.pop(worker_id, None)
        self._worker_left(worker_id, reason)

    async def _poll(self, worker_id: str, handle) -> None:
        while not self._closed:
            try:
                deltas = await handle.poll_outputs.remote(POLL_TIMEOUT_S, self.consumer)
            except ray.exceptions.RayActorError as e:
                await self.worker_died(worker_id, e)
                return
            except asyncio.CancelledError:
                return
            except Exception:  # keep streaming for the other requests
                log.exception("poll_outputs from %s failed", worker_id)
                await asyncio.sleep(0.1)
                continue
            if deltas:
                self._deliver(worker_id, deltas)

    async def worker_died(self, worker_id: str, error: BaseException) -> None:
        """Seen dead here: stop using it, fail its streams, and tell the controller (awaited, so a retry's
        routing call comes after the controller dropped it)."""
        if worker_id in self.dead:
            return
        log.error("worker %s died: %s", worker_id, last_line(error))
        self.dead.add(worker_id)
        self._gone(worker_id, "died")
        try:
            await asyncio.wait_for(self.controller.worker_failed.remote(worker_id), 5.0)
        except Exception as e:  # the controller's watcher will see it too
            log.warning("could not tell the controller that %s died: %r", worker_id, e)

    def handle(self, worker_id: str):
        entry = self.workers.get(worker_id)
        if entry is None:
            raise WorkerFailed(f"worker {worker_id} is not in the deployment (dead or gone)")
        return entry[1]

    def live_handle(self, worker_id: str):
        entry = self.workers.get(worker_id)
        return None if entry is None else entry[1]

    async def controller_reachable(self) -> bool:
        if time.monotonic() - self.last_answer < CONTROLLER_LIVE_S:
            return True
        try:
            return await asyncio.wait_for(self.controller.ping.remote(), 2.0)
        except Exception:  # dead, restarting or unreachable
            return False

    async def stop(self) -> None:
        self._closed = True
        for task in [self._follower, self._watchdog, *self._pollers.values()]:
            if task is not None:
                task.cancel()
        self._pollers.clear()
