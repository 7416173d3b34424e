"""The typed options of each routing policy (`routing.policy_options`), one frozen pydantic model per policy:
an unknown key or a bad value is an error naming it. Torch- and router-free, so the config tree validates
the options at load and `pdserve.router.policies` builds each policy from an instance of its model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PolicyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RoundRobinOptions(PolicyOptions):
    """round_robin takes no options."""


class LeastLoadedOptions(PolicyOptions):
    """least_loaded takes no options."""


class PrefixAwareOptions(PolicyOptions):
    """prefix_aware's cost terms, in prompt-token units (see `PrefixAware`)."""

    temperature: float = Field(0.0, ge=0, description="softmax temperature over costs (0: argmin); routing.temperature")
    request_overhead_tokens: int = Field(32, ge=0, description="prefill cost of each request queued on the worker")
    decode_seq_tokens: int = Field(64, ge=0, description="decode cost of each sequence running on the worker")
    kv_full_tokens: int = Field(4096, ge=0, description="decode cost of a full KV cache (scaled by its usage)")
    decode_queue_weight: float = Field(1.0, ge=0, description="weight of prompt tokens queued on a decode worker")
    colocated_queue_weight: float = Field(0.25, ge=0, description="...and on a colocated worker")
    seed: int = Field(0, description="seed of the sampling RNG (with a temperature > 0)")


class SGLangCacheAwareOptions(PolicyOptions):
    """sglang_cache_aware's thresholds, as SGLang's router names them."""

    balance_abs_threshold: int = Field(64, ge=0, description="balance by load when loads differ by more than this")
    balance_rel_threshold: float = Field(1.5, ge=0, description="...and the largest is this many times the smallest")
    cache_threshold: float = Field(0.3, ge=0, description="follow the longest match above this prompt share")


class DynamoKVCostOptions(PolicyOptions):
    """dynamo_kv_cost's weight of prefill blocks against decode blocks."""

    overlap_weight: float = Field(1.0, ge=0, description="weight of queued and uncached prompt blocks")


POLICY_OPTIONS: dict[str, type[PolicyOptions]] = {
    "prefix_aware": PrefixAwareOptions,
    "least_loaded": LeastLoadedOptions,
    "round_robin": RoundRobinOptions,
    "sglang_cache_aware": SGLangCacheAwareOptions,
    "dynamo_kv_cost": DynamoKVCostOptions,
}
