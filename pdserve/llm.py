"""Offline API: `LLM(model).generate(prompts, params)` and `.chat(messages, params)` on one local engine."""

from __future__ import annotations

import itertools

import msgspec

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.protocol import SamplingParams, TokenLogprob


class RequestOutput(msgspec.Struct, kw_only=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None


class LLM:
    """Runs a model in this process. `model` is a Hugging Face directory, or None for the embedded demo."""

    def __init__(self, model: str | None = None, *, dtype: str = "float32", **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=None if model is None else str(model), dtype=dtype, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops a tensor-parallel engine's other ranks (nothing to do at degree 1); idempotent."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_demo(self) -> bool:
        return self.engine.is_demo

    def generate(
        self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *, cache_salt: str | None = None
    ) -> list[RequestOutput]:
        """`cache_salt`: these prompts share prefix-cached KV only with prompts run under the same salt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(prompts, list) and not prompts:
            raise ValueError("prompts is empty")
        token_lists = [self.engine.info.encode_prompt(p) for p in prompts]
        return self._run([p if isinstance(p, str) else None for p in prompts], token_lists, params, cache_salt)

    def chat(
        self, messages, params: SamplingParams | list[SamplingParams] | None = None, *, cache_salt: str | None = None
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [self.engine.info.encode_chat(conv) for conv in conversations]
        return self._run([None] * len(token_lists), token_lists, params, cache_salt)

    def _run(self, texts, token_lists, params, cache_salt: str | None) -> list[RequestOutput]:
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(token_lists)
        if len(plist) != len(token_lists):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(token_lists)} prompts")
        for ids, p in zip(token_lists, plist):
            self.engine.validate(ids, p)  # all or nothing: reject the batch before queuing any of it
        outputs: dict[str, RequestOutput] = {}
        order = []
        for text, ids, p in zip(texts, token_lists, plist):
            rid = str(next(self._ids))
            order.append(rid)
            outputs[rid] = RequestOutput(
                request_id=rid,
                prompt=text,
                prompt_token_ids=list(ids),
                token_ids=[],
                text="",
                finish_reason=None,
                num_prompt_tokens=len(ids),
                num_cached_tokens=0,
                logprobs=[] if p.logprobs is not None else None,
            )
            self.engine.add_request(rid, ids, p, cache_salt=cache_salt)
        try:
            while self.engine.has_unfinished():
                for d in self.engine.step():
                    out = outputs[d.request_id]
                    out.token_ids += d.new_token_ids
                    out.text += d.text
                    out.num_cached_tokens = d.num_cached_tokens
                    if d.logprobs and out.logprobs is not None:
                        out.logprobs += d.logprobs
                    if d.finished:
                        out.finish_reason = d.finish_reason
        finally:
            for rid in order:
                self.engine.abort(rid)  # no-op for finished requests; frees blocks after an exception
        return [outputs[rid] for rid in order]
