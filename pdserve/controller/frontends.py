"""The HTTP frontends' lifecycle, run inside the controller: start `frontend.frontends` frontend actors (frontend
i on port + i), adopt running ones after a restart, and replace one that dies or hangs (answers no ping for
`failure.frontend_timeout_s`: a stopped or wedged process that Ray still counts as alive)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray

from pdserve.config import NAMESPACE, ServeConfig, frontend_actor_name

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0


class Frontends:
    def __init__(self, config: ServeConfig, spawn: Callable, failed: Callable[[str], None]) -> None:
        self.config = config
        self.call_timeout_s = config.controller.call_timeout_s
        self._spawn = spawn
        self._failed = failed
        self.frontends: dict[int, dict] = {}  # index -> {"handle", "url", "state", "pid"}

    async def discover(self, actor_names: list[str]) -> None:
        for name in actor_names:
            if not name.startswith(f"{self.config.name}.frontend."):
                continue
            index = int(name.rsplit(".", 1)[1])
            handle = ray.get_actor(name, namespace=NAMESPACE)
            try:
                url = await asyncio.wait_for(handle.url.remote(), self.call_timeout_s)
                pid = await asyncio.wait_for(handle.pid.remote(), self.call_timeout_s)
            except Exception:  # a frontend that does not answer is replaced
                ray.kill(handle)
                continue
            self.frontends[index] = {"handle": handle, "url": url, "state": "ready", "pid": pid}
            self._spawn(self._watch(index, handle))

    def reconcile(self) -> None:
        for i in range(self.config.frontend.frontends):
            if i not in self.frontends:
                self._start(i)

    def all_ready(self) -> bool:
        return all(self.frontends.get(i, {}).get("state") == "ready" for i in range(self.config.frontend.frontends))

    def _start(self, index: int) -> None:
        from pdserve.cluster.frontend import FrontendActor

        handle = FrontendActor.options(
            name=frontend_actor_name(self.config.name, index),
            namespace=NAMESPACE,
            lifetime="detached",
            resources=dict(self.config.frontend.resources),
        ).remote(self.config.model_dump(mode="json"), index)
        self.frontends[index] = {"handle": handle, "url": None, "state": "starting", "pid": 0}
        self._spawn(self._run(index, handle))

    async def _run(self, index: int, handle) -> None:
        try:
            url = await asyncio.wait_for(handle.start.remote(), self.config.controller.worker_start_timeout_s)
            pid = await asyncio.wait_for(handle.pid.remote(), self.call_timeout_s)
        except Exception as e:
            self._failed(f"frontend {index}: {type(e).__name__}: {e}")
            log.error("frontend %d failed to start: %s: %s", index, type(e).__name__, e)
            try:
                ray.kill(handle)
            except Exception:  # already gone
                pass
            await asyncio.sleep(RESTART_BACKOFF_S)
            self.frontends.pop(index, None)  # the next reconcile tries again
            return
        self.frontends[index] = {"handle": handle, "url": url, "state": "ready", "pid": pid}
        await self._watch(index, handle)

    async def _watch(self, index: int, handle) -> None:
        timeout = self.config.failure.frontend_timeout_s
        closed = asyncio.ensure_future(self._closed(index, handle))
        try:
            while not closed.done():
                await asyncio.wait([closed], timeout=timeout / 2)
                if closed.done():
                    break
                try:
                    await asyncio.wait_for(asyncio.ensure_future(handle.pid.remote()), timeout)
                except asyncio.TimeoutError:
                    log.error("frontend %d answered no ping in %.1f s (hung); killing it", index, timeout)
                    try:
                        ray.kill(handle)  # wait_closed then fails: replaced as a death
                    except Exception:  # gone already
                        pass
                    await closed
                except Exception:  # died: wait_closed says so
                    await closed
        finally:
            closed.cancel()
        if self.frontends.get(index, {}).get("handle") is handle:
            self.frontends.pop(index, None)  # the next reconcile starts a replacement

    @staticmethod
    async def _closed(index: int, handle) -> None:
        try:
            await handle.wait_closed.remote()
        except Exception:  # RayActorError: it died
            log.error("frontend %d died; starting a new one", index)

    def rows(self) -> list[dict]:
        rows = sorted(self.frontends.items())
        return [{"index": i, "url": f["url"], "state": f["state"], "pid": f["pid"]} for i, f in rows]

    def take_all(self) -> list:
        """Every frontend's handle, forgotten here (for shutdown)."""
        handles = [f["handle"] for f in self.frontends.values()]
        self.frontends.clear()
        return handles
