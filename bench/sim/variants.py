"""Experimental routing policies for the simulator (variants of pdserve's PrefixAware), compared by name in
run.py like pdserve's own. Each changes one thing, so a run isolates its effect.
"""

from __future__ import annotations

from pdserve.scheduler.policies import Candidate, Decision, PrefixAware, SGLangCacheAware


class PrefixAwareQueue(PrefixAware):
    """`pa_queue`: a decode worker's cost also counts the prompt tokens queued for prefill on it (local
    prefills the decider sent there) times `decode_queue_weight`, a mixed worker's times `mixed_queue_weight`;
    the prefill cost weighs the uncached suffix by `uncached_weight` (> 1 values a hit above queueing)."""

    name = "pa_queue"

    def __init__(
        self, decode_queue_weight: float = 1.0, mixed_queue_weight: float = 0.0, uncached_weight: float = 1.0, **options
    ) -> None:
        super().__init__(**options)
        self.decode_queue_weight, self.mixed_queue_weight = decode_queue_weight, mixed_queue_weight
        self.uncached_weight = uncached_weight

    def cost(self, c: Candidate, request, pool: str) -> float:
        base = super().cost(c, request, pool)
        if pool == "prefill":
            return base + (self.uncached_weight - 1) * (request.num_prompt_tokens - c.cached_tokens)
        weight = self.decode_queue_weight if c.worker.role == "decode" else self.mixed_queue_weight
        return base + weight * c.worker.queued_tokens


class PrefixAwareSpread(PrefixAware):
    """`pa_spread`: ties (e.g. a request no worker caches, on idle workers) go to the worker with the fewest
    cached blocks, not the lowest id, so new prefixes spread over the pool's caches (SGLang's fallback)."""

    name = "pa_spread"

    def pick(self, candidates, request, pool):
        costs = [self.cost(c, request, pool) for c in candidates]
        low = min(costs)
        tied = [c for c, x in zip(candidates, costs) if x == low]
        if len(tied) == 1 or self.temperature > 0:
            return super().pick(candidates, request, pool)
        best = min(tied, key=lambda c: (c.worker.num_cached_blocks + c.worker.pending_blocks, c.worker.worker_id))
        return super().pick([best], request, pool)


class PrefixAwareProposed(PrefixAwareQueue, PrefixAwareSpread):
    """`pa_proposed`: both changes, `pa_queue`'s cost with `pa_spread`'s tie-break."""

    name = "pa_proposed"


class SGLangFresh(SGLangCacheAware):
    """`sglang_fresh`: SGLang's fallback as SGLang's router does it: the tree it compares grows on every
    routing decision (here: indexed blocks plus the blocks routed there since the last report), not only
    when KV events arrive, so a burst of unmatched requests is not all sent to one worker."""

    name = "sglang_fresh"

    def __init__(self, block_size: int = 16, **options) -> None:
        super().__init__(**options)
        self.block_size = block_size

    def pick(self, candidates, request, pool):
        decision = super().pick(candidates, request, pool)
        if decision.reason != "smallest_cache":
            return decision
        best = min(
            candidates,
            key=lambda c: (
                c.worker.num_cached_blocks + c.worker.pending_tokens // self.block_size + c.worker.pending_blocks,
                c.worker.worker_id,
            ),
        )
        return Decision(best.worker.worker_id, "smallest_cache")


VARIANTS = {cls.name: cls for cls in (PrefixAwareQueue, PrefixAwareSpread, PrefixAwareProposed, SGLangFresh)}


def make_variant(name: str, **options):
    """The experimental policy `name` built with `options`, or None when `name` is one of pdserve's own."""
    cls = VARIANTS.get(name)
    return None if cls is None else cls(**options)
