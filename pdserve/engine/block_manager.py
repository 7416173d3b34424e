"""Paged KV block pool: reference counts, prefix cache by chained block hash, LRU eviction, KV events.

Invariant: a block is in `_free` (an LRU-ordered dict) iff its ref_cnt is 0. A free block may still hold
cached KV (it has a hash and sits in `_cached`) until it is handed out again, which evicts it.
"""

from __future__ import annotations

from collections import OrderedDict

from pdserve.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, record_events: bool = False
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.events: list[KVEvent] = []
        self.record_events = record_events  # off unless a consumer takes them (else they pile up)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def cached_prefix(self, hashes: list[int]) -> list[int]:
        """Block ids caching the longest prefix of `hashes` (not yet referenced by the caller)."""
        if not self.enable_prefix_caching:
            return []
        ids = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on blocks found by `cached_prefix`."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        ids = []
        removed = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                    removed.append(block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            ids.append(block_id)
        if removed and self.record_events:
            self.events.append(BlockRemoved(block_hashes=removed))
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each block; the tail of a sequence goes first in eviction order."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)  # uncached blocks are reused first
                else:
                    self._free[block_id] = None

    def cache_blocks(self, block_ids: list[int], hashes: list[int], start: int, end: int, parent: int | None) -> None:
        """Register blocks [start, end) of a sequence, now full of computed KV, under their hashes."""
        if not self.enable_prefix_caching or end <= start:
            return
        stored = []
        for i in range(start, end):
            block = self.blocks[block_ids[i]]
            if block.block_hash is not None:
                continue
            block.block_hash = hashes[i]
            if hashes[i] not in self._cached:
                self._cached[hashes[i]] = block.block_id
                stored.append(hashes[i])
        if stored and self.record_events:
            first_parent = hashes[start - 1] if start > 0 else parent
            self.events.append(BlockStored(block_hashes=stored, parent_hash=first_parent))

    def reset_prefix_cache(self) -> bool:
        """Forget every unreferenced cached block; False if some cached block is still in use."""
        if any(self.blocks[b].ref_cnt for b in self._cached.values()):
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        if self.record_events:
            self.events.append(AllBlocksCleared())
        return True

    def cached_hashes(self) -> list[int]:
        """Every hash the prefix cache holds now (a snapshot for resyncing the global index)."""
        return list(self._cached)

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def check_no_leak(self) -> None:
        """Raise unless every block is free (possibly cached) with no reference."""
        held = [b.block_id for b in self.blocks if b.ref_cnt]
        if held or len(self._free) != self.num_blocks:
            raise AssertionError(f"KV blocks still referenced: {held[:16]} ({len(held)} in all)")
