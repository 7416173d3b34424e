"""Routing calls from a frontend to the controller, batched per event-loop turn."""

from __future__ import annotations

import asyncio

from pdserve.protocol import RouteRequest
from pdserve.router.router import NoCapacity


class RouteBatcher:
    """Routing calls to the controller, batched: requests that arrive while a call is in flight go
    together in the next one, so a burst costs a few actor calls, and a lone request no added delay. A call
    not answered within `timeout_s` (a hung controller) fails its requests with TimeoutError."""

    def __init__(self, controller, timeout_s: float = 30.0) -> None:
        self.controller = controller
        self.timeout_s = timeout_s
        self._queue: list[tuple[RouteRequest, asyncio.Future]] = []
        self._busy = False

    async def route(self, req: RouteRequest):
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((req, fut))
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    ref = self.controller.route_batch.remote([r for r, _ in batch])
                    results = await asyncio.wait_for(asyncio.ensure_future(ref), self.timeout_s)
                except Exception as e:  # handed to each waiting request
                    results = [e] * len(batch)
                for (_, fut), result in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(result, asyncio.TimeoutError):
                        fut.set_exception(asyncio.TimeoutError())  # one instance per request (tracebacks)
                    elif isinstance(result, BaseException) and not isinstance(result, NoCapacity):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._busy = False
