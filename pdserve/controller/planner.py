"""The migration planner (pure): Llumnix's freeness, which worker a request should move to, and which
request a rebalancing move should take. Unit-tested with tables; the controller's loops do the I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLoad:
    """A decode-capable worker's KV load, from its last report."""

    worker_id: str
    num_free_blocks: int
    num_running: int
    queued_blocks: int = 0  # KV the worker's queued prompts will take (admitted demand not yet running)

    def freeness(self) -> float:
        """Free KV blocks per running request, queued demand counted as used (higher = less loaded)."""
        return (self.num_free_blocks - self.queued_blocks) / max(1, self.num_running)

    def moved(self, blocks: int, out: bool) -> KVLoad:
        sign = 1 if out else -1
        return KVLoad(self.worker_id, self.num_free_blocks + sign * blocks, self.num_running - sign, self.queued_blocks)


def pick_target(loads: list[KVLoad], source: str, blocks: int, margin: int = 2) -> str | None:
    """The least loaded worker other than `source` with room for `blocks` (+ margin); None if none has."""
    fits = [w for w in loads if w.worker_id != source and w.num_free_blocks - w.queued_blocks >= blocks + margin]
    return max(fits, key=KVLoad.freeness).worker_id if fits else None


def plan_rebalance(loads: list[KVLoad], candidates: dict[str, list[tuple[str, int]]], threshold: float):
    """One move `(request_id, source, target)` or None.

    The most loaded worker (lowest freeness) gives a request to the least loaded when their freeness differs
    by more than `threshold`, and only if the move narrows the gap (no ping-pong). Of the source's
    `candidates` (request id, blocks held), the cheapest move that narrows the gap wins: fewest blocks.
    """
    if len(loads) < 2:
        return None
    src = min(loads, key=KVLoad.freeness)
    dst = max(loads, key=KVLoad.freeness)
    gap = dst.freeness() - src.freeness()
    if src.worker_id == dst.worker_id or gap <= threshold:
        return None
    for rid, blocks in sorted(candidates.get(src.worker_id, []), key=lambda c: c[1]):
        if dst.num_free_blocks - dst.queued_blocks < blocks + 2:
            continue
        after = abs(dst.moved(blocks, out=False).freeness() - src.moved(blocks, out=True).freeness())
        if after < gap:
            return rid, src.worker_id, dst.worker_id
    return None
