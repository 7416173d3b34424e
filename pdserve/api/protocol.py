"""Request schemas of the OpenAI-compatible HTTP API (pydantic), and their mapping to `SamplingParams`.

Strict: wrong types are rejected, not coerced; unknown fields are rejected, as OpenAI does; parameters
pdserve cannot honour are rejected when set to anything but their neutral value, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from pdserve.api.errors import APIError, bad_request
from pdserve.protocol import SamplingParams

MAX_N = 128
_SEED_LIMIT = 2**63  # torch generators take 64-bit seeds; seed + n - 1 must fit
# Integers cross process boundaries as msgspec int64: bound them here, so an absurd value is a 400.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """Fields shared by completions and chat: OpenAI's names and defaults plus vLLM's sampling extras."""

    model: str
    n: int = 1
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None  # None: 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's logs: accepted, unused
    # vLLM extras
    top_k: Int64 | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # add prompt_token_ids and token_ids to each choice

    def check(self) -> None:
        """Raise a 400 for parameters pdserve does not support or values no request may have."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise unsupported(name, "only 0 is supported")
        if self.logit_bias:
            raise unsupported("logit_bias")
        if not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Int64 | None = 16  # None: 16, OpenAI's default
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "it must equal n")
        if self.suffix:
            raise unsupported("suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise bad_request(f"logprobs must be between 0 and 5, got {self.logprobs}", param="logprobs")
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
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


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
    messages: list[ChatMessage]
    max_tokens: Int64 | None = None  # None (both): up to the context length
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise bad_request("messages must not be empty", param="messages")
        if self.tools:
            raise unsupported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise unsupported("response_format", "only type 'text' is supported")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise bad_request(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}", "top_logprobs")
            if not self.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class MigrateRequest(BaseModel):
    """POST /admin/migrate: move a running request to another worker (live migration)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, description="the id the API returned (cmpl-..., chatcmpl-...)")
    target_worker: str | None = Field(None, min_length=1, description="a worker id; default: the least loaded")
