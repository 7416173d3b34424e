"""Waiting for a condition of a live deployment: poll a predicate until it holds, failing with what was seen."""

from __future__ import annotations

import asyncio
import time


def wait(predicate, timeout_s: float, what: str, context=lambda: None, interval_s: float = 0.5):
    """Poll `predicate` until it is truthy and return its value; on timeout, fail with `context()`."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}: {context()}"
        time.sleep(interval_s)
    return value


async def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """`wait` for an async predicate."""
    deadline = time.monotonic() + timeout_s
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(interval_s)
    return value
