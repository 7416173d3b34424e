"""Request schemas of the OpenAI-compatible HTTP API (pydantic), and their mapping to `SamplingParams`.

Strict: wrong types are rejected, not coerced; unknown fields are rejected, as OpenAI does; parameters
pdserve cannot honour are rejected when set to anything but their neutral value, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from pdserve.api.errors import APIError, bad_request
from pdserve.protocol import SamplingParams

MAX_CACHE_SALT_CHARS = 256
_SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; seed + n - 1 must fit
# Integers cross process boundaries as msgspec int64: bound them here, so an absurd value is a 400.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]
StopString = Annotated[str, Field(min_length=1)]
# Limits that depend on the deployment (n, stop lists, token ids, max_tokens) are added per app by
# `pdserve.api.schemas`, whose tightened subclasses both validate bodies and describe them in /openapi.json.


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


def _when(field: str, present: dict, then: dict) -> dict:
    """JSON Schema: if `field` is present and matches `present`, the body must match `then`."""
    return {"if": {"properties": {field: present}, "required": [field]}, "then": then}


# Cross-field rules the checks below enforce, stated in the schema too (generated clients and fuzzers see them).
STREAM_OPTIONS_NEED_STREAM = _when("stream_options", {"type": "object"},
                                   {"properties": {"stream": {"const": True}}, "required": ["stream"]})  # fmt: skip


class SamplingRequest(StrictModel):
    """Fields shared by completions and chat: OpenAI's names and defaults plus vLLM's sampling extras."""

    model: str = Field(description="the served model's name (GET /v1/models)")
    n: int = Field(1, ge=1, description="choices to generate")
    temperature: float | None = Field(None, ge=0, description="default 1.0; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="default 1.0")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream=true")
    stop: StopString | list[StopString] | None = None
    seed: Int64 | None = Field(None, description="choice i samples with seed + i")
    presence_penalty: float | None = Field(None, description="only 0 (pdserve has no penalties)")
    frequency_penalty: float | None = Field(None, description="only 0 (pdserve has no penalties)")
    logit_bias: dict[str, float] | None = Field(None, description="only empty (not supported)")
    user: str | None = None  # an end-user id for the caller's logs: accepted, unused
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = Field(None, description="0 or -1: disabled")
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # add prompt_token_ids and token_ids to each choice
    # only requests with the same salt share prefix-cached KV (default: the API key's, else none)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    def check(self) -> None:
        """Raise a 400 for parameters pdserve does not support or values no request may have."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise unsupported(name, "only 0 is supported")
        if self.logit_bias:
            raise unsupported("logit_bias")
        if self.seed is not None and not -_SEED_LIMIT <= self.seed <= _SEED_LIMIT - self.n:
            raise bad_request(f"seed must be a 64-bit signed integer, got {self.seed}", param="seed")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Validated SamplingParams; a ValueError names the field, `api_param` maps it back."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        return params.validate()


def unsupported(param: str, detail: str = "") -> APIError:
    return bad_request(f"{param} is not supported by pdserve" + (f" ({detail})" if detail else ""), param=param)


def param_of(error: ValueError, aliases: dict[str, str] | None = None) -> str | None:
    """The request parameter a SamplingParams/ModelInfo ValueError names (its first word), if any."""
    word = str(error).split(" ", 1)[0]
    if word in SamplingParams.__struct_fields__:
        return (aliases or {}).get(word, word)
    return "prompt" if word == "prompt" else None


def with_seed(params: SamplingParams, sample_index: int) -> SamplingParams:
    """Choice i of a request with a seed uses seed + i, so choice 0 equals the same request with n=1."""
    if params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=params.seed + sample_index)


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        STREAM_OPTIONS_NEED_STREAM, _when("logprobs", {"type": "integer"}, {"properties": {"echo": {"const": False}}}),
    ]})  # fmt: skip
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(16, description="default 16, OpenAI's")
    logprobs: int | None = Field(None, ge=0, le=5, description="top alternatives returned per token")
    echo: bool = Field(False, description="not with logprobs")
    best_of: int | None = Field(None, description="only equal to n")
    suffix: str | None = Field(None, description="only empty (not supported)")

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "it must equal n")
        if self.suffix:
            raise unsupported("suffix")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "with logprobs it needs prompt logprobs, which pdserve does not compute")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    # documented as the only part served (a text part); validated by ChatMessage.as_template_input's 400
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"required": ["type", "text"]})
    type: Annotated[str, WithJsonSchema({"type": "string", "const": "text"})] = Field(
        description="only 'text' parts are supported"
    )
    text: Annotated[str | None, WithJsonSchema({"type": "string"})] = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self, i: int) -> dict:
        """The message as the chat template sees it; `i` is its position (for error messages)."""
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part type {part.type!r} is not supported by pdserve (only text parts are)",
                        param=f"messages[{i}].content[{j}].type",
                    )
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        out = {"role": self.role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        STREAM_OPTIONS_NEED_STREAM,
        _when("top_logprobs", {"type": "integer"},
              {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}),
    ]})  # fmt: skip
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="default: up to the context length")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(None, description="overrides max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token (with logprobs)")
    tools: list[dict] | None = Field(None, description="only empty (not supported)")
    tool_choice: str | dict | None = Field(None, description="only 'none' or 'auto' (no tools)")
    parallel_tool_calls: bool | None = None
    response_format: dict | None = Field(None, description="only {'type': 'text'}")

    def check(self) -> None:
        super().check()
        if self.tools:
            raise unsupported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise unsupported("response_format", "only type 'text' is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class MigrateRequest(BaseModel):
    """POST /admin/migrate: move a running request to another worker (live migration)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the id the API returned (cmpl-..., chatcmpl-...)")
    target_worker: str | None = Field(None, min_length=1, description="a worker id; default: the least loaded")
