"""A steady closed-loop load until stopped: `concurrency` clients spread over one or more servers, each sending
what `plan` gives it and keeping every outcome. Awaited (`start()` .. `await stop()`) or, for a synchronous
test, in a thread with a loop of its own (`start_thread()` .. `end()`). `uncached(...)`: the load of the
autoscaling and observability tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.load.arrivals import closed_loop
from pdserve.load.client import Client, completion_body
from pdserve.load.outcome import CONNECTION, Outcome


@dataclass
class Planned:
    """One request a client is to send: its body, the caller's tag, and whether to leave after k chunks."""

    body: dict
    tag: Any = None
    leave_after: int | None = None


class Steady:
    """Client i starts on `urls[i % len(urls)]` and moves to the next server after a connection failure (its
    server died). `plan(i, k)`: client i's next request, k: how many it sent before.
    After an outcome that is neither ok nor left a client waits `backoff_s` (no hot loop of refusals while a
    deployment recovers). `on_outcome(out)` sees each outcome as it ends (default: kept in `outcomes`)."""

    def __init__(
        self, urls: str | list[str], concurrency: int, plan: Callable[[int, int], Planned], *,
        deadline_s: float = 120.0, backoff_s: float = 0.2, on_outcome: Callable[[Outcome], None] | None = None,
        check: Callable[[Outcome], bool] = lambda o: o.ok,
    ) -> None:  # fmt: skip
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.concurrency, self.plan, self.deadline_s, self.backoff_s = concurrency, plan, deadline_s, backoff_s
        self.check = check
        self.outcomes: list[Outcome] = []
        self.on_outcome = on_outcome or self.outcomes.append
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Future | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def done(self) -> int:
        return len(self.outcomes)

    @property
    def failures(self) -> list[str]:
        """The kept outcomes that fail `check` (default: not ok), described."""
        return [f"{o.error_kind or 'ok'} {o.output_tokens} tokens {o.error}"[:300] for o in self.outcomes
                if not self.check(o)]  # fmt: skip

    # ---- in the caller's event loop
    def start(self) -> Steady:
        """Start the clients (in the running loop); `outcomes` starts empty."""
        self.outcomes.clear()
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(self._stop))
        return self

    async def stop(self, grace_s: float | None = None) -> list[Outcome]:
        """No new request; those in flight end (each by its deadline), or are cancelled after `grace_s` (and
        not kept). Returns the outcomes since start(). Idempotent; nothing to stop before start()."""
        if self._task is None:
            return self.outcomes
        self._stop.set()
        if grace_s is not None:
            done, _ = await asyncio.wait([self._task], timeout=grace_s)
            if not done:
                self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise
        return self.outcomes

    async def _run(self, stop: asyncio.Event) -> None:
        clients = [Client(url, timeout_s=self.deadline_s + 10) for url in self.urls]
        for c in clients:
            await c.__aenter__()
        at = [i % len(clients) for i in range(self.concurrency)]
        sent = [0] * self.concurrency

        async def step(i: int) -> None:
            planned = self.plan(i, sent[i])
            sent[i] += 1
            client = clients[at[i]]
            out = await client.send(planned.body, deadline_s=self.deadline_s, leave_after=planned.leave_after,
                                    tag=planned.tag)  # fmt: skip
            self.on_outcome(out)
            if out.kind in CONNECTION:
                at[i] = (at[i] + 1) % len(clients)
            if out.kind not in ("ok", "left"):
                await asyncio.sleep(self.backoff_s)

        try:
            await closed_loop(self.concurrency, step, stop=stop)
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)

    # ---- in a thread of its own
    def start_thread(self) -> Steady:
        ready = threading.Event()

        def main() -> None:
            async def body():
                self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                ready.set()
                await self._run(self._stop)

            asyncio.run(body())

        self._thread = threading.Thread(target=main, name="pdserve-load", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def end(self, timeout_s: float = 180.0) -> list[Outcome]:
        """Stop the thread's clients and wait for the requests in flight."""
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load's thread did not stop"
        return self.outcomes


def uncached(
    url: str, concurrency: int, prompt_words: int = 8, max_tokens: int = 48, model: str = "pdserve-demo"
) -> Steady:
    """Non-streamed completions whose prompts share no cached prefix (a fresh first word each), so every
    prompt is prefilled; an answer short of `max_tokens` (ignore_eos) is a failure."""

    def plan(i: int, k: int) -> Planned:
        prompt = f"{i}x{k} " + "load the pools " * (prompt_words // 3 + 1)
        return Planned(completion_body(model, prompt, max_tokens))

    return Steady(url, concurrency, plan, check=lambda o: o.ok and o.output_tokens == max_tokens)
