"""Server-sent events and client-disconnect handling for generation endpoints.

However a response ends (done, client gone mid-stream, a worker failure, server shutdown), the engine
streams are closed and the admission slot released exactly once, synchronously, in a `finally`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pdserve.api.errors import APIError, error_body
from pdserve.api.generation import Generation
from pdserve.engine_client import ServiceUnavailable

logger = logging.getLogger("pdserve.api")

T = TypeVar("T")
STATUS_KEY = "pdserve_status"  # request.state key: the status to count when it differs from the HTTP one
CLIENT_GONE = 499  # nginx's "client closed request"


class EventStream(StreamingResponse):
    """A text/event-stream response that closes its body and runs `on_close` however it ends (Starlette
    only cancels the sending task, which can leave the body suspended at a `yield`, or never started)."""

    def __init__(self, body: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # aclose() runs the body's own cleanup if it stopped at a yield (it never awaits); a body that
            # never started has no cleanup to run, hence `on_close` (idempotent) as well.
            await self.body_iterator.aclose()
            self._on_close()


def event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def sse_body(
    request: Request,
    gen: Generation,
    chunks: AsyncIterator[BaseModel],
    release: Callable[[], None],
) -> AsyncGenerator[str, None]:
    """`chunks` as SSE events, then `data: [DONE]`. A failure after the 200 was sent becomes an error
    event (then [DONE]), counted as 503 for a dead worker and 500 for a bug; a client that went away is
    counted as 499."""
    status = 200
    try:
        async for chunk in chunks:
            yield event(chunk)
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_GONE
        raise
    except ServiceUnavailable as e:  # a worker died mid-stream: the status line is already sent
        status = 503
        logger.warning("generation ended mid-stream: %s", e)
        err = APIError(503, f"the model service failed mid-stream: {e}", code="service_unavailable")
        yield event(error_body(err))
        yield "data: [DONE]\n\n"
    except Exception as e:  # a bug mid-stream: the status line is already sent
        status = 500
        logger.exception("generation failed mid-stream")
        err = APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")
        yield event(error_body(err))
        yield "data: [DONE]\n\n"
    finally:
        if status != 200:
            setattr(request.state, STATUS_KEY, status)
        gen.close()
        release()


async def wait_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so nothing else arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise a 499 APIError."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    setattr(request.state, STATUS_KEY, CLIENT_GONE)
    raise APIError(CLIENT_GONE, "client closed the connection", code="client_closed_request")
