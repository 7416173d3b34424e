"""Chained block hashes shared by the engine's prefix cache and the global prefix index.

A block's hash covers its tokens and its parent's hash, rooted in a salt from the model's identity,
so the same hash means the same prefix in every process (no use of Python's randomized `hash`).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_MASK = (1 << 64) - 1


def root_hash(model_id: str) -> int:
    """The parent hash of a sequence's first block for one model."""
    return int.from_bytes(hashlib.blake2b(model_id.encode(), digest_size=8).digest(), "little")


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update((parent & _MASK).to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, root: int, start: list[int] | None = None) -> list[int]:
    """Hashes of every full block of `token_ids`; `start` (hashes already known) is extended, not recomputed."""
    hashes = list(start) if start else []
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[i : i + block_size])
        hashes.append(parent)
    return hashes
