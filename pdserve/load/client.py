"""The one HTTP client of the load: an aiohttp session to one server. `send(body)` makes an OpenAI completion
or chat request, streamed (SSE) or not, and returns its `Outcome`; it never raises for what the server or the
network did. aiohttp costs about a third of httpx's CPU per request (0.35-0.39 ms vs 1.14-1.16 ms, measured on
this project's 2-core machine), and the load generator shares the cores with the service it measures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp

from pdserve.load.outcome import Outcome
from pdserve.load.sse import SSEParser

OnChunk = Callable[[int, dict], Awaitable[None]]  # (content chunks so far, the chunk): awaited per chunk


def completion_body(model: str, prompt, max_tokens: int, *, stream: bool = False, **extra) -> dict:
    """A greedy, ignore_eos completion (every answer has `max_tokens` tokens unless it failed)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return body | {"stream": stream} | extra


class Client:
    """Use as `async with Client(url) as c: out = await c.send(body)`. `limit`: most connections at once
    (0: no limit). `timeout_s`: aiohttp's total per request, a backstop under `send`'s own deadline."""

    def __init__(self, base_url: str, *, timeout_s: float = 300.0, limit: int = 0, headers: dict | None = None):
        self.base_url, self.timeout_s, self.limit, self.headers = base_url.rstrip("/"), timeout_s, limit, headers
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limit),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers=self.headers,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def send(
        self, body: dict, *, path: str | None = None, deadline_s: float | None = None,
        leave_after: int | None = None, on_chunk: OnChunk | None = None, tag=None, send_lag: float = 0.0,
    ) -> Outcome:  # fmt: skip
        """One request. `path`: /v1/chat/completions when the body has messages, else /v1/completions.
        `deadline_s`: past it the request is abandoned (`timeout`). `leave_after`: close a stream after that
        many content chunks (`left`: the server sees the client go). `on_chunk`: awaited after each chunk."""
        path = path or ("/v1/chat/completions" if "messages" in body else "/v1/completions")
        out = Outcome(t_send=time.perf_counter(), send_lag=send_lag, url=self.base_url, tag=tag)
        try:
            await asyncio.wait_for(self._send(path, body, out, leave_after, on_chunk), deadline_s)
        except asyncio.TimeoutError:  # the deadline's, or aiohttp's own
            out.kind, out.error = "timeout", f"no end within {deadline_s or self.timeout_s:.0f} s"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            out.kind, out.error = "dropped" if out.status else "no_response", repr(e)[:300]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            out.kind, out.error = "unreadable", repr(e)[:300]
        out.e2e = time.perf_counter() - out.t_send
        return out

    async def _send(self, path, body, out: Outcome, leave_after, on_chunk) -> None:
        async with self.session.post(self.base_url + path, json=body) as r:
            out.status, out.retry_after = r.status, r.headers.get("retry-after")
            if r.status != 200:
                _error(out, "http", _json(await r.read()))
                return
            if not body.get("stream"):
                payload = await r.json(content_type=None)
                out.request_id = payload["id"]
                for choice in payload["choices"]:
                    out.text += choice.get("text") or (choice.get("message") or {}).get("content") or ""
                    out.token_ids += choice.get("token_ids") or []
                out.ttft = time.perf_counter() - out.t_send
                _usage(out, payload.get("usage"), len(out.token_ids))
                out.kind = "ok"
                return
            await self._stream(r, out, leave_after, on_chunk)

    async def _stream(self, r: aiohttp.ClientResponse, out: Outcome, leave_after, on_chunk) -> None:
        parser, last, counted = SSEParser(), None, 0
        async for data in r.content.iter_any():
            for event in parser.feed(data):
                if event == "[DONE]":
                    out.kind = "ok"
                    return
                chunk = json.loads(event)
                if "error" in chunk:
                    _error(out, "sse", chunk)
                    return
                out.request_id = out.request_id or chunk.get("id", "")
                _usage(out, chunk.get("usage"), None)
                n, now = 0, time.perf_counter()
                for c in chunk.get("choices") or []:
                    text = c.get("text") or (c.get("delta") or {}).get("content") or ""
                    ids = c.get("token_ids") or []
                    out.text, out.token_ids = out.text + text, out.token_ids + ids
                    n += len(ids) or bool(text)  # without token ids a chunk counts as one token
                if not n:
                    continue
                if last is None:
                    out.ttft = now - out.t_send
                else:
                    out.itl += [(now - last) / n] * n
                last, out.chunks, counted = now, out.chunks + 1, counted + n
                if out.prompt_tokens is None:  # usage comes in the last chunk; until then, what was counted
                    out.output_tokens = counted
                if on_chunk is not None:
                    await on_chunk(out.chunks, chunk)
                if leave_after is not None and out.chunks >= leave_after:
                    r.close()  # drops the connection: the server sees the client leave
                    out.kind = "left"
                    return
        out.kind, out.error = "eof", "stream ended without [DONE]"

    async def get(self, path: str) -> tuple[int, bytes]:
        """A GET (status, body); raises aiohttp's errors."""
        async with self.session.get(self.base_url + path) as r:
            return r.status, await r.read()

    async def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, object]:
        """A POST of JSON (status, the decoded body or its text); raises aiohttp's errors."""
        async with self.session.post(self.base_url + path, json=body, headers=headers) as r:
            return r.status, _json(await r.read())


def get_json(url: str, timeout_s: float = 30.0):
    """A blocking GET of JSON, for set-up code outside an event loop (`/v1/models`)."""

    async def fetch():
        async with Client(url, timeout_s=timeout_s) as c:
            status, body = await c.get("")
            if status != 200:
                raise RuntimeError(f"GET {url}: {status} {body[:200]!r}")
            return json.loads(body)

    return asyncio.run(fetch())


def _usage(out: Outcome, usage: dict | None, counted: int | None) -> None:
    if usage:
        out.output_tokens = usage.get("completion_tokens", 0)
        out.prompt_tokens = usage.get("prompt_tokens")
        out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    elif counted is not None:
        out.output_tokens = counted


def _error(out: Outcome, kind: str, payload) -> None:
    out.kind = kind
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str):
        out.error_object, out.error = True, err["message"][:300]
        out.error_code = str(err.get("code") or err["type"])
    else:
        out.error = str(payload)[:300]


def _json(content: bytes):
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")
