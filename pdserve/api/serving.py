"""What completions and chat share: request parsing, admission, fan-out into choices, and running a
`Generation` as a streamed (SSE) or whole JSON response."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from pdserve.api.errors import APIError, bad_request, from_validation_errors
from pdserve.api.generation import Choice, Generation
from pdserve.api.logprobs import TokenStrings
from pdserve.api.protocol import SamplingRequest, param_of, with_seed
from pdserve.api.sse import EventStream, sse_body, unless_disconnected
from pdserve.engine_client import EngineClient
from pdserve.metrics import Metrics
from pdserve.model_info import ModelInfo
from pdserve.protocol import SamplingParams


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
    strings: TokenStrings = field(init=False)

    def __post_init__(self) -> None:
        self.strings = TokenStrings(self.info.tokenizer)

    def check_model(self, name: str) -> None:
        if name != self.served_model_name:
            raise APIError(
                404, f"The model `{name}` does not exist (this server serves `{self.served_model_name}`)",
                param="model", code="model_not_found",
            )  # fmt: skip


async def parse_body(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The JSON body as `schema`, whatever the Content-Type; every problem is a 400 naming the field."""
    raw = await request.body()
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None


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


def fan_out(prefix: str, prompts: list[list[int]], params: list[SamplingParams], n: int) -> list[Choice]:
    """prompts x n choices, indexed as OpenAI does (prompt_index * n + sample_index)."""
    choices = []
    for p, (ids, prm) in enumerate(zip(prompts, params)):
        for i in range(n):
            index = p * n + i
            choices.append(Choice(index, i, f"{prefix}-{index}", ids, with_seed(prm, i)))
    return choices


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
