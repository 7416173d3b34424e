"""Routing policies and the disaggregation decider: pure functions of typed snapshots, chosen by name.

Contract: the Router calls `pick(candidates, request, pool)` with the live, admissible workers of one pool
("prefill" or "decode"), each with the prompt tokens it already caches, and records the decision at
once. A policy does no I/O; it may keep small state of its own (round-robin's cursor, a seeded RNG).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pdserve.config import DisaggConfig, EngineConfig
from pdserve.policy_options import (
    DynamoKVCostOptions,
    LeastLoadedOptions,
    PolicyOptions,
    PrefixAwareOptions,
    RoundRobinOptions,
    SGLangCacheAwareOptions,
)
from pdserve.protocol import RouteRequest


@dataclass
class WorkerView:
    """What the router believes about one worker: its last report plus decisions made since."""

    worker_id: str
    role: str
    num_running: int = 0
    num_waiting: int = 0
    num_prefill_tokens_queued: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0  # 0: not reported yet (capacity unknown)
    kv_usage: float = 0.0
    num_cached_blocks: int = 0  # blocks this worker has in the global prefix index
    pending_requests: int = 0  # routed here since the last report
    pending_tokens: int = 0  # uncached prompt tokens routed here since the last report
    pending_blocks: int = 0  # KV blocks those requests will take
    num_free_slots: int = 0  # batch slots free at the last report (routed requests fill these first)
    refused_at: float = 0.0  # wall clock of its last refusal (it was at its bound): full until a later report

    @property
    def queue_depth(self) -> int:
        """Requests waiting here, counting those routed since the last report beyond its free batch slots."""
        return self.num_waiting + max(0, self.pending_requests - self.num_free_slots)

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting + self.pending_requests

    @property
    def queued_tokens(self) -> int:
        return self.num_prefill_tokens_queued + self.pending_tokens

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks + self.pending_blocks


@dataclass(slots=True)
class Candidate:  # not frozen: the router builds one per worker per decision (113 ns instead of 300)
    worker: WorkerView
    cached_tokens: int  # leading prompt tokens this worker already has in its prefix cache


@dataclass(frozen=True)
class Pick:
    """A policy's choice in one pool: the worker and why (the policy's reason, a metric label)."""

    worker_id: str
    reason: str


class RoutingPolicy(Protocol):
    """Built by `make_policy(name, options, block_size)` from an instance of its `Options` model (unknown
    keys and bad values are refused there, named); a policy with `uses_block_size` also gets the engines'
    block size, which is context, not an option."""

    name: str
    ranked: bool  # True: a CostPolicy whose pools the Router may keep ranked (see CostPolicy)
    Options: type[PolicyOptions]
    uses_block_size: bool

    def pick(self, candidates: list[Candidate], request: RouteRequest, pool: str) -> Pick:
        """Choose one of the candidates (never empty) for `request` in `pool` ("prefill" or "decode")."""


def _argmin(candidates: list[Candidate], key) -> Candidate:
    return min(candidates, key=lambda c: (key(c), c.worker.worker_id))


class CostPolicy:
    """A policy whose cost splits into a worker term and a request term:

        cost = worker_cost(view, pool) + request_cost(cached_tokens, request, pool), ties to the lowest tiebreak,

    where request_cost never grows with `cached_tokens` and tiebreak(view, pool) ends with the worker id. The Router
    then keeps each pool sorted by (worker_cost, tiebreak) as views change, and a decision scores only the
    workers caching part of the prompt plus the first admissible worker of that order: every other worker
    costs at least as much as that one. `pick` over all candidates gives the same answer (the oracle)."""

    ranked = True
    uses_block_size = False

    def worker_cost(self, view: WorkerView, pool: str) -> float:
        raise NotImplementedError

    def request_cost(self, cached_tokens: int, request: RouteRequest, pool: str) -> float:
        return 0

    def tiebreak(self, view: WorkerView, pool: str) -> tuple:
        return (view.worker_id,)

    def reason(self, chosen: Candidate) -> str:
        return self.name

    def cost(self, c: Candidate, request: RouteRequest, pool: str) -> float:
        return self.worker_cost(c.worker, pool) + self.request_cost(c.cached_tokens, request, pool)

    def pick(self, candidates, request, pool) -> Pick:
        best = min(candidates, key=lambda c: (self.cost(c, request, pool), self.tiebreak(c.worker, pool)))
        return Pick(best.worker.worker_id, self.reason(best))


class RoundRobin:
    name = "round_robin"
    ranked = False
    Options = RoundRobinOptions
    uses_block_size = False

    def __init__(self, options: RoundRobinOptions | None = None) -> None:
        self._next: dict[str, int] = {}

    def pick(self, candidates, request, pool) -> Pick:
        ordered = sorted(candidates, key=lambda c: c.worker.worker_id)
        i = self._next.get(pool, 0)
        self._next[pool] = i + 1
        return Pick(ordered[i % len(ordered)].worker.worker_id, "round_robin")


class LeastLoaded(CostPolicy):
    """Prefill pool: fewest queued prompt tokens, then fewest requests; decode pool: fewest requests, then
    lowest KV usage. Blind to prefixes."""

    name = "least_loaded"
    Options = LeastLoadedOptions

    def __init__(self, options: LeastLoadedOptions | None = None) -> None:
        pass

    def worker_cost(self, view, pool) -> float:
        return view.queued_tokens if pool == "prefill" else view.load

    def tiebreak(self, view, pool) -> tuple:
        return (view.load, view.worker_id) if pool == "prefill" else (view.kv_usage, view.worker_id)


class PrefixAware(CostPolicy):
    """Cost in prompt-token units. Prefill: tokens this worker must compute for the request (uncached
    suffix) plus prompt tokens already queued there, plus `request_overhead_tokens` per queued request.
    Decode: running sequences (each worth `decode_seq_tokens`), KV usage (a full cache is worth
    `kv_full_tokens`) and prompt tokens queued there for prefill (weighted `decode_queue_weight` on a
    decode worker, where they are local prefills the decider sent, and `colocated_queue_weight` on a colocated
    one), minus the prompt it caches (a local prefill, if the decider picks one, is cheaper). Equal costs go
    to the worker with the fewest cached and pending blocks, so an idle pool spreads its caches.
    A `temperature` > 0 samples from softmax(-cost / temperature) to spread near-ties (then unranked: every
    candidate's cost is needed)."""

    name = "prefix_aware"
    Options = PrefixAwareOptions

    def __init__(self, options: PrefixAwareOptions | None = None) -> None:
        options = options or self.Options()
        self.temperature = options.temperature
        self.queue_weight = {"decode": options.decode_queue_weight, "colocated": options.colocated_queue_weight}
        self.ranked = options.temperature <= 0
        self.request_overhead_tokens = options.request_overhead_tokens
        self.decode_seq_tokens = options.decode_seq_tokens
        self.kv_full_tokens = options.kv_full_tokens
        self._rng = random.Random(options.seed)

    def worker_cost(self, w: WorkerView, pool: str) -> float:
        if pool == "prefill":
            return w.queued_tokens + self.request_overhead_tokens * (w.num_waiting + w.pending_requests)
        queued = self.queue_weight[w.role] * w.queued_tokens
        return self.decode_seq_tokens * w.load + self.kv_full_tokens * w.used_blocks / max(1, w.num_blocks) + queued

    def request_cost(self, cached_tokens: int, request: RouteRequest, pool: str) -> float:
        return request.num_prompt_tokens - cached_tokens if pool == "prefill" else -cached_tokens

    def tiebreak(self, view: WorkerView, pool: str) -> tuple:
        return (view.num_cached_blocks + view.pending_blocks, view.worker_id)

    def reason(self, chosen: Candidate) -> str:
        return "prefix_hit" if chosen.cached_tokens else "load"

    def pick(self, candidates, request, pool) -> Pick:
        if self.temperature <= 0 or len(candidates) == 1:
            return super().pick(candidates, request, pool)
        costs = [self.cost(c, request, pool) for c in candidates]
        low = min(costs)
        weights = [math.exp(-(x - low) / self.temperature) for x in costs]
        chosen = self._rng.choices(candidates, weights=weights)[0]
        return Pick(chosen.worker.worker_id, self.reason(chosen))


class SGLangCacheAware:
    """SGLang router's cache-aware policy: balance when the load spread is large, else follow the longest
    prefix match when its ratio exceeds 0.3, else the worker with the smallest cache."""

    name = "sglang_cache_aware"
    ranked = False
    Options = SGLangCacheAwareOptions
    uses_block_size = False

    def __init__(self, options: SGLangCacheAwareOptions | None = None) -> None:
        options = options or self.Options()
        self.abs, self.rel = options.balance_abs_threshold, options.balance_rel_threshold
        self.threshold = options.cache_threshold

    def pick(self, candidates, request, pool) -> Pick:
        loads = [c.worker.load for c in candidates]
        if max(loads) - min(loads) > self.abs and max(loads) > self.rel * min(loads):
            return Pick(_argmin(candidates, lambda c: c.worker.load).worker.worker_id, "imbalanced")
        best = max(candidates, key=lambda c: (c.cached_tokens, -c.worker.load))
        if best.cached_tokens / max(1, request.num_prompt_tokens) > self.threshold:
            return Pick(best.worker.worker_id, "prefix_match")
        return Pick(_argmin(candidates, lambda c: c.worker.num_cached_blocks).worker.worker_id, "smallest_cache")


class DynamoKVCost(CostPolicy):
    """Dynamo's KV router cost: 1.0 x (prefill blocks queued on the worker + uncached prompt blocks of this
    request) + decode blocks active on it; the lowest wins."""

    name = "dynamo_kv_cost"
    Options = DynamoKVCostOptions
    uses_block_size = True

    def __init__(self, options: DynamoKVCostOptions | None = None, *, block_size: int) -> None:
        options = options or self.Options()
        self.block_size, self.weight = block_size, options.overlap_weight

    def worker_cost(self, view, pool) -> float:
        return self.weight * -(-view.queued_tokens // self.block_size) + view.used_blocks

    def request_cost(self, cached_tokens, request, pool) -> float:
        return self.weight * -(-(request.num_prompt_tokens - cached_tokens) // self.block_size)

    def reason(self, chosen) -> str:
        return "kv_cost"


POLICIES = {p.name: p for p in (RoundRobin, LeastLoaded, PrefixAware, SGLangCacheAware, DynamoKVCost)}


def make_policy(
    name: str,
    options: PolicyOptions | Mapping[str, Any] | None = None,
    block_size: int = EngineConfig.model_fields["block_size"].default,
    policies: Mapping[str, type] = POLICIES,
) -> RoutingPolicy:
    """The policy `name` of `policies` with `options` (its Options model, or a mapping validated against it:
    an unknown key or a bad value is a ValueError naming it)."""
    if name not in policies:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {sorted(policies)}")
    cls = policies[name]
    if not isinstance(options, cls.Options):
        options = cls.Options.model_validate(dict(options or {}))
    return cls(options, block_size=block_size) if cls.uses_block_size else cls(options)


def decide_local_prefill(
    decode: Candidate, best_prefill: WorkerView | None, request: RouteRequest, cfg: DisaggConfig
) -> tuple[bool, str]:
    """Whether the chosen decode worker should prefill the request itself, and why.

    A local prefill's chunks run in the same steps as the worker's decodes and lengthen each of them. So
    beyond a suffix of `local_prefill_max_tokens` (a step's worth of noise), a decode worker prefills only
    while the prompt tokens queued there, this one's included, fit in `local_prefill_step_tokens`: every
    step then carries at most that much prefill, and its decodes keep their TPOT however long the prefill
    queues grow. A longer prompt waits for a prefill worker: a prefill pool too small for the load shows
    as TTFT, not as stalled decodes (a huge budget restores the old trade: decode steps lent to prefill)."""
    if best_prefill is None:
        return True, "no_prefill_worker"
    suffix = request.num_prompt_tokens - decode.cached_tokens
    if suffix <= cfg.local_prefill_max_tokens:
        return True, "decode_has_prefix"
    w = decode.worker
    room = (w.num_blocks - w.used_blocks) / max(1, w.num_blocks)
    if best_prefill.queued_tokens < cfg.prefill_saturated_tokens or room < cfg.decode_room_fraction:
        return False, "disaggregated"
    if w.queued_tokens + suffix <= cfg.local_prefill_step_tokens:
        return True, "prefill_saturated"
    return False, "disaggregated"
