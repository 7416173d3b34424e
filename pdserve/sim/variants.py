"""Experimental routing policies for the simulator (variants of pdserve's PrefixAware), compared by name in
run.py like pdserve's own. Each changes one thing, so a run isolates its effect.
"""

from __future__ import annotations

from pydantic import Field

from pdserve.config import EngineConfig
from pdserve.policy_options import PrefixAwareOptions, SGLangCacheAwareOptions
from pdserve.router.policies import Candidate, Pick, PrefixAware, SGLangCacheAware, make_policy


class PrefixAwareQueueOptions(PrefixAwareOptions):
    uncached_weight: float = Field(1.0, ge=0, description="weight of the prefill cost's uncached suffix")


class PrefixAwareQueue(PrefixAware):
    """`pa_queue`: reweighs prefix_aware's terms. pdserve's `prefix_aware` takes `decode_queue_weight` and
    `colocated_queue_weight` itself (the weights of prompt tokens queued for prefill on a decode-pool worker,
    1 and 0.25, both adopted from this study); `uncached_weight` (> 1 values a hit above queueing)
    reweighs the prefill cost's uncached suffix. Defaults equal pdserve's."""

    name = "pa_queue"
    Options = PrefixAwareQueueOptions

    def __init__(self, options: PrefixAwareQueueOptions | None = None) -> None:
        options = options or self.Options()
        super().__init__(options)
        self.ranked = False  # its cost() adds a term that the Router's ranked pools do not see
        self.uncached_weight = options.uncached_weight

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
    uses_block_size = True

    def __init__(self, options: SGLangCacheAwareOptions | None = None, *, block_size: int) -> None:
        super().__init__(options)
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
        return Pick(best.worker.worker_id, "smallest_cache")


VARIANTS = {cls.name: cls for cls in (PrefixAwareQueue, SGLangFresh)}


def make_variant(name: str, block_size: int = EngineConfig.model_fields["block_size"].default, **options):
    """The experimental policy `name` built with `options`, or None when `name` is one of pdserve's own."""
    if name not in VARIANTS:
        return None
    return make_policy(name, options, block_size, policies=VARIANTS)
