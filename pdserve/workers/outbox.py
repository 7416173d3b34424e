"""A worker's token outboxes, one per consumer (frontend): each request's deltas go to the frontend that
asked for it, so several frontends long-polling one worker never take each other's tokens. A consumer that
stops polling (its frontend died) is found by `stale`, so its requests can be aborted and their blocks freed.
"""

from __future__ import annotations

import asyncio
import time

from pdserve.protocol import TokenDelta


class Outboxes:
    def __init__(self) -> None:
        self._boxes: dict[str, list[TokenDelta]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._last_poll: dict[str, float] = {}
        self._consumer: dict[str, str] = {}  # request id -> consumer

    def register(self, request_id: str, consumer: str) -> None:
        self._consumer[request_id] = consumer
        self._last_poll.setdefault(consumer, time.monotonic())

    def consumer_of(self, request_id: str) -> str:
        return self._consumer.get(request_id, "")

    def forget(self, request_id: str) -> None:
        self._consumer.pop(request_id, None)

    def put(self, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            consumer = self._consumer.get(d.request_id, "")
            if d.finished:
                self._consumer.pop(d.request_id, None)
            self._boxes.setdefault(consumer, []).append(d)
            self._event(consumer).set()

    def _event(self, consumer: str) -> asyncio.Event:
        event = self._ready.get(consumer)
        if event is None:
            event = self._ready[consumer] = asyncio.Event()
        return event

    async def poll(self, consumer: str, timeout_s: float) -> list[TokenDelta]:
        """Everything for `consumer` since its last poll; waits up to `timeout_s` for something."""
        self._last_poll[consumer] = time.monotonic()
        if not self._boxes.get(consumer):
            try:
                await asyncio.wait_for(self._event(consumer).wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
            finally:
                self._last_poll[consumer] = time.monotonic()
        out = self._boxes.pop(consumer, [])
        self._event(consumer).clear()
        return out

    def stale(self, timeout_s: float) -> dict[str, list[str]]:
        """Consumers not polling for `timeout_s` -> their unfinished requests; they are forgotten here."""
        now = time.monotonic()
        gone = [c for c, t in self._last_poll.items() if c and now - t > timeout_s]
        out = {}
        for consumer in gone:
            out[consumer] = [rid for rid, c in self._consumer.items() if c == consumer]
            for rid in out[consumer]:
                del self._consumer[rid]
            self._last_poll.pop(consumer, None)
            self._boxes.pop(consumer, None)
            self._ready.pop(consumer, None)
        return out
