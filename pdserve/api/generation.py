"""One HTTP request's engine streams (prompts x n choices): fan-out, merge, accumulation and metrics.

Lifecycle: `start()` opens every stream and waits for each one's first delta, so admission failures
(`Overloaded`, ...) surface before any HTTP status is sent; `deltas()` yields the rest as they come;
`close()` is synchronous and idempotent and aborts every unfinished stream, so it is safe in any
`finally`, including one running under cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from pdserve.api.responses import PromptTokensDetails, Usage
from pdserve.engine_client import EngineClient
from pdserve.metrics import Metrics
from pdserve.protocol import SamplingParams, TokenDelta, TokenLogprob


@dataclass
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + sample_index
    sample_index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    last_token_at: float | None = None
    cache_salt: str | None = None


class Generation:
    def __init__(self, client: EngineClient, choices: list[Choice], metrics: Metrics, arrival: float) -> None:
        self.client = client
        self.choices = choices
        self.metrics = metrics
        self.arrival = arrival  # time.perf_counter() when the HTTP request arrived
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._queue: asyncio.Queue[tuple[Choice, TokenDelta | BaseException | None]] = asyncio.Queue()
        self._early: deque = deque()  # items read by start(), replayed by deltas()
        self._tasks: list[asyncio.Task] = []
        self._unfinished = len(choices)
        self._started = False
        self._closed = False

    async def _pump(self, choice: Choice) -> None:
        try:  # a client whose generate() raises at the call must fail the request too, not leave it waiting
            stream = self.client.generate(choice.request_id, choice.prompt_token_ids, choice.params, choice.cache_salt)
            # Cancellation reaches the engine client's generator inside its own await, so its cleanup (abort) runs.
            async with aclosing(stream):
                async for delta in stream:
                    self._queue.put_nowait((choice, delta))
            self._queue.put_nowait((choice, None))
        except Exception as e:  # handed to the consumer, which decides what it means
            self._queue.put_nowait((choice, e))

    async def start(self) -> None:
        """Open all streams; return once each has produced a first delta, else close all and raise."""
        self._tasks = [asyncio.create_task(self._pump(c)) for c in self.choices]
        pending = {c.index for c in self.choices}
        try:
            while pending:
                item = await self._queue.get()
                if isinstance(item[1], BaseException):
                    raise item[1]
                pending.discard(item[0].index)
                self._early.append(item)
            self._started = True
        except BaseException:
            self.close()
            raise

    async def deltas(self) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """(choice, delta) in arrival order, each already applied to its choice, until all finished."""
        while self._unfinished:
            choice, item = self._early.popleft() if self._early else await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # a stream ended without a finished delta (contract breach): treat as aborted
                if choice.finish_reason is None:
                    choice.finish_reason = "abort"
                    self._unfinished -= 1
                continue
            self._apply(choice, item)
            yield choice, item

    async def run(self) -> None:
        async for _ in self.deltas():
            pass

    def _apply(self, choice: Choice, d: TokenDelta) -> None:
        choice.text += d.text
        choice.token_ids += d.new_token_ids
        if d.logprobs:
            choice.logprobs += d.logprobs
        choice.num_cached_tokens = d.num_cached_tokens
        if d.finished and choice.finish_reason is None:
            choice.finish_reason = d.finish_reason or "stop"
            self._unfinished -= 1
            self.metrics.requests_finished.labels(choice.finish_reason).inc()
            if not self._unfinished:
                self.finished_at = time.perf_counter()
        k = len(d.new_token_ids)
        if not k:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.ttft.observe(now - self.arrival)
        if choice.last_token_at is not None:
            gap = (now - choice.last_token_at) / k  # a delta of k tokens: k equal gaps
            for _ in range(k):
                self.metrics.itl.observe(gap)
        choice.last_token_at = now

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    def usage(self) -> Usage:
        """Prompt and cached tokens once per prompt (from its first sample), completion tokens per choice."""
        firsts = [c for c in self.choices if c.sample_index == 0]
        prompt = sum(len(c.prompt_token_ids) for c in firsts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.num_cached_tokens for c in firsts)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def close(self) -> None:
        """Abort unfinished streams and record the request's metrics; idempotent, never awaits."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if not self._started:  # not admitted: no tokens were processed
            return
        for c in self.choices:
            if c.finish_reason is None:  # cut short: client gone, or a failure elsewhere
                self.metrics.requests_finished.labels("abort").inc()
        usage = self.usage()
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.generation_tokens.inc(usage.completion_tokens)
        self.metrics.cached_tokens.inc(usage.prompt_tokens_details.cached_tokens)
        if self.finished_at is not None:
            self.metrics.e2e.observe(self.finished_at - self.arrival)
