"""The request body's size (413) and arrival time (408), enforced as it is read, before anything parses it:
a declared Content-Length over the limit is refused before the app runs; a chunked body is counted as it
streams in."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.api.errors import APIError, error_response
from pdserve.config import RequestLimits

CLOSE = {"Connection": "close"}  # the rest of a refused body is never read: the connection cannot be reused
DRAIN_FACTOR = 4  # a refused body is read and dropped up to this many times the limit (see `BodyLimits`)


class Refused(Exception):
    """Raised by the limited `receive` through the app (no handler catches it) up to `BodyLimits`."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class BodyLimits:
    """ASGI middleware. Once the whole body has arrived, `receive` is passed through untouched (SSE
    responses wait on it for the client's disconnect)."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app, self.max_bytes, self.timeout_s = app, limits.max_body_bytes, limits.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        body = _Body(receive, self.max_bytes, self.timeout_s)
        started = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise Refused(body.too_large())
            await self.app(scope, body.receive, noting_send)
        except Refused as refused:
            if started:  # cannot happen while routes read their body before answering; cut the connection
                raise
            # A client still sending would get a reset instead of the answer: read and drop the rest of the
            # body first (bounded), unless it waits for 100-continue, i.e. sends nothing before our answer.
            if refused.error.status == 413 and headers.get(b"expect", b"").lower() != b"100-continue":
                await body.drain()
            await error_response(refused.error)(scope, receive, send)


class _Body:
    """The request body as the app reads it: `receive` raises `Refused` past the size or the deadline, which
    is for the whole body (trickling bytes buys no time)."""

    def __init__(self, receive: Receive, max_bytes: int, timeout_s: float) -> None:
        self._receive, self.max_bytes, self.timeout_s = receive, max_bytes, timeout_s
        self._loop = asyncio.get_running_loop()
        self.deadline = self._loop.time() + timeout_s
        self.received = 0
        self.complete = False

    def too_large(self) -> APIError:
        message = f"the request body is larger than {self.max_bytes} bytes (frontend.limits.max_body_bytes)"
        return APIError(413, message, code="request_too_large", headers=CLOSE)

    async def _next(self) -> Message:
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - self._loop.time()))
        except asyncio.TimeoutError:
            message = f"the request body did not arrive within {self.timeout_s:g} s (frontend.limits.body_timeout_s)"
            raise Refused(APIError(408, message, code="request_timeout", headers=CLOSE)) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True  # http.disconnect
        return message

    async def receive(self) -> Message:
        if self.complete:
            return await self._receive()
        message = await self._next()
        if self.received > self.max_bytes:
            raise Refused(self.too_large())
        return message

    async def drain(self) -> None:
        """Read and drop what is left of the body, until the deadline or `DRAIN_FACTOR` x max_bytes in all."""
        try:
            while not self.complete and self.received <= DRAIN_FACTOR * self.max_bytes:
                await self._next()
        except Refused:
            pass
