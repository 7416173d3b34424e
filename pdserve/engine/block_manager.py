"""Paged KV block pool: reference counts, prefix cache by chained block hash, LRU eviction, KV events.

Invariant: a block is in `_free` (an LRU-ordered dict) iff its ref_cnt is 0. A free block may still hold
cached KV (it has a hash and sits in `_cached`) until it is handed out again, which evicts it.
A cache hit never trusts the hash alone: each cached block keeps its tokens and what it was computed after
(the root, or its parent's `key`), and a lookup compares both, so a hash collision is a miss, never
another prompt's KV.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import count

from pdserve.hashing import BlockHash
from pdserve.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "parent", "key")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        # Set with block_hash. `key` names the exact prefix this block's KV holds (root and every token):
        # fresh per registration, shared only by a duplicate verified equal. `parent`: the root for a first
        # block, else the parent's key.
        self.token_ids: list[int] | None = None
        self.parent: BlockHash | int | None = None
        self.key: int | None = None

    def forget(self) -> None:
        self.block_hash = self.token_ids = self.parent = self.key = None


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, record_events: bool = False
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}  # block hash -> block id
        self._keys = count()
        self.events: list[KVEvent] = []
        self.record_events = record_events  # off unless a consumer takes them (else they pile up)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def cached_prefix(self, hashes: list[BlockHash], token_ids: list[int], root: BlockHash) -> list[int]:
        """Block ids caching the longest prefix of `hashes`, the hashes of `token_ids`' blocks under `root`,
        whose tokens and ancestry match too (not yet referenced by the caller)."""
        if not self.enable_prefix_caching:
            return []
        ids, parent, bs = [], root, self.block_size
        for i, h in enumerate(hashes):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent != parent or block.token_ids != token_ids[i * bs : (i + 1) * bs]:
                break  # a hash collision
            ids.append(block_id)
            parent = block.key
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
                block.forget()
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

    def cache_blocks(
        self,
        block_ids: list[int],
        hashes: list[BlockHash],
        token_ids: list[int],
        start: int,
        end: int,
        root: BlockHash,
    ) -> None:
        """Register blocks [start, end) of a sequence (`token_ids` under `root`), now full of computed KV,
        under their hashes; blocks before `start` are registered already."""
        if not self.enable_prefix_caching or end <= start:
            return
        stored, bs = [], self.block_size
        parent = root if start == 0 else self.blocks[block_ids[start - 1]].key
        for i in range(start, end):
            block = self.blocks[block_ids[i]]
            if block.block_hash is None:
                tokens = token_ids[i * bs : (i + 1) * bs]
                block.block_hash, block.token_ids, block.parent = hashes[i], tokens, parent
                holder = self._cached.get(hashes[i])
                if holder is None:
                    block.key = next(self._keys)
                    self._cached[hashes[i]] = block.block_id
                    stored.append(hashes[i])
                else:  # computed twice (or a collision): alias the cached one's key only if provably equal
                    other = self.blocks[holder]
                    same = other.parent == parent and other.token_ids == tokens
                    block.key = other.key if same else next(self._keys)
            parent = block.key
        if stored and self.record_events:
            first_parent = hashes[start - 1] if start > 0 else root
            self.events.append(BlockStored(block_hashes=stored, parent_hash=first_parent))

    def reset_prefix_cache(self) -> bool:
        """Forget every unreferenced cached block; False if some cached block is still in use."""
        if any(self.blocks[b].ref_cnt for b in self._cached.values()):
            return False
        for block in self.blocks:
            block.forget()
        self._cached.clear()
        if self.record_events:
            self.events.append(AllBlocksCleared())
        return True

    def cached_hashes(self) -> list[BlockHash]:
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
