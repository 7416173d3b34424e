"""Router: pools, worker views fed by load reports, admission, and routing decisions; `GlobalScheduler`
is its Ray actor. Control plane only: it sees request sizes, never tokens or KV.

A decision is recorded at once (pending load on the chosen workers) so a burst is spread before the next
reports arrive; a report supersedes the decisions made before it was taken.
"""

from __future__ import annotations

import time

import ray

from pdserve.protocol import Route, RouteRequest, WorkerStats
from pdserve.scheduler.policies import WorkerView, make_policy


class NoCapacity(Exception):
    """Every candidate's queue is full (or no worker is alive): the caller answers 429/503."""

    def __init__(self, message: str, retry_after: float = 1.0, unavailable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unavailable = unavailable


class Router:
    def __init__(self, policy: str = "least_loaded", max_waiting_per_worker: int = 64) -> None:
        self.policy = make_policy(policy)
        self.max_waiting = max_waiting_per_worker
        self.views: dict[str, WorkerView] = {}
        self._pending: dict[str, list[tuple[float, int]]] = {}  # worker -> (decision time, tokens)
        self.decisions: dict[str, int] = {}  # reason -> count

    def register(self, worker_id: str, role: str) -> None:
        self.views[worker_id] = WorkerView(worker_id, role)
        self._pending[worker_id] = []

    def remove(self, worker_id: str) -> None:
        self.views.pop(worker_id, None)
        self._pending.pop(worker_id, None)

    def report(self, stats: WorkerStats) -> None:
        view = self.views.get(stats.worker_id)
        if view is None:
            return
        if not stats.alive:
            self.remove(stats.worker_id)
            return
        view.num_running, view.num_waiting = stats.num_running, stats.num_waiting
        view.num_prefill_tokens_queued = stats.num_prefill_tokens_queued
        view.num_free_blocks, view.num_blocks, view.kv_usage = stats.num_free_blocks, stats.num_blocks, stats.kv_usage
        pending = [p for p in self._pending[stats.worker_id] if p[0] > stats.time]
        self._pending[stats.worker_id] = pending
        view.pending_requests, view.pending_tokens = len(pending), sum(t for _, t in pending)

    def _record(self, worker_id: str, tokens: int) -> None:
        self._pending[worker_id].append((time.time(), tokens))
        view = self.views[worker_id]
        view.pending_requests += 1
        view.pending_tokens += tokens

    def _admissible(self, pool: list[WorkerView]) -> list[WorkerView]:
        return [w for w in pool if w.num_waiting + w.pending_requests < self.max_waiting]

    def route(self, req: RouteRequest) -> Route:
        decode_pool = [w for w in self.views.values() if w.role in ("decode", "mixed")]
        if not decode_pool:
            raise NoCapacity("no decode or colocated worker is alive", retry_after=5.0, unavailable=True)
        open_decode = self._admissible(decode_pool)
        if not open_decode:
            raise NoCapacity(f"all {len(decode_pool)} decode workers have {self.max_waiting} requests queued")
        decode = self.views[self.policy.pick(open_decode, req, "decode")]
        prefill_pool = [w for w in self.views.values() if w.role == "prefill"]
        prefill = None
        if decode.role == "decode" and prefill_pool:
            open_prefill = self._admissible(prefill_pool)
            if not open_prefill:
                raise NoCapacity(f"all {len(prefill_pool)} prefill workers have {self.max_waiting} requests queued")
            prefill = self.views[self.policy.pick(open_prefill, req, "prefill")]
        reason = "disaggregated" if prefill else "local_prefill"
        self.decisions[reason] = self.decisions.get(reason, 0) + 1
        self._record(decode.worker_id, 0 if prefill else req.num_prompt_tokens)
        if prefill:
            self._record(prefill.worker_id, req.num_prompt_tokens)
        return Route(
            decode_worker=decode.worker_id, prefill_worker=prefill.worker_id if prefill else None, reason=reason
        )


@ray.remote(num_cpus=0)
class GlobalScheduler:
    def __init__(self, policy: str = "least_loaded", max_waiting_per_worker: int = 64) -> None:
        self.router = Router(policy, max_waiting_per_worker)

    def register(self, workers: list[tuple[str, str]]) -> None:
        for worker_id, role in workers:
            self.router.register(worker_id, role)

    def remove(self, worker_id: str) -> None:
        self.router.remove(worker_id)

    def report(self, stats: WorkerStats) -> None:
        self.router.report(stats)

    def route(self, req: RouteRequest) -> Route | NoCapacity:
        """Returns the exception instead of raising it, so callers get it without a Ray error wrapper."""
        try:
            return self.router.route(req)
        except NoCapacity as e:
            return e

    def snapshot(self) -> dict:
        return {"views": {k: vars(v) for k, v in self.router.views.items()}, "decisions": self.router.decisions}
