"""POST /v1/chat/completions: messages through the model's chat template, `chat.completion` objects out.

Streams start with one `delta.role="assistant"` chunk per choice, sent as soon as the request is admitted.
Without max_tokens / max_completion_tokens a choice may run to the end of the context (OpenAI's rule).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pdserve.api.errors import bad_request
from pdserve.api.generation import Generation
from pdserve.api.logprobs import chat_logprobs
from pdserve.api.protocol import ChatCompletionRequest
from pdserve.api.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
)
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


async def create_chat_completion(ctx: ServingContext, request: Request) -> Response:
    arrival, created = now()
    req: ChatCompletionRequest = await parse_body(request, ctx.models.chat)
    ctx.check_model(req.model)
    req.check()
    messages = [m.as_template_input(i) for i, m in enumerate(req.messages)]
    try:
        ids = await ctx.tokenize(ctx.info.encode_chat, messages)
    except ValueError as e:
        raise bad_request(str(e), param="messages") from None
    max_tokens = req.requested_max_tokens
    if max_tokens is None:
        max_tokens = max(1, ctx.info.max_model_len - len(ids))
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, logprobs, aliases={"max_tokens": param, "logprobs": "top_logprobs"})
    validate_prompt(ctx.info, ids, params)
    request_id = new_id("chatcmpl")
    choices = fan_out(request_id, [ids], [params], req.n, cache_salt(req, request))
    view = _View(ctx, req, request_id, created)
    return await run_generation(ctx, request, choices, arrival, stream=req.stream, chunks=view.chunks, whole=view.whole)


class _View:
    """Formats one chat request's choices, whole or as chunks."""

    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest, request_id: str, created: int) -> None:
        self.ctx, self.req, self.id, self.created = ctx, req, request_id, created

    def whole(self, gen: Generation) -> ChatCompletionResponse:
        out = []
        for c in sorted(gen.choices, key=lambda c: c.index):
            logprobs = chat_logprobs(c.logprobs, self.ctx.strings) if self.req.logprobs else None
            message = AssistantMessage(content=c.text)
            choice = ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=c.finish_reason)
            if self.req.return_token_ids:
                choice.prompt_token_ids, choice.token_ids = c.prompt_token_ids, c.token_ids
            out.append(choice)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.ctx.served_model_name, choices=out, usage=gen.usage()
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
        model = self.ctx.served_model_name
        return ChatCompletionChunk(id=self.id, created=self.created, model=model, choices=choices, usage=usage)

    async def chunks(self, gen: Generation) -> AsyncIterator[ChatCompletionChunk]:
        for c in sorted(gen.choices, key=lambda c: c.index):
            yield self._chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))])
        async for c, d in gen.deltas():
            logprobs = chat_logprobs(d.logprobs, self.ctx.strings) if self.req.logprobs and d.logprobs else None
            if not (d.text or logprobs or d.finished or (self.req.return_token_ids and d.new_token_ids)):
                continue  # tokens whose text is still held back (partial UTF-8, possible stop string)
            delta = ChatDelta(content=d.text) if d.text or not d.finished else ChatDelta()
            choice = ChatChunkChoice(index=c.index, delta=delta, logprobs=logprobs, finish_reason=c.finish_reason)
            if self.req.return_token_ids:
                choice.token_ids = d.new_token_ids
            yield self._chunk([choice])
        if self.req.include_usage:
            yield self._chunk([], gen.usage())
