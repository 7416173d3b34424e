"""Experimental routing policies for the simulator (variants of pdserve's PrefixAware), compared by name in
run.py like pdserve's own. Each changes one thing, so a run isolates its effect.
"""

from __future__ import annotations

from pdserve.scheduler.policies import Candidate, Decision, PrefixAware, SGLangCacheAware


class PrefixAwareQueue(PrefixAware):
    """`pa_queue`: reweighs prefix_aware's terms. pdserve's `prefix_aware` takes `decode_queue_weight` and
    `colocated_queue_weight` itself (the weights of prompt tokens queued for prefill on a decode-pool worker,
    1 and 0.25, both adopted from this study); `uncached_weight` (> 1 values a hit above queueing)
    reweighs the prefill cost's uncached suffix. Defaults equal pdserve's."""

    name = "pa_queue"

    def __init__(self, uncached_weight: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.ranked = False  # its cost() adds a term that the Router's ranked pools do not see
        self.uncached_weight = uncached_weight

    def cost(self, c: Candidate, request, pool: str) -> float:
        base = super().cost(c, request, pool)
        if pool == "prefill":
            return base + (self.uncached_weight - 1) * (request.num_prompt_tokens - c.cached_tokens)
        return base


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


VARIANTS = {cls.name: cls for cls in (PrefixAwareQueue, SGLangFresh)}


def make_variant(name: str, **options):
    """The experimental policy `name` built with `options`, or None when `name` is one of pdserve's own."""
    cls = VARIANTS.get(name)
    return None if cls is None else cls(**options)
