"""Runs one LLMEngine on its own thread; other threads (an asyncio loop) talk to it by commands.

The engine is single-threaded: every call into it (add, abort, export, import, stats) is a command run
on the engine thread between steps. After each step the thread hands all of that step's deltas to
`on_outputs` in one call (on the engine thread), so consumers batch per step, not per token. A command
submitted `after_step` runs right after the next step instead (at once when the engine is idle): a load
report taken there sees the batch as the scheduler formed it, so "waiting" means found no slot.
If the engine raises, the thread logs the traceback, fails every queued and later command with
`ServiceUnavailable`, and calls `on_error` once (on the engine thread): the owner must stop serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

from pdserve.engine.engine import LLMEngine
from pdserve.engine_client import ServiceUnavailable
from pdserve.protocol import TokenDelta

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[TokenDelta]], None],
        name: str = "engine",
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self._on_outputs = on_outputs
        self._on_error = on_error
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._after_step: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._wake = threading.Condition()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[LLMEngine], Any], after_step: bool = False) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread before its next step (`after_step`: right after it); the
        future holds its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopped:
                fut.set_exception(self._stopped_error())
                return fut
            (self._after_step if after_step else self._commands).append((lambda: fn(self.engine), fut))
            self._wake.notify()
        return fut

    async def call(self, fn: Callable[[LLMEngine], Any], after_step: bool = False) -> Any:
        return await asyncio.wrap_future(self.submit(fn, after_step))

    def stop(self) -> None:
        """Idempotent: finish the current step, fail queued commands, join the thread."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _run(self) -> None:
        after: list = []  # taken for after the current step: failed with the rest if the step raises
        try:
            while True:
                with self._wake:
                    while not (self._stopped or self._commands or self._after_step or self.engine.has_unfinished()):
                        self._wake.wait()
                    if self._stopped:
                        break
                    commands, self._commands = self._commands, []
                    after, self._after_step = self._after_step, []
                _run_commands(commands)
                if self.engine.has_unfinished():
                    deltas = self.engine.step()
                    if deltas or self.engine.parked_ids:
                        self._on_outputs(deltas)
                _run_commands(after)
        except BaseException as e:  # the engine is broken: report it, fail whoever waits, tell the owner
            self.error = e
            log.critical("%s: the engine failed and stops serving", self.name, exc_info=e)
        finally:
            with self._wake:
                self._stopped = True
                pending, self._commands, self._after_step = self._commands + self._after_step + after, [], []
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(self._stopped_error())
        if self.error is not None and self._on_error is not None:
            self._on_error(self.error)

    def _stopped_error(self) -> ServiceUnavailable:
        if self.error is None:
            return ServiceUnavailable(f"{self.name}: the engine thread is stopped")
        return ServiceUnavailable(f"{self.name}: the engine failed: {type(self.error).__name__}: {self.error}")


def _run_commands(commands: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
    for fn, fut in commands:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)
