"""What completions and chat share: request parsing, admission, fan-out into choices, and running a
`Generation` as a streamed (SSE) or whole JSON response."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from pdserve.api.errors import APIError, bad_request, from_validation_errors
from pdserve.api.generation import Choice, Generation
from pdserve.api.logprobs import TokenStrings
from pdserve.api.protocol import SamplingRequest, param_of, with_seed
from pdserve.api.schemas import RequestModels
from pdserve.api.sse import EventStream, sse_body, unless_disconnected
from pdserve.config import RequestLimits
from pdserve.engine_client import EngineClient
from pdserve.metrics import Metrics
from pdserve.model_info import ModelInfo
from pdserve.protocol import SamplingParams

T = TypeVar("T")


def _number(literal: str) -> float | int:
    value = float(literal)
    if not math.isfinite(value):  # 1e999: a DecodeError
        raise ValueError("number out of range")
    return int(value) if value.is_integer() else value


# JSON has one number type, and JSON Schema's "integer" includes 2.0: a literal with no fraction is an int
# here too, so an integer field takes it (float fields take ints).
_JSON = msgspec.json.Decoder(float_hook=_number)


class Admission:
    """At most `limit` generation requests in flight at this API server; beyond it, 429."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        if limit <= 0:
            raise ValueError(f"max_pending must be positive, got {limit!r}")
        self.limit = limit
        self.in_flight = 0
        self._metrics = metrics

    def acquire(self) -> Callable[[], None]:
        """Take a slot or raise 429; returns the idempotent release."""
        if self.in_flight >= self.limit:
            raise APIError(
                429,
                f"too many requests in flight ({self.limit}); retry later",
                code="too_many_pending_requests",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self._metrics.num_requests_running.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self._metrics.num_requests_running.dec()

        return release


@dataclass
class ServingContext:
    client: EngineClient
    info: ModelInfo
    served_model_name: str
    metrics: Metrics
    admission: Admission
    limits: RequestLimits = field(default_factory=RequestLimits)
    strings: TokenStrings = field(init=False)
    models: RequestModels = field(init=False)  # what the routes validate bodies with (and document)
    # One thread: encoding a prompt near the body limit takes seconds, which must not stall the event loop
    # (other streams, probes); the Rust tokenizer releases the GIL meanwhile, but is not shared between threads.
    _tokenizer_thread: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.strings = TokenStrings(self.info.tokenizer)
        info = self.info
        self.models = RequestModels.build(self.limits, self.served_model_name, info.vocab_size, info.max_model_len)
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="pdserve-tokenizer")

    async def tokenize(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` (an encode of `info`) on the tokenizer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def check_model(self, name: str) -> None:
        if name != self.served_model_name:
            raise APIError(
                404, f"The model `{name}` does not exist (this server serves `{self.served_model_name}`)",
                param="model", code="model_not_found",
            )  # fmt: skip


async def parse_body(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The JSON body as `schema`; every problem is a 400 naming the field. A body without a Content-Type
    is read as JSON too (curl without -H); one declared as something else is a 415."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise APIError(415, f"Content-Type must be application/json, got {media!r}", code="unsupported_media_type")
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:  # msgspec, unlike json, refuses lone surrogates, which no UTF-8 response could echo
        data = _JSON.decode(raw)
    except msgspec.DecodeError as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    # raw NULs are invalid JSON already; an escaped one only a stop string may hold (it matches output text,
    # and a byte-level tokenizer can emit U+0000)
    if b"\\u0000" in raw and (where := _nul_at({k: v for k, v in data.items() if k != "stop"})) is not None:
        message = f"{where or 'a key'} contains a NUL character (U+0000), which only stop strings accept"
        raise bad_request(message, param=where or None)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None


def _nul_at(value, path: str = "") -> str | None:
    """The path (as `messages[0].content`) of the first string, or key, in `value` holding U+0000."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return path
            if (found := _nul_at(item, f"{path}.{key}" if path else key)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _nul_at(item, f"{path}[{i}]")) is not None:
                return found
    return None


def sampling_params(req: SamplingRequest, max_tokens: int, logprobs: int | None, aliases=None) -> SamplingParams:
    """SamplingParams from the request; a 400 names the request's parameter (`aliases`: engine -> API name)."""
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        message, param = str(e), param_of(e, aliases)
        word = message.split(" ", 1)[0]
        if param is not None and param != word:
            message = param + message[len(word) :]
        raise bad_request(message, param=param) from None


def validate_prompt(info: ModelInfo, ids: list[int], params: SamplingParams) -> None:
    try:
        info.validate(ids, params)
    except ValueError as e:
        raise bad_request(str(e), param="prompt" if "prompt" in str(e) else param_of(e)) from None


def fan_out(
    prefix: str, prompts: list[list[int]], params: list[SamplingParams], n: int, cache_salt: str | None = None
) -> list[Choice]:
    """prompts x n choices, indexed as OpenAI does (prompt_index * n + sample_index)."""
    choices = []
    for p, (ids, prm) in enumerate(zip(prompts, params)):
        for i in range(n):
            index = p * n + i
            choices.append(Choice(index, i, f"{prefix}-{index}", ids, with_seed(prm, i), cache_salt=cache_salt))
    return choices


def cache_salt(req: SamplingRequest, request: Request) -> str | None:
    """The caller's key's default salt (per tenant, set by the auth layer) with the body's `cache_salt`
    scoped under it: a body salt separates a tenant's requests further but never names another tenant's
    cache (a guessed "tenant:acme" from another key is "tenant:other/tenant:acme")."""
    default = getattr(request.state, "cache_salt_default", None)
    if req.cache_salt is None:
        return default
    return req.cache_salt if default is None else f"{default}/{req.cache_salt}"


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


async def run_generation(
    ctx: ServingContext,
    request: Request,
    choices: list[Choice],
    arrival: float,
    *,
    stream: bool,
    chunks: Callable[[Generation], AsyncIterator[BaseModel]],
    whole: Callable[[Generation], BaseModel],
) -> Response:
    """Admit, start every choice, then stream `chunks(gen)` as SSE or return `whole(gen)` as JSON."""
    release = ctx.admission.acquire()
    gen = Generation(ctx.client, choices, ctx.metrics, arrival)
    handed_off = False
    try:
        try:
            await unless_disconnected(request, gen.start())
        except ValueError as e:  # the engine client refused the request as invalid (e.g. larger than its KV cache)
            raise bad_request(str(e), param="prompt" if "prompt" in str(e) else None) from None
        if stream:
            response = EventStream(sse_body(request, gen, chunks(gen), release), on_close=lambda: _end(gen, release))
            handed_off = True  # from here the response owns the streams and the admission slot
            return response
        await unless_disconnected(request, gen.run())
        return JSONResponse(whole(gen).model_dump(mode="json"))
    finally:
        if not handed_off:
            _end(gen, release)


def _end(gen: Generation, release: Callable[[], None]) -> None:
    gen.close()
    release()


def now() -> tuple[float, int]:
    """(perf_counter for latency metrics, unix seconds for `created`)."""
    return time.perf_counter(), int(time.time())
