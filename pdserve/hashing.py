"""Chained block hashes shared by the engine's prefix cache and the global prefix index.

A block's hash is BLAKE2b with a 128-bit digest (`digest_size=16`) of its parent's hash and its token ids;
the first block's parent is the root, a hash of the model id and the request's `cache_salt`. So a hash
names one prefix of one model under one salt in every process (no use of Python's randomized `hash`).
Hashes are 16-byte `bytes` everywhere (msgpack carries ints only up to 64 bits, bytes natively).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

HASH_BYTES = 16
BlockHash = bytes  # HASH_BYTES long
_TOKEN = array("q").itemsize


def root_hash(model_id: str, cache_salt: str | None = None) -> BlockHash:
    """The parent hash of a sequence's first block: requests share cached blocks only under the same root."""
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"pdserve.root")
    model = model_id.encode()
    h.update(len(model).to_bytes(8, "little") + model)  # length-prefixed: (model, salt) splits one way
    if cache_salt is not None:
        h.update(b"\x01" + cache_salt.encode())
    return h.digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, root: BlockHash, start: list[BlockHash] | None = None
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`; `start` (hashes already known) is extended, not recomputed."""
    hashes = list(start) if start else []
    first, end = len(hashes) * block_size, len(token_ids) // block_size * block_size
    if end <= first:
        return hashes
    data, step = array("q", token_ids[first:end]).tobytes(), block_size * _TOKEN
    parent, blake2b = hashes[-1] if hashes else root, hashlib.blake2b
    for offset in range(0, len(data), step):
        parent = blake2b(parent + data[offset : offset + step], digest_size=HASH_BYTES).digest()
        hashes.append(parent)
    return hashes
