"""Typed records that cross engine, actor and process boundaries (msgspec).

Everything a worker sends or receives is one of these structs; no free-form dicts on the wire.
"""

from __future__ import annotations

import math

import msgspec

from pdserve.hashing import BlockHash


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to sample one request. vLLM's names and defaults; `validate()` raises ValueError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each sampled token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def validate(self) -> SamplingParams:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob) of the most likely alternatives, best first


class TokenDelta(msgspec.Struct, kw_only=True):
    """What one engine step produced for one request: new tokens and the text they complete."""

    request_id: str
    new_token_ids: list[int]
    text: str  # newly completed text; never ends inside a UTF-8 character
    index: int = 0  # position of the first new token among the request's output tokens
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    held: bool = False  # prefill role: the blocks stay held for the receiver until the sender releases them
    queue_s: float | None = None  # first delta only: arrival -> first scheduled, in this engine
    prefill_s: float | None = None  # first delta only: first scheduled -> first token
    moved_to: str | None = None  # no tokens: the request now continues on this worker (a live migration)


class ExportedRequest(msgspec.Struct, kw_only=True):
    """A running request's state, enough for another engine to continue it token-for-token.

    The KV for the first `num_computed_tokens` tokens lives in the sender's blocks (listed beside this
    record), which the sender holds until the receiver has copied them.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    rng_state: bytes
    num_cached_tokens: int = 0
    block_size: int = 16
    model_id: str = ""
    text_emitted: int = 0  # characters of output text the sender already emitted (the rest it held back)
    cache_salt: str | None = None  # the receiver caches (and reuses) its KV under the same salt


class KVEvent(msgspec.Struct, kw_only=True, tag=True):
    """Base of the prefix-cache events an engine reports for the global index."""


class BlockStored(KVEvent, kw_only=True):
    block_hashes: list[BlockHash]
    parent_hash: BlockHash | None


class BlockRemoved(KVEvent, kw_only=True):
    block_hashes: list[BlockHash]


class AllBlocksCleared(KVEvent, kw_only=True):
    pass


class KVReservation(msgspec.Struct, kw_only=True):
    """Blocks a receiving engine reserved for an imported request's KV.

    The first `num_cached_blocks` already hold the right KV (the receiver's own prefix cache); the sender's
    blocks at positions [num_cached_blocks, len(block_ids)) must be copied into the rest.
    """

    request_id: str
    block_ids: list[int]
    num_cached_blocks: int = 0


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of an engine's paged KV cache; two peers can move blocks only if these agree (but num_blocks)."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_bytes: int  # one block, all layers, K and V: contiguous in the block-major cache
    # "cpu" | "cuda": a request's RNG state (carried by a handoff or a migration) is a device generator's,
    # whose format differs between device types, so a CPU engine and a GPU engine are not peers
    device_type: str = "cpu"

    def mismatch(self, other: KVLayout) -> str | None:
        """A sentence naming the first field that differs (num_blocks may differ), or None."""
        fields = ("model_id", "device_type", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")
        for name in (*fields, "block_bytes"):
            if getattr(self, name) != getattr(other, name):
                return (
                    f"KV layout mismatch: {name} is {getattr(self, name)!r} here, {getattr(other, name)!r} at the peer"
                )
        return None


class PeerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker publishes at start-up so peers can pull its KV blocks (exchanged through Ray)."""

    name: str  # unique transport agent name (the worker id)
    transport: str  # "nixl" | "local"
    layout: KVLayout
    base_address: int  # address of block 0 of the registered cache
    device_id: int = 0
    memory: str = "DRAM"  # "DRAM" | "VRAM"
    agent_metadata: bytes = b""  # the transport's own connection blob (NIXL agent metadata)


# ---- worker and router messages ------------------------------------------------------------------


class EngineRequest(msgspec.Struct, kw_only=True):
    """A validated, tokenized request as the API server hands it to a worker."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0  # wall clock at the API server
    reply_to: str = ""  # the frontend whose outbox on the worker gets this request's tokens
    cache_salt: str | None = None  # shares prefix-cached KV only with requests under the same salt


class KVHandoff(msgspec.Struct, kw_only=True):
    """A prefilled request whose KV a decode worker may pull: the sender holds the blocks until the
    receiver confirms (after the pull, or giving up), the lease deadline, or the receiver's death."""

    request: ExportedRequest
    prefill_worker: str  # worker id, also the transport peer name
    block_ids: list[int]  # sender's blocks, in order, covering request.num_computed_tokens
    lease_deadline: float  # wall clock
    num_bytes: int


class PrefillResult(msgspec.Struct, kw_only=True):
    delta: TokenDelta  # the first token (finished if the request ended there)
    handoff: KVHandoff | None  # None when finished at the first token
    queue_s: float  # arrival at the worker -> first scheduled
    prefill_s: float  # first scheduled -> first token


class Refused(msgspec.Struct, kw_only=True):
    """A worker's answer to a request it will not admit (nothing was reserved or started for it): it has
    `num_admitted` requests running, queued, importing or holding a reserved slot, and takes at most `limit`
    (`engine.max_num_seqs` + `routing.max_waiting_per_worker`). The frontend routes the request elsewhere."""

    worker_id: str
    reason: str  # "full" (at its bound), or why else it refuses
    num_admitted: int = 0
    limit: int = 0


class DecodeStarted(msgspec.Struct, kw_only=True):
    kv_transfer_s: float
    num_bytes: int  # bytes pulled (blocks the receiver already cached are not pulled)


class MigrationStage(msgspec.Struct, kw_only=True):
    """One stage of a live migration, sent by the source to the target: the target stages the source's
    full blocks `src_block_ids` (positions `start`.. of the request's KV), which cover `token_ids`' blocks
    from `start` on; `token_ids` runs from the first token (for the target's prefix-cache lookup)."""

    migration_id: str
    request_id: str
    source: str  # source worker id (the transport peer)
    start: int
    token_ids: list[int]
    src_block_ids: list[int]
    cache_salt: str | None = None  # the request's: the target's prefix-cache lookup is under it
    # wall clock (0: none): the target starts no pull after it and ends its pulls by it; the source keeps the
    # blocks readable until its own wait for the stage ends, after it
    deadline: float = 0.0


class MigrationFinal(msgspec.Struct, kw_only=True):
    """The last stage: the request is paused at the source; its state and the blocks not staged yet."""

    migration_id: str
    request: ExportedRequest
    source: str
    start: int  # blocks the earlier stages staged
    src_block_ids: list[int]  # the source's blocks from position `start` to the end of the KV
    reply_to: str  # the frontend whose outbox streams the request
    paused_at: float  # wall clock when the source stopped the request
    deadline: float = 0.0  # as MigrationStage's


class StageResult(msgspec.Struct, kw_only=True):
    num_copied: int  # blocks pulled
    num_reused: int  # blocks the target's prefix cache already held (not copied)
    first_token_at: float = 0.0  # final stage: wall clock of the target's first token (0: none came)


class MigrationRecord(msgspec.Struct, kw_only=True):
    """How one migration went (the controller's metrics and the operator's answer)."""

    request_id: str
    source: str
    target: str
    reason: str  # operator | rebalance | drain | out_of_blocks
    outcome: str  # migrated | failed | finished (ended mid-migration) | aborted | refused
    blocks_per_stage: list[int] = msgspec.field(default_factory=list)  # blocks copied per stage, last = final
    num_reused: int = 0
    num_bytes: int = 0
    pause_s: float = 0.0  # source stop -> the target's first token
    total_s: float = 0.0
    error: str = ""


class WorkerStats(msgspec.Struct, kw_only=True):
    worker_id: str
    role: str
    num_running: int
    num_waiting: int
    num_held: int  # requests whose blocks are held here for a peer to pull (under a lease)
    num_free_blocks: int
    num_blocks: int
    kv_usage: float
    num_prefill_tokens_queued: int  # prompt tokens admitted but not yet computed
    time: float  # wall clock when taken
    # batch slots free now (max_num_seqs less running and waiting): requests routed here before the next report start
    # at once in these rather than wait; 0 when unknown (every routed request is counted as waiting)
    num_free_slots: int = 0
    alive: bool = True
    draining: bool = False
    # cumulative since the worker started, over the prompts it prefilled (its prefix-cache hit rate)
    prefix_prompt_tokens_total: int = 0
    prefix_hit_tokens_total: int = 0
    num_requests_total: int = 0  # requests admitted (generate, prefill, or a KV import), cumulative
    num_refused_total: int = 0  # requests refused at the admission bound (a `Refused` answer), cumulative
    num_generated_tokens_total: int = 0  # tokens sampled here, cumulative (decode throughput's numerator)
    num_importing: int = 0  # requests whose KV is on its way here (slot reserved, or reserved blocks pulling)


class WorkerInfo(msgspec.Struct, kw_only=True):
    """Who a worker is: what the controller's registry rebuilds itself from after a restart."""

    worker_id: str
    role: str
    node_id: str
    pid: int
    started_at: float
    peer: PeerInfo


class RouteRequest(msgspec.Struct, kw_only=True):
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    block_hashes: list[BlockHash] = msgspec.field(default_factory=list)  # the prompt's full blocks (hashing.py)
    # workers that refused this request (a `Refused` answer): not picked again, and held full until they report
    exclude: list[str] = msgspec.field(default_factory=list)


class Route(msgspec.Struct, kw_only=True):
    decode_worker: str
    prefill_worker: str | None  # None: prefill on the decode (or colocated) worker itself
    reason: str = ""  # why this prefill placement: disaggregated, decode_has_prefix, prefill_saturated, ...
    policy_reason: str = ""  # the policy's own reason for its pick (prefix_hit, load, ...)
    predicted_cached_tokens: int = 0  # prompt tokens the index expects the prefilling worker to have cached
    decision_s: float = 0.0  # time the router spent deciding


class KVEventBatch(msgspec.Struct, kw_only=True):
    """One worker's KV events since its last batch; `seq` increments per batch, `epoch` per worker start."""

    worker_id: str
    epoch: str
    seq: int
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]  # the tagged union: decodable from msgpack
