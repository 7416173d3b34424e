"""The seam between the HTTP layer and whatever generates tokens (one local engine, or the Ray cluster).

Contract: the API server validates and tokenizes, then calls `generate`, which yields `TokenDelta`s for
one request until one has `finished=True`. Closing the iterator early (client gone) must abort the request
everywhere it runs and free its KV blocks; the engine client owns that cleanup. `Overloaded` raised before the
first delta means "not admitted" (HTTP 429/503); `ServiceUnavailable` (a dead worker or engine) is a 503 before
the first token and an SSE error event after; any other exception is a bug (500).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from pdserve.model_info import ModelInfo
from pdserve.protocol import SamplingParams, TokenDelta


class Overloaded(Exception):
    """The request was not admitted: queues are full. `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class ServiceUnavailable(Exception):
    """The data path is down (no live workers, engine failed); HTTP 503, or an SSE error event mid-stream."""


class WorkerFailed(ServiceUnavailable):
    """A worker serving the request died or its engine broke mid-request (a 503, never a 500)."""


class WorkerDraining(ServiceUnavailable):
    """A live worker refused a new request: it is draining or stopping (routed before it left the router).
    Not a death: the request is routed again."""


class EngineClient(Protocol):
    info: ModelInfo

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> AsyncIterator[TokenDelta]:
        """Stream one request's deltas; validation already passed. Requests share prefix-cached KV (on any
        worker, and in routing) only under the same `cache_salt`."""

    async def check_ready(self) -> None:
        """Raise ServiceUnavailable unless workers that can prefill and decode are ready now."""

    async def check_health(self) -> None:
        """Liveness: raise ServiceUnavailable unless this process can serve at all (its engine loop runs, or it
        reaches its controller). Never a data-path request."""

    async def migrate(self, request_id: str, target_worker: str | None) -> list[dict]:
        """Move the API request `request_id` (each of its choices) to another worker, live; one record per
        choice (outcome, stages, bytes, pause). KeyError if it is not running; ValueError for a bad target
        or a deployment that cannot migrate."""

    async def stats(self) -> dict:
        """Per-worker numbers for /health and gauges (running, waiting, kv usage, ...)."""

    async def shutdown(self) -> None:
        """Idempotent."""
