"""A simulated paged KV cache: block counts, a prefix cache keyed by block hash, LRU eviction, KV events.

Mirrors pdserve's BlockManager without block ids: a cached block with no reference is free (counted in
`num_free`) but keeps its KV until a new allocation evicts it, oldest first; uncached blocks are reused
first. A request owns `Blocks`: the cached hashes it references plus a count of anonymous blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from pdserve.protocol import BlockRemoved, BlockStored, KVEvent


@dataclass
class Blocks:
    hashes: list[int] = field(default_factory=list)  # referenced cached blocks, in prompt order
    anon: int = 0  # referenced blocks without a (unique) hash

    @property
    def count(self) -> int:
        return len(self.hashes) + self.anon


class KVCache:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref: dict[int, int] = {}  # cached hash -> references (in use)
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._anon = 0
        self.events: list[KVEvent] = []

    @property
    def num_free(self) -> int:
        return self.num_blocks - len(self._ref) - self._anon

    def match(self, hashes) -> int:
        """How many leading `hashes` are cached (no side effects)."""
        n = 0
        for h in hashes:
            if h not in self._ref and h not in self._lru:
                break
            n += 1
        return n

    def acquire(self, prefix: list[int], new: int) -> Blocks | None:
        """Reference the cached blocks `prefix` (all must be cached) and allocate `new` blocks; None (and
        no change) when that does not fit."""
        revived = sum(1 for h in prefix if h not in self._ref)
        if revived + new > self.num_free:
            return None
        for h in prefix:
            if h in self._ref:
                self._ref[h] += 1
            else:
                del self._lru[h]
                self._ref[h] = 1
        empty = self.num_blocks - len(self._ref) - self._anon - len(self._lru)
        if new > empty:
            removed = [self._lru.popitem(last=False)[0] for _ in range(new - empty)]
            self.events.append(BlockRemoved(block_hashes=removed))
        self._anon += new
        return Blocks(list(prefix), new)

    def store(self, blocks: Blocks, hashes: list[int]) -> None:
        """Register `hashes` (the next full blocks of the owner's prompt, now computed) in the prefix cache;
        a hash cached already (computed twice concurrently) leaves the block anonymous."""
        stored = []
        for h in hashes:
            if h in self._ref or h in self._lru or blocks.anon == 0:
                continue
            blocks.anon -= 1
            self._anon -= 1
            self._ref[h] = 1
            blocks.hashes.append(h)
            stored.append(h)
        if stored:
            self.events.append(BlockStored(block_hashes=stored, parent_hash=None))

    def release(self, blocks: Blocks) -> None:
        """Drop the owner's references; the prompt's tail becomes the first to be evicted."""
        self._anon -= blocks.anon
        for h in reversed(blocks.hashes):
            refs = self._ref[h] - 1
            if refs:
                self._ref[h] = refs
            else:
                del self._ref[h]
                self._lru[h] = None
        blocks.hashes, blocks.anon = [], 0

    def cached_hashes(self) -> list[int]:
        return [*self._ref, *self._lru]

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
