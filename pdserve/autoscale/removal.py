"""Who leaves first (pure): the one removal order shared by scale-in, drains, role flips, the autoscaler and
the simulator. A worker still starting goes before any ready one; then the one whose removal loses the least."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RemovalCandidate:
    worker_id: str
    running: int
    unique_cached_blocks: int  # blocks of the global prefix index that only this worker holds
    starting: bool = False  # not serving yet: nothing to drain, nothing to lose


def removal_order(candidates: list[RemovalCandidate]) -> list[str]:
    """Worker ids, the first to leave first: starting ones, then the fewest running requests, then the fewest
    prefixes cached nowhere else, then the highest id (the newest)."""
    ordered = sorted(candidates, key=lambda c: (not c.starting, c.running, c.unique_cached_blocks, _neg(c.worker_id)))
    return [c.worker_id for c in ordered]


def pick_removal(candidates: list[RemovalCandidate]) -> str | None:
    """The first of `removal_order`, or None when there is no candidate."""
    order = removal_order(candidates)
    return order[0] if order else None


def _neg(worker_id: str):
    tail = worker_id.rsplit("-", 1)[-1]
    return -int(tail) if tail.isdigit() else 0


def removal_candidates(records: Iterable, unique_blocks: Callable[[str], int]) -> list[RemovalCandidate]:
    """Candidates from registry records (`WorkerRecord`: worker_id, state, stats), the starting and ready
    ones (the others are leaving already); `unique_blocks(worker_id)`: `PrefixIndex.unique_blocks`."""
    return [
        RemovalCandidate(
            r.worker_id, getattr(r.stats, "num_running", 0), unique_blocks(r.worker_id), r.state == "starting"
        )
        for r in records
        if r.state in ("starting", "ready")
    ]
