"""Prefix-cache hashing costs, side by side: the chained BLAKE2b block hashes of a long prompt at 64, 128
(pdserve's) and 256 bits, and a full prefix-cache hit looked up with its tokens and ancestry verified (what
the engine does, so a hash collision is a miss) against a lookup that trusts the hash alone.

    python bench/hashing.py                      # a 32,768-token prompt, 16-token blocks
    python bench/hashing.py --tokens 131072 --repeats 50
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from array import array

from bench.common import print_table, write_json
from pdserve.engine.block_manager import BlockManager
from pdserve.hashing import HASH_BYTES, block_hashes, root_hash


def chain(tokens: list[int], block_size: int, root: bytes, digest_size: int) -> list[bytes]:
    """block_hashes() at another digest size (the same chaining), for the comparison."""
    data, step, out, parent = array("q", tokens).tobytes(), block_size * 8, [], root[:digest_size]
    for offset in range(0, len(tokens) // block_size * step, step):
        parent = hashlib.blake2b(parent + data[offset : offset + step], digest_size=digest_size).digest()
        out.append(parent)
    return out


def trusting_lookup(bm: BlockManager, hashes: list[bytes]) -> list[int]:
    """A lookup that believes the hash: what a cache without verification would serve."""
    ids = []
    for h in hashes:
        block_id = bm._cached.get(h)
        if block_id is None:
            break
        ids.append(block_id)
    return ids


def best_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, min) milliseconds over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="hashing")
    args = ap.parse_args()
    rng = random.Random(0)
    tokens = [rng.randrange(128_000) for _ in range(args.tokens)]
    root, bs = root_hash("bench-model"), args.block_size
    rows = []
    for bits in (64, 128, 256):
        median, low = best_ms(lambda b=bits: chain(tokens, bs, root, b // 8), args.repeats)
        rows.append({"what": f"hash the prompt, BLAKE2b-{bits}", "median_ms": median, "min_ms": low})
    median, low = best_ms(lambda: block_hashes(tokens, bs, root), args.repeats)
    rows.append({"what": f"hash the prompt, pdserve block_hashes ({HASH_BYTES * 8} bits)", "median_ms": median,
                 "min_ms": low})  # fmt: skip
    hashes = block_hashes(tokens, bs, root)
    assert hashes == chain(tokens, bs, root, HASH_BYTES), "the comparison chain differs from pdserve's"
    bm = BlockManager(len(hashes) + 1, bs)
    ids = bm.allocate(len(hashes))
    bm.cache_blocks(ids, hashes, tokens, 0, len(hashes), root)
    assert bm.cached_prefix(hashes, tokens, root) == ids == trusting_lookup(bm, hashes)
    median, low = best_ms(lambda: bm.cached_prefix(hashes, tokens, root), args.repeats)
    rows.append({"what": "full hit, tokens and parent verified (pdserve)", "median_ms": median, "min_ms": low})
    median, low = best_ms(lambda: trusting_lookup(bm, hashes), args.repeats)
    rows.append({"what": "full hit, hash trusted", "median_ms": median, "min_ms": low})
    base = rows[0]["median_ms"]
    for row in rows[:4]:
        row["vs_64_bit"] = row["median_ms"] / base
    print(f"{args.tokens} tokens, {len(hashes)} blocks of {bs}; {args.repeats} runs each")
    print_table(rows, ["what", "median_ms", "min_ms", "vs_64_bit"])
    print(f"wrote {write_json(args.out, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
