"""One request's state inside an engine: tokens, progress, blocks, sampling RNG and detokenizer."""

from __future__ import annotations

import enum
import time

import torch

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.hashing import BlockHash, block_hashes
from pdserve.protocol import SamplingParams


class Role(str, enum.Enum):
    COLOCATED = "colocated"  # prefill and decode here
    PREFILL = "prefill"  # compute the prompt, sample the first token, hold the blocks for export
    DECODE = "decode"  # admitted by import: KV arrives from a peer into reserved blocks


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # imported; blocks reserved, KV not yet copied in
    HELD = "held"  # not scheduled; blocks kept for a peer to pull (prefill done, or exported)
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        role: Role,
        detokenizer: IncrementalDetokenizer,
        generator: torch.Generator,
        root: BlockHash,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.role = role
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from a prefix cache (first admission only)
        self.block_ids: list[int] = []
        self.cache_salt = cache_salt  # requests share cached blocks only under the same salt
        self.root = root  # root_hash(model id, cache_salt): the parent of the first block's hash
        self.block_hashes: list[BlockHash] = []
        self.num_cached_blocks = 0  # leading blocks registered in the prefix cache
        self.detokenizer = detokenizer
        self.generator = generator
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.admitted = False
        self.no_park = False  # a migration away under memory pressure failed once: preempt it instead
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def update_hashes(self, block_size: int) -> list[BlockHash]:
        self.block_hashes = block_hashes(self.all_token_ids, block_size, self.root, self.block_hashes)
        return self.block_hashes
