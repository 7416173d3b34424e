"""The request models one app validates bodies with and describes in /openapi.json (one source of truth):
`protocol`'s models tightened by the configured limits, the model's vocabulary and its context length;
and the OpenAPI documentation of each route's body and answers."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, Field, WithJsonSchema, create_model
from pydantic.json_schema import models_json_schema

from pdserve.api.protocol import ChatCompletionRequest, CompletionRequest, MigrateRequest, StopString, TokenId
from pdserve.api.responses import ChatCompletionChunk, CompletionResponse, ErrorResponse
from pdserve.config import RequestLimits

REF = "#/components/schemas/{model}"
# 401/403: with keys configured; 408/413: a body too slow or too large; 429/503: load and health.
ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 503)
STREAM_CHUNKS = (CompletionResponse, ChatCompletionChunk)  # the `chunk`s of `answers`


@dataclass(frozen=True)
class RequestModels:
    completion: type[CompletionRequest]
    chat: type[ChatCompletionRequest]
    migrate: type[MigrateRequest] = MigrateRequest

    @classmethod
    def build(cls, limits: RequestLimits, model_name: str, vocab_size: int, max_model_len: int) -> RequestModels:
        text = Annotated[str, Field(min_length=1)]
        ids = Annotated[list[Annotated[TokenId, Field(lt=vocab_size)]], Field(min_length=1)]
        batch = Field(min_length=1, max_length=limits.max_n)  # every prompt of a batch is one choice or more
        stop = Annotated[StopString, Field(max_length=limits.max_stop_string_chars)]
        max_tokens = Annotated[int, Field(ge=1, le=max_model_len)] | None
        shared = {
            "model": Annotated[str, WithJsonSchema({"type": "string", "enum": [model_name]})],  # others: 404
            "n": Annotated[int, Field(le=limits.max_n)],
            "stop": stop | Annotated[list[stop], Field(max_length=limits.max_stop_strings)] | None,
            "stop_token_ids": Annotated[list[TokenId], Field(max_length=limits.max_stop_token_ids)] | None,
        }
        prompt = text | Annotated[list[text], batch] | ids | Annotated[list[ids], batch]
        completion = _tighten(
            CompletionRequest, **shared, **UNSUPPORTED, prompt=prompt, max_tokens=max_tokens,
            suffix=_only({"type": "string", "maxLength": 0}, str),
        )  # fmt: skip
        chat = _tighten(
            ChatCompletionRequest, **shared, **UNSUPPORTED, max_tokens=max_tokens, max_completion_tokens=max_tokens,
            tools=_only({"type": "array", "maxItems": 0}, list[dict]),
            tool_choice=_only({"enum": ["none", "auto"]}, str | dict),
            response_format=_only({"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
                                  dict),
        )  # fmt: skip
        return cls(completion, chat)

    def all(self) -> tuple[type[BaseModel], ...]:
        return self.completion, self.chat, self.migrate


def _only(schema: dict, kind: Any) -> Any:
    """A field the server accepts only in the form `schema` (or null) describes: documented so, while its
    validation stays the base model's `check()`, whose 400 says what is unsupported."""
    return Annotated[kind | None, WithJsonSchema({"anyOf": [schema, {"type": "null"}]})]


# Parameters of the OpenAI API that pdserve takes only as no-ops: their schemas admit just those values.
UNSUPPORTED = {
    "presence_penalty": _only({"type": "number", "minimum": 0, "maximum": 0}, float),
    "frequency_penalty": _only({"type": "number", "minimum": 0, "maximum": 0}, float),
    "logit_bias": _only({"type": "object", "maxProperties": 0}, dict[str, float]),
}


def _tighten(base: type[BaseModel], **types: Any) -> type[BaseModel]:
    """A subclass of `base` (same name, methods and defaults) whose fields `types` have these annotations;
    constraints in an annotation's `Annotated` add to those of the base's field."""
    fields = {name: (kind, base.model_fields[name]) for name, kind in types.items()}
    return create_model(base.__name__, __base__=base, __module__=base.__module__, **fields)


def body(model: type[BaseModel]) -> dict:
    """`openapi_extra` of a route whose JSON body is `model` (its schema lands in the components)."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def answers(
    ok: type[BaseModel] | None = None, *, chunk: type[BaseModel] | None = None, errors=ERRORS
) -> dict[int | str, Any]:
    """`responses` of a route: `ok` as the 200 JSON, and error objects. With `chunk` the 200 may also be
    server-sent events (stream=true), described per event as OpenAPI 3.2's `itemSchema` does."""
    out: dict[int | str, Any] = {
        code: {"model": ErrorResponse, "description": HTTPStatus(code).phrase} for code in errors
    }
    if ok is not None:
        out[200] = {"model": ok, "description": "the result"}
    if chunk is not None:
        out[200]["content"] = {"text/event-stream": {"itemSchema": _event(chunk)}}
    return out


def _event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One event of a stream: a `chunk`, an error object if generation fails after the 200, or [DONE] last."""
    payloads = [{"contentMediaType": "application/json", "contentSchema": {"$ref": REF.format(model=m.__name__)}}
                for m in (chunk, ErrorResponse)]  # fmt: skip
    data = {"anyOf": [*payloads, {"const": "[DONE]"}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def install_schemas(app: FastAPI, models: RequestModels) -> None:
    """Add the request models' and stream chunks' schemas to the app's OpenAPI components (FastAPI adds
    the models of `answers`), once, when /openapi.json is first built."""
    build = app.openapi
    kinds = [(m, "validation") for m in models.all()] + [(m, "serialization") for m in STREAM_CHUNKS]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = build().setdefault("components", {}).setdefault("schemas", {})
            _, defs = models_json_schema(kinds, ref_template=REF)
            for name, schema in defs["$defs"].items():
                components.setdefault(name, schema)
        return app.openapi_schema

    app.openapi = openapi
