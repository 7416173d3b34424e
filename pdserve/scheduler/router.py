"""Router: pools, worker views fed by load reports and KV events, admission, and routing decisions;
`GlobalScheduler` is its Ray actor. Control plane only: it sees request sizes and block hashes, never
tokens or KV.

A decision is recorded at once (pending load, predicted cache entries) so a burst is spread before the
next reports arrive; a report supersedes the load decisions made before it was taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from pdserve.protocol import KVEventBatch, Route, RouteRequest, WorkerStats
from pdserve.scheduler.policies import Candidate, DisaggConfig, WorkerView, decide_local_prefill, make_policy
from pdserve.scheduler.prefix_index import PrefixIndex


class NoCapacity(Exception):
    """Every candidate's queue is full (or no worker is alive): the caller answers 429/503."""

    def __init__(self, message: str, retry_after: float = 1.0, unavailable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unavailable = unavailable


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "prefix_aware"
    policy_options: dict = field(default_factory=dict)
    block_size: int = 16
    max_waiting_per_worker: int = 64
    max_index_blocks: int = 1_000_000
    disagg: DisaggConfig = field(default_factory=DisaggConfig)


class Router:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config = config or RouterConfig()
        self.policy = make_policy(config.policy, block_size=config.block_size, **config.policy_options)
        self.index = PrefixIndex(config.max_index_blocks)
        self.views: dict[str, WorkerView] = {}
        self._pending: dict[str, list[tuple[float, int, int]]] = {}  # worker -> (time, tokens, blocks)
        self.decisions: dict[tuple[str, str], int] = {}  # (placement reason, policy reason) -> count

    # ---- membership and reports ------------------------------------------------------------------
    def register(self, worker_id: str, role: str) -> None:
        self.views[worker_id] = WorkerView(worker_id, role)
        self._pending[worker_id] = []

    def remove(self, worker_id: str) -> None:
        self.views.pop(worker_id, None)
        self._pending.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def report(self, stats: WorkerStats, events: KVEventBatch | None = None) -> bool:
        """Apply a load report and its KV events; False asks the worker for a full resync of its cache."""
        view = self.views.get(stats.worker_id)
        if view is None:
            return True
        if not stats.alive:
            self.remove(stats.worker_id)
            return True
        view.num_running, view.num_waiting = stats.num_running, stats.num_waiting
        view.num_prefill_tokens_queued = stats.num_prefill_tokens_queued
        view.num_free_blocks, view.num_blocks, view.kv_usage = stats.num_free_blocks, stats.num_blocks, stats.kv_usage
        pending = [p for p in self._pending[stats.worker_id] if p[0] > stats.time]
        self._pending[stats.worker_id] = pending
        view.pending_requests = len(pending)
        view.pending_tokens = sum(p[1] for p in pending)
        view.pending_blocks = sum(p[2] for p in pending)
        in_sync = True
        if events is not None:
            in_sync = self.index.apply(events.worker_id, events.epoch, events.seq, events.events)
        view.num_cached_blocks = self.index.num_blocks(stats.worker_id)
        self.index.expire_predictions()
        return in_sync

    def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[int]) -> None:
        if worker_id in self.views:
            self.index.resync(worker_id, epoch, seq, hashes)
            self.views[worker_id].num_cached_blocks = self.index.num_blocks(worker_id)

    # ---- decisions -------------------------------------------------------------------------------
    def _record(self, view: WorkerView, tokens: int, blocks: int) -> None:
        self._pending[view.worker_id].append((time.time(), tokens, blocks))
        view.pending_requests += 1
        view.pending_tokens += tokens
        view.pending_blocks += blocks

    def _open(self, pool: list[WorkerView]) -> list[WorkerView]:
        return [w for w in pool if w.num_waiting + w.pending_requests < self.config.max_waiting_per_worker]

    def route(self, req: RouteRequest) -> Route:
        start = time.perf_counter()
        bs = self.config.block_size
        decode_pool = [w for w in self.views.values() if w.role in ("decode", "mixed")]
        if not decode_pool:
            raise NoCapacity("no decode or colocated worker is alive", retry_after=5.0, unavailable=True)
        need_blocks = -(-(req.num_prompt_tokens + 1) // bs)
        open_decode = [
            w for w in self._open(decode_pool) if not w.num_blocks or w.num_blocks - w.used_blocks >= need_blocks
        ]
        if not open_decode:
            raise NoCapacity(f"all {len(decode_pool)} decode workers are full (queue or KV blocks)")
        prefill_pool = [w for w in self.views.values() if w.role == "prefill"]
        open_prefill = self._open(prefill_pool)
        if prefill_pool and not open_prefill:
            raise NoCapacity(f"all {len(prefill_pool)} prefill workers have full queues")
        matched = self.index.match(req.block_hashes, [w.worker_id for w in open_decode + open_prefill])
        cands = {
            w.worker_id: Candidate(w, min(matched[w.worker_id] * bs, req.num_prompt_tokens - 1))
            for w in open_decode + open_prefill
        }

        decode = self.policy.pick([cands[w.worker_id] for w in open_decode], req, "decode")
        chosen = cands[decode.worker_id]
        prefill = None
        if chosen.worker.role == "mixed":
            local, reason = True, "colocated"
        else:
            best = min(open_prefill, key=lambda w: w.queued_tokens) if open_prefill else None
            local, reason = decide_local_prefill(chosen, best, req, self.config.disagg)
            if not local:
                prefill = self.policy.pick([cands[w.worker_id] for w in open_prefill], req, "prefill")
        filler = cands[prefill.worker_id] if prefill else chosen
        uncached = req.num_prompt_tokens - filler.cached_tokens
        self._record(filler.worker, uncached, need_blocks if filler is chosen else 0)
        # Blocks before a worker's match are cached or predicted there already: predict the rest only.
        if prefill is not None:
            self._record(chosen.worker, 0, need_blocks)
            self.index.predict(prefill.worker_id, req.block_hashes[matched[prefill.worker_id] :])
        self.index.predict(decode.worker_id, req.block_hashes[matched[decode.worker_id] :])  # imports are cached
        policy_reason = (prefill or decode).reason
        self.decisions[(reason, policy_reason)] = self.decisions.get((reason, policy_reason), 0) + 1
        return Route(
            decode_worker=decode.worker_id,
            prefill_worker=prefill.worker_id if prefill else None,
            reason=reason,
            policy_reason=policy_reason,
            predicted_cached_tokens=filler.cached_tokens,
            decision_s=time.perf_counter() - start,
        )


@ray.remote(num_cpus=0)
class GlobalScheduler:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.router = Router(config)

    def register(self, workers: list[tuple[str, str]]) -> None:
        for worker_id, role in workers:
            self.router.register(worker_id, role)

    def remove(self, worker_id: str) -> None:
        self.router.remove(worker_id)

    def report(self, stats: WorkerStats, events: KVEventBatch | None = None) -> bool:
        return self.router.report(stats, events)

    def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[int]) -> None:
        self.router.resync(worker_id, epoch, seq, hashes)

    def route(self, req: RouteRequest) -> Route | NoCapacity:
        """Returns the exception instead of raising it, so callers get it without a Ray error wrapper."""
        try:
            return self.router.route(req)
        except NoCapacity as e:
            return e

    def route_batch(self, reqs: list[RouteRequest]) -> list[Route | NoCapacity]:
        """Many decisions in one call (the API server batches requests that arrive together)."""
        return [self.route(r) for r in reqs]

    def snapshot(self) -> dict:
        return {
            "views": {k: vars(v) for k, v in self.router.views.items()},
            "decisions": {f"{a}/{b}": n for (a, b), n in self.router.decisions.items()},
            "index_blocks": len(self.router.index),
        }
