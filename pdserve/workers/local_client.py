"""LocalClient: the `EngineClient` over one in-process engine on an `EngineThread` (tests, baseline).

Each engine step's deltas reach the asyncio loop in one `call_soon_threadsafe` call and are routed there
to per-request queues; the routing table is touched only on the asyncio loop's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine_client import Overloaded, ServiceUnavailable
from pdserve.protocol import SamplingParams, TokenDelta
from pdserve.workers.engine_thread import EngineThread

logger = logging.getLogger(__name__)

_LIVENESS_POLL_S = 0.5  # how often the watchdog checks that the engine thread is still alive


class LocalClient:
    """One engine in this process. `max_queued` bounds unfinished requests; beyond it `Overloaded`."""

    def __init__(self, config: EngineConfig | None = None, max_queued: int = 256, health_timeout: float = 5.0) -> None:
        if max_queued <= 0:
            raise ValueError(f"max_queued must be positive, got {max_queued!r}")
        self.engine = LLMEngine(config or EngineConfig())
        self.info = self.engine.info
        self.max_queued = max_queued
        self.health_timeout = health_timeout
        self._streams: dict[str, asyncio.Queue] = {}  # unfinished requests; only the asyncio thread touches it
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task | None = None
        self._health_ids = itertools.count()
        self.engine_thread = EngineThread(self.engine, self._on_outputs, name="pdserve-local-engine")

    # ---- engine thread -> asyncio loop -----------------------------------------------------------
    def _on_outputs(self, deltas: list[TokenDelta]) -> None:
        """Engine thread, once per step: hand the whole batch to the asyncio loop in one call."""
        aloop = self._aloop
        if aloop is None:
            return
        try:
            aloop.call_soon_threadsafe(self._route, deltas)
        except RuntimeError:  # the asyncio loop is closed: nobody is listening any more
            pass

    def _route(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            queue = self._streams.get(d.request_id)
            if queue is not None:  # None: the stream was closed and its abort is on the way
                queue.put_nowait(d)

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._aloop is not loop:
            if self._streams:
                raise RuntimeError("LocalClient is serving requests on another event loop")
            self._aloop = loop
            self._watchdog = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Fail every open stream once the engine thread dies (streams registered before an add that
        succeeded are all in `_streams` by then, so none waits forever)."""
        while self.engine_thread.alive:
            await asyncio.sleep(_LIVENESS_POLL_S)
        error = ServiceUnavailable(f"the engine thread stopped ({self.engine_thread.error!r})")
        for queue in self._streams.values():
            queue.put_nowait(error)

    # ---- EngineClient -------------------------------------------------------------------------
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None
    ):
        return self._stream(request_id, prompt_token_ids, params, cache_salt, admit=True)

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None, admit: bool
    ):
        self._bind()
        if not self.engine_thread.alive:
            raise ServiceUnavailable(f"the engine thread is not running ({self.engine_thread.error!r})")
        if admit and len(self._streams) >= self.max_queued:
            raise Overloaded(f"{len(self._streams)} requests in flight (max_queued={self.max_queued})", retry_after=1.0)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        queue: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue  # registered before the engine can produce its first delta
        finished = False
        try:
            await self.engine_thread.call(
                lambda e: e.add_request(request_id, prompt_token_ids, params, cache_salt=cache_salt)
            )
            while not finished:
                delta = await queue.get()
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finished
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.engine_thread.alive:
                # Closed early (client gone, cancelled, error): commands run in order, so this abort runs
                # after the add even when the add is still queued. Fire and forget: abort cannot fail.
                self.engine_thread.submit(lambda e: e.abort(request_id))

    async def migrate(self, request_id: str, target_worker: str | None) -> list[dict]:
        raise ValueError("live migration moves requests between workers; this server runs one local engine")

    async def check_health(self) -> None:
        """Liveness: the engine thread runs (a broken engine stops it for good)."""
        if not self.engine_thread.alive:
            raise ServiceUnavailable(f"the engine thread is not running ({self.engine_thread.error!r})")

    async def check_ready(self) -> None:
        await self.check_health()

    async def stats(self) -> dict:
        """{"workers": [{worker, role, running, waiting, kv_usage, num_free_blocks, num_blocks}]}."""

        def snapshot(e: LLMEngine) -> dict:
            return {
                "worker": "local",
                "role": "colocated",
                "running": len(e.scheduler.running),
                "waiting": len(e.scheduler.waiting),
                "kv_usage": e.blocks.usage,
                "num_free_blocks": e.blocks.num_free_blocks,
                "num_blocks": e.blocks.num_blocks,
            }

        try:
            workers = [await self.engine_thread.call(snapshot)]
        except ServiceUnavailable:  # the engine thread is stopped: no live worker
            workers = []
        return {"workers": workers, "num_streams": len(self._streams)}

    async def shutdown(self) -> None:
        """Idempotent: stop the engine thread; the watchdog then fails the open streams."""
        await asyncio.to_thread(self.engine_thread.stop)
