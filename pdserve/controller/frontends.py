"""The HTTP frontends' executor, run inside the controller: start frontend i (on port + i) when the plan asks,
adopt running ones after a restart, and drop one that dies or hangs (answers no ping for
`failure.frontend_timeout_s`) so the next plan replaces it. Their records live in the registry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray

from pdserve.config import NAMESPACE, ServeConfig, frontend_actor_name
from pdserve.controller.registry import FrontendRecord, Registry

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0


class Frontends:
    def __init__(self, config: ServeConfig, registry: Registry, spawn: Callable, failed: Callable[[str], None]) -> None:
        self.config, self.registry = config, registry
        self.call_timeout_s = config.controller.call_timeout_s
        self._spawn = spawn
        self._failed = failed

    @property
    def frontends(self):
        """index -> FrontendRecord (read-only: the registry's)."""
        return self.registry.frontends

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
            self.registry.add_frontend(FrontendRecord(index, handle, url, "ready", pid))
            self._spawn(self._watch(index, handle))

    def start(self, index: int) -> None:
        from pdserve.cluster.frontend import FrontendActor

        handle = FrontendActor.options(
            name=frontend_actor_name(self.config.name, index),
            namespace=NAMESPACE,
            lifetime="detached",
            resources=dict(self.config.frontend.resources),
        ).remote(self.config.model_dump(mode="json"), index)
        self.registry.add_frontend(FrontendRecord(index, handle))
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
            self.registry.forget_frontend(index, handle)  # the next plan tries again
            return
        self.registry.frontend_ready(index, handle, url, pid)
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
        self.registry.forget_frontend(index, handle)  # the next plan starts a replacement

    @staticmethod
    async def _closed(index: int, handle) -> None:
        try:
            await handle.wait_closed.remote()
        except Exception:  # RayActorError: it died
            log.error("frontend %d died; starting a new one", index)
