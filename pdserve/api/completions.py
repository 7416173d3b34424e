"""POST /v1/completions: prompts in, `text_completion` objects (whole or streamed) out.

echo=true is supported without logprobs (the prompt text is prepended to each choice); with logprobs it
would need prompt logprobs, which the engine does not compute, so that combination is a 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pdserve.api.errors import bad_request
from pdserve.api.generation import Choice, Generation
from pdserve.api.logprobs import completion_logprobs
from pdserve.api.protocol import CompletionRequest
from pdserve.api.responses import CompletionChoice, CompletionResponse
from pdserve.api.serving import (
    ServingContext,
    cache_salt,
    fan_out,
    new_id,
    now,
    parse_body,
    run_generation,
    sampling_params,
    validate_prompt,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def create_completion(ctx: ServingContext, request: Request) -> Response:
    arrival, created = now()
    req: CompletionRequest = await parse_body(request, ctx.models.completion)
    ctx.check_model(req.model)
    req.check()
    prompts = req.prompts()
    if len(prompts) * req.n > ctx.limits.max_n:
        raise bad_request(f"a request has at most {ctx.limits.max_n} choices (prompts x n)", param="n")
    params = sampling_params(req, req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS, req.logprobs)
    token_lists = []
    for prompt in prompts:
        ids = await _encode(ctx, prompt)
        validate_prompt(ctx.info, ids, params)
        token_lists.append(ids)
    request_id = new_id("cmpl")
    choices = fan_out(request_id, token_lists, [params] * len(token_lists), req.n, cache_salt(req, request))
    echoes = _echo_texts(ctx, req, prompts, token_lists, params)
    view = _View(ctx, req, request_id, created, echoes)
    return await run_generation(ctx, request, choices, arrival, stream=req.stream, chunks=view.chunks, whole=view.whole)


async def _encode(ctx: ServingContext, prompt) -> list[int]:
    try:
        return await ctx.tokenize(ctx.info.encode_prompt, prompt)
    except ValueError as e:
        raise bad_request(str(e), param="prompt") from None


def _echo_texts(ctx, req: CompletionRequest, prompts, token_lists, params) -> list[str] | None:
    if not req.echo:
        return None
    tok = ctx.info.tokenizer
    return [
        p if isinstance(p, str) else tok.decode(ids, skip_special_tokens=params.skip_special_tokens)
        for p, ids in zip(prompts, token_lists)
    ]


class _View:
    """Formats one completion request's choices, whole or as chunks."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest, request_id: str, created: int, echoes) -> None:
        self.ctx, self.req, self.id, self.created, self.echoes = ctx, req, request_id, created, echoes

    def _prefix(self, choice: Choice) -> str:
        return self.echoes[choice.index // self.req.n] if self.echoes else ""

    def _response(self, choices: list[CompletionChoice], usage=None) -> CompletionResponse:
        model = self.ctx.served_model_name
        return CompletionResponse(id=self.id, created=self.created, model=model, choices=choices, usage=usage)

    def whole(self, gen: Generation) -> CompletionResponse:
        out = []
        for c in sorted(gen.choices, key=lambda c: c.index):
            logprobs = None
            if self.req.logprobs is not None:
                logprobs, _ = completion_logprobs(c.logprobs, self.ctx.strings)
            choice = CompletionChoice(index=c.index, text=self._prefix(c) + c.text, logprobs=logprobs)
            choice.finish_reason = c.finish_reason
            if self.req.return_token_ids:
                choice.prompt_token_ids, choice.token_ids = c.prompt_token_ids, c.token_ids
            out.append(choice)
        return self._response(out, gen.usage())

    async def chunks(self, gen: Generation) -> AsyncIterator[CompletionResponse]:
        offsets = {c.index: 0 for c in gen.choices}
        echoed: set[int] = set()
        started: set[int] = set()  # choices whose first chunk (with prompt_token_ids) went out
        async for c, d in gen.deltas():
            text = d.text
            if self.echoes and c.index not in echoed:
                echoed.add(c.index)
                text = self._prefix(c) + text
            logprobs = None
            if self.req.logprobs is not None and d.logprobs:
                logprobs, offsets[c.index] = completion_logprobs(d.logprobs, self.ctx.strings, offsets[c.index])
            if not (text or logprobs or d.finished or (self.req.return_token_ids and d.new_token_ids)):
                continue  # tokens whose text is still held back (partial UTF-8, possible stop string)
            choice = CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason)
            if self.req.return_token_ids:
                choice.token_ids = d.new_token_ids
                if c.index not in started:
                    started.add(c.index)
                    choice.prompt_token_ids = c.prompt_token_ids
            yield self._response([choice])
        if self.req.include_usage:
            yield self._response([], gen.usage())
