"""Routing policies: pure functions of worker snapshots, selectable by name.

Contract: the GlobalScheduler calls `pick(candidates, request)` with a non-empty list of live candidates
of one pool (prefill, or decode) and records the decision at once; a policy keeps no I/O and may keep
small state of its own (round-robin's cursor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pdserve.protocol import RouteRequest


@dataclass
class WorkerView:
    """What the scheduler believes about one worker: its last report plus decisions made since."""

    worker_id: str
    role: str
    num_running: int = 0
    num_waiting: int = 0
    num_prefill_tokens_queued: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 1
    kv_usage: float = 0.0
    pending_requests: int = 0  # routed here since the last report
    pending_tokens: int = 0

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting + self.pending_requests

    @property
    def queued_tokens(self) -> int:
        return self.num_prefill_tokens_queued + self.pending_tokens


class RoutingPolicy(Protocol):
    name: str

    def pick(self, candidates: list[WorkerView], request: RouteRequest, pool: str) -> str:
        """Choose one candidate's worker_id. `pool` is "prefill" or "decode"."""


class LeastLoaded:
    """Prefill pool: fewest queued prompt tokens; decode pool: fewest requests, then lowest KV usage."""

    name = "least_loaded"

    def pick(self, candidates: list[WorkerView], request: RouteRequest, pool: str) -> str:
        if pool == "prefill":
            return min(candidates, key=lambda w: (w.queued_tokens, w.load, w.worker_id)).worker_id
        return min(candidates, key=lambda w: (w.load, w.kv_usage, w.worker_id)).worker_id


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, candidates: list[WorkerView], request: RouteRequest, pool: str) -> str:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        i = self._next.get(pool, 0)
        self._next[pool] = i + 1
        return ordered[i % len(ordered)].worker_id


POLICIES = {"least_loaded": LeastLoaded, "round_robin": RoundRobin}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
