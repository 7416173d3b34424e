"""Virtual time for the real Router: its `time.time()` (pending decisions vs report times) and the prefix
index's `time.monotonic()` (prediction TTLs) read the simulator's clock while `virtual_clock` is active.

pdserve.router has no clock parameter, so this swaps the `time` module those two modules see for a
stand-in (perf_counter stays real: it times decisions). Not thread-safe; one simulation at a time per process.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from pdserve.router import prefix_index, router


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter()


@contextmanager
def virtual_clock(clock: VirtualClock):
    saved = router.time, prefix_index.time
    router.time = prefix_index.time = clock
    try:
        yield clock
    finally:
        router.time, prefix_index.time = saved
