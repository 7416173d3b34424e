"""Router: pools, worker views fed by load reports and KV events, admission, and routing decisions; the
controller (`pdserve/controller/`) runs it, so membership and routing never disagree. Control plane only:
it sees request sizes and block hashes, never tokens or KV.

Membership and load are a projection of the controller's registry (`project`, fed by its change feed): a
worker is routable while it is ready and its last report says alive. The router's own are its predictions:
a decision is recorded at once (pending load, predicted cache entries) so a burst is spread before the
next reports arrive, and a report supersedes the load decisions made before it was taken; and the index.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from typing import Protocol

from pdserve.config import EngineConfig, RoutingConfig, ServeConfig, decode_capable
from pdserve.hashing import BlockHash
from pdserve.protocol import KVEventBatch, Route, RouteRequest, WorkerStats
from pdserve.router.policies import (
    Candidate,
    RoutingPolicy,
    WorkerView,
    decide_local_prefill,
    make_policy,
)
from pdserve.router.pool import Pool
from pdserve.router.prefix_index import PrefixIndex


class NoCapacity(Exception):
    """Every candidate's queue is full (or no worker is alive): the caller answers 429/503."""

    def __init__(self, message: str, retry_after: float = 1.0, unavailable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unavailable = unavailable


class RouterConfig(RoutingConfig):
    """The routing section of the config tree plus the engines' block size (the index hashes blocks)."""

    block_size: int = EngineConfig.model_fields["block_size"].default

    @classmethod
    def of(cls, config: ServeConfig) -> RouterConfig:
        return cls(**config.routing.model_dump(), block_size=config.engine.block_size)


class Member(Protocol):
    """A registry record as the router reads it (`pdserve.controller.registry.WorkerRecord`)."""

    worker_id: str
    role: str
    state: str
    stats: WorkerStats | None


class Router:
    def __init__(self, config: RouterConfig | None = None, policy: RoutingPolicy | None = None) -> None:
        self.config = config = config or RouterConfig()
        self.policy = policy or make_policy(config.policy, config.options(), block_size=config.block_size)
        self.index = PrefixIndex(config.max_index_blocks, config.prediction_ttl_s)
        self.views: dict[str, WorkerView] = {}
        self.pools = {"prefill": Pool("prefill", self.policy), "decode": Pool("decode", self.policy)}
        # worker -> (times, tokens, blocks) of the decisions since its last report, as parallel lists so a
        # decision allocates no objects that outlive it (each would count toward the next GC pass)
        self._pending: dict[str, tuple[list[float], list[int], list[int]]] = {}
        self.decisions: dict[tuple[str, str], int] = {}  # (placement reason, policy reason) -> count
        self._applied: dict[str, WorkerStats] = {}  # worker -> the report its view holds

    # ---- membership and reports ------------------------------------------------------------------
    def _pool(self, view: WorkerView) -> Pool:
        return self.pools["decode" if decode_capable(view.role) else "prefill"]  # decode: decode-capable

    def project(self, member: Member) -> None:
        """The registry's change feed, called with every new worker record: the one way membership and load
        reach the router in the controller (the simulator and tests may call `register`/`report` directly)."""
        worker_id, stats = member.worker_id, member.stats
        if member.state != "ready" or (stats is not None and not stats.alive):
            if worker_id in self.views:
                self.remove(worker_id)
            return
        view = self.views.get(worker_id)
        if view is None or view.role != member.role:
            self.register(worker_id, member.role)
            view = self.views[worker_id]
        if stats is not None and self._applied.get(worker_id) is not stats:
            self._load(view, stats)
            self._pool(view).update(view)

    def register(self, worker_id: str, role: str) -> None:
        if worker_id in self.views:
            self.remove(worker_id)
        view = self.views[worker_id] = WorkerView(worker_id, role)
        self._pending[worker_id] = ([], [], [])
        self._pool(view).add(view, self.index.bit(worker_id))

    def remove(self, worker_id: str) -> None:
        view = self.views.pop(worker_id, None)
        if view is not None:
            self._pool(view).remove(worker_id)
        self._pending.pop(worker_id, None)
        self._applied.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def report(self, stats: WorkerStats, events: KVEventBatch | None = None) -> bool:
        """Apply a load report and its KV events; False asks the worker for a full resync of its cache."""
        view = self.views.get(stats.worker_id)
        if view is None:
            return True
        if not stats.alive:
            self.remove(stats.worker_id)
            return True
        self._load(view, stats)
        return self.apply_events(stats.worker_id, events)

    def _load(self, view: WorkerView, stats: WorkerStats) -> None:
        self._applied[view.worker_id] = stats
        view.num_running, view.num_waiting = stats.num_running, stats.num_waiting
        if stats.time > view.refused_at:
            view.refused_at = 0.0
        view.num_free_slots = stats.num_free_slots
        view.num_prefill_tokens_queued = stats.num_prefill_tokens_queued
        view.num_free_blocks, view.num_blocks, view.kv_usage = stats.num_free_blocks, stats.num_blocks, stats.kv_usage
        times, tokens, blocks = self._pending[stats.worker_id]
        taken = bisect_right(times, stats.time)  # decided before the report was taken: in it already
        del times[:taken], tokens[:taken], blocks[:taken]
        view.pending_requests, view.pending_tokens, view.pending_blocks = len(times), sum(tokens), sum(blocks)

    def apply_events(self, worker_id: str, events: KVEventBatch | None) -> bool:
        """A report's KV events into the index; False asks the worker for a full resync of its cache."""
        view = self.views.get(worker_id)
        if view is None:
            return True
        in_sync = True
        if events is not None:
            in_sync = self.index.apply(events.worker_id, events.epoch, events.seq, events.events)
        view.num_cached_blocks = self.index.num_blocks(worker_id)
        self._pool(view).update(view)
        self.index.expire_predictions()
        return in_sync

    def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[BlockHash]) -> None:
        view = self.views.get(worker_id)
        if view is not None:
            self.index.resync(worker_id, epoch, seq, hashes)
            view.num_cached_blocks = self.index.num_blocks(worker_id)
            self._pool(view).update(view)

    # ---- decisions -------------------------------------------------------------------------------
    def _record(self, view: WorkerView, tokens: int, blocks: int) -> None:
        times, pending_tokens, pending_blocks = self._pending[view.worker_id]
        times.append(time.time())
        pending_tokens.append(tokens)
        pending_blocks.append(blocks)
        view.pending_requests += 1
        view.pending_tokens += tokens
        view.pending_blocks += blocks
        self._pool(view).update(view)

    def route(self, req: RouteRequest) -> Route:
        start = time.perf_counter()
        max_waiting, bs = self.config.max_waiting_per_worker, self.config.block_size
        need_blocks = -(-(req.num_prompt_tokens + 1) // bs)
        most = req.num_prompt_tokens - 1  # the last prompt token is always computed
        decode_pool, prefill_pool = self.pools["decode"], self.pools["prefill"]
        if not decode_pool.views:
            raise NoCapacity("no decode-capable worker is alive", retry_after=5.0, unavailable=True)
        now = time.time()
        for worker_id in req.exclude:  # each refused this request at its bound: the estimate was behind
            if (view := self.views.get(worker_id)) is not None:
                view.refused_at = now

        def admits_prefill(w: WorkerView) -> bool:
            return not w.refused_at and w.queue_depth < max_waiting

        def admits_decode(w: WorkerView) -> bool:
            return admits_prefill(w) and (not w.num_blocks or w.num_blocks - w.used_blocks >= need_blocks)

        def to_tokens(blocks: int) -> int:
            return min(blocks * bs, most)

        ends = self.index.match_ends(req.block_hashes)
        decode_cands = decode_pool.candidates(admits_decode, ends, to_tokens)
        if not decode_cands:
            raise NoCapacity(f"all {len(decode_pool.views)} decode-capable workers are full (queue or KV blocks)")
        prefill_cands = prefill_pool.candidates(admits_prefill, ends, to_tokens)
        if prefill_pool.views and not prefill_cands:
            raise NoCapacity(f"all {len(prefill_pool.views)} prefill workers have full queues")

        decode = self.policy.pick([c for c, _ in decode_cands], req, "decode")
        chosen, decode_blocks = next(p for p in decode_cands if p[0].worker.worker_id == decode.worker_id)
        hashes, decode_bit = req.block_hashes, decode_pool.bits[decode.worker_id]
        prefill = None
        if chosen.worker.role == "colocated":
            local, reason = True, "colocated"
        else:
            best = prefill_pool.least_queued(admits_prefill)
            # Local prefill counts on what the decode worker holds now, not on imports predicted to land.
            held = self.index.held_blocks(decode_bit, hashes, decode_blocks)
            if held < decode_blocks:
                chosen = Candidate(chosen.worker, to_tokens(held))
            local, reason = decide_local_prefill(chosen, best, req, self.config.disagg)
            if not local:
                prefill = self.policy.pick([c for c, _ in prefill_cands], req, "prefill")
        unheld = max((blocks for blocks, _ in ends), default=0)  # no worker caches the prompt from here
        limit = self.config.max_predicted_blocks or len(hashes)
        # Blocks before a worker's match are cached or predicted there already: predict from there on.
        if prefill is None:
            filler = chosen
            self._record(chosen.worker, req.num_prompt_tokens - chosen.cached_tokens, need_blocks)
            self.index.predict_mask(decode_bit, hashes, decode_blocks, decode_blocks + limit, unheld)
        else:
            filler, prefill_blocks = next(p for p in prefill_cands if p[0].worker.worker_id == prefill.worker_id)
            self._record(filler.worker, req.num_prompt_tokens - filler.cached_tokens, 0)
            self._record(chosen.worker, 0, need_blocks)
            prefill_bit = prefill_pool.bits[prefill.worker_id]  # and the decode worker caches what it imports
            if prefill_blocks == decode_blocks:
                self.index.predict_mask(prefill_bit | decode_bit, hashes, decode_blocks, decode_blocks + limit, unheld)
            else:
                self.index.predict_mask(prefill_bit, hashes, prefill_blocks, prefill_blocks + limit, unheld)
                self.index.predict_mask(decode_bit, hashes, decode_blocks, decode_blocks + limit, unheld)
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
