"""When requests go out. Open loop: at given times (Poisson at a rate, evenly spaced, a trace's own gaps),
whatever became of the earlier ones. Closed loop: N clients, each sending its next request when its last one
ended. The clock is a parameter, so a test drives a schedule with a fake one."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    """What the loops read the time from and sleep on. `open_loop` and `closed_loop` call it; the caller owns
    it (a test's fake advances its time when slept on)."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def poisson(rate: float, seed: int = 0, n: int | None = None) -> Iterator[float]:
    """Arrival offsets of a Poisson process at `rate` per second (the first after one gap); endless unless `n`."""
    rng, t = random.Random(seed), 0.0
    for _ in itertools.count() if n is None else range(n):
        t += rng.expovariate(rate)
        yield t


def uniform(rate: float, n: int | None = None) -> Iterator[float]:
    """Every 1/`rate` seconds from 0."""
    return (i / rate for i in (itertools.count() if n is None else range(n)))


def replay(times: Sequence[float], scale: float = 1.0) -> list[float]:
    """A trace's own timestamps, from its first, compressed `scale` times."""
    return [(t - times[0]) / scale for t in times] if times else []


def scale_to_rate(times: Sequence[float], rate: float) -> float:
    """The compression that makes a trace's mean rate `rate` (1 for a trace of one instant)."""
    span = times[-1] - times[0] if times else 0.0
    return span / (len(times) - 1) * rate if span else 1.0


async def open_loop(
    times: Iterable[float], fire: Callable[[int, float], Awaitable[T]], *, clock: Clock | None = None,
    stop: asyncio.Event | None = None,
) -> list[T]:  # fmt: skip
    """`fire(i, lag)` as a task at each offset of `times` from now (`lag`: how late it went out); stops at the
    end of `times` or once `stop` is set; returns what every fired task returned, in order."""
    clock = clock or RealClock()
    start, tasks = clock.now(), []
    for i, t in enumerate(times):
        if stop is not None and stop.is_set():
            break
        delay = start + t - clock.now()
        if delay > 0:
            await clock.sleep(delay)
            if stop is not None and stop.is_set():
                break
        tasks.append(asyncio.ensure_future(fire(i, clock.now() - start - t)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(
    clients: int, step: Callable[[int], Awaitable[bool | None]], *, stop: asyncio.Event | None = None,
    seconds: float | None = None, clock: Clock | None = None,
) -> None:  # fmt: skip
    """`clients` loops, each awaiting `step(client)` again and again until `stop` is set, `seconds` have gone
    by (no request starts after) or its step returns False (its source is exhausted)."""
    clock = clock or RealClock()
    deadline = None if seconds is None else clock.now() + seconds

    async def client(i: int) -> None:
        while not (stop is not None and stop.is_set()) and (deadline is None or clock.now() < deadline):
            if await step(i) is False:
                return

    await asyncio.gather(*(client(i) for i in range(clients)))


def from_list(items: Sequence[T]) -> Callable[[], tuple[int, T] | None]:
    """A shared source for closed-loop clients: each call the next (index, item), None once all are taken."""
    it = iter(enumerate(items))
    return lambda: next(it, None)
