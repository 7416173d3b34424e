"""KV handoff over NIXL between two Ray actors against a plain memcpy of the same bytes, by payload size.

Run: `python bench/kv_transfer.py` (add `--warm` to skip the cache eviction before each copy).
Bandwidth: the receiver times start_pull -> DONE (polling with 20 us sleeps) for random, scattered block ids
and for one run of consecutive ids; memcpy is one contiguous `dst[:n].copy_(src[:n])` on one thread inside
the receiver; ratio = NIXL / memcpy.
Overhead: 200 four-block handoffs, start_pull -> DONE and through `await pull()`, as the worker uses it.
Both with torch's default 4 KB pages and with transparent huge pages (THP_MEM_ALLOC_ENABLE=1 in the actors).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import statistics
import time

import ray
from common import print_table, write_json

MB = 1 << 20
SIZES = [64 << 10, 256 << 10, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]


@ray.remote(num_cpus=1)
class Endpoint:
    """One side of the handoff: a block-major cache of `num_blocks` blocks and a NIXL transport over it."""

    def __init__(self, name: str, num_blocks: int, block_bytes: int, seed: int, options: dict) -> None:
        import torch

        from pdserve.kv import make_transport
        from pdserve.protocol import KVLayout

        torch.set_num_threads(1)  # memcpy baseline: one thread (NIXL posts from `num_threads` threads)
        self.torch, self.block_bytes = torch, block_bytes
        self.kv = torch.empty((num_blocks, block_bytes), dtype=torch.uint8)
        self.kv.view(-1).view(torch.int64).random_(generator=torch.Generator().manual_seed(seed))
        layout = KVLayout(
            model_id="bench",
            dtype="uint8",
            block_size=16,
            num_layers=1,
            num_kv_heads=1,
            head_dim=block_bytes // 16,
            num_blocks=num_blocks,
            block_bytes=block_bytes,
        )
        self.transport = make_transport("nixl", name, self.kv, layout, **options)
        self.scratch = torch.empty(64 * MB, dtype=torch.uint8)  # written to evict caches before a copy
        self.other = torch.empty_like(self.kv)  # memcpy source
        self.other.fill_(1)

    def peer_info(self):
        return self.transport.peer_info()

    def add_peer(self, info) -> None:
        self.transport.add_peer(info)

    def huge_mb(self) -> int:
        """How much of the cache the kernel backs with transparent huge pages."""
        ptr, total = self.kv.data_ptr(), 0
        for mapping in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
            lo, hi = (int(x, 16) for x in mapping.split(None, 1)[0].split("-"))
            if lo < ptr + self.kv.numel() and ptr < hi:
                total += sum(int(line.split()[1]) for line in mapping.splitlines() if line.startswith("AnonHuge"))
        return total >> 10

    def digest(self, ids: list[int]) -> str:
        return hashlib.blake2b(self.kv[ids].numpy().tobytes(), digest_size=16).hexdigest()

    def _evict(self, evict: bool) -> None:
        if evict:
            self.scratch.add_(1)

    def time_pulls(self, peer: str, src: list[int], dst: list[int], reps: int, evict: bool) -> list[float]:
        from pdserve.kv import TransferState

        out = []
        for _ in range(reps):
            self._evict(evict)
            start = time.perf_counter()
            handle = self.transport.start_pull(peer, src, dst)
            while (state := self.transport.poll(handle)) is TransferState.PENDING:
                time.sleep(20e-6)  # a sleeping poll: spinning would steal a core from the copy threads
            out.append(time.perf_counter() - start)
            self.transport.release(handle)
            assert state is TransferState.DONE, self.transport.error(handle)
        return out

    async def time_async_pulls(self, peer: str, src: list[int], dst: list[int], reps: int) -> list[float]:
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            await self.transport.pull(peer, src, dst, timeout_s=10.0)
            out.append(time.perf_counter() - start)
        return out

    def time_memcpy(self, num_blocks: int, reps: int, evict: bool) -> list[float]:
        out = []
        dst, src = self.kv[:num_blocks], self.other[:num_blocks]
        for _ in range(reps):
            self._evict(evict)
            start = time.perf_counter()
            dst.copy_(src)
            out.append(time.perf_counter() - start)
        return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def gbps(size: int, times: list[float]) -> float:
    return size / statistics.median(times) / 1e9


def measure_sizes(sender, receiver, num_blocks: int, block: int, evict: bool, rng) -> list[dict]:
    rows = []
    for size in (s for s in SIZES if s >= block):
        n = size // block
        reps = 30 if size <= 16 * MB else 10 if size <= 64 * MB else 6
        src, dst = rng.sample(range(num_blocks), n), rng.sample(range(num_blocks), n)
        scattered = ray.get(receiver.time_pulls.remote("bench-sender", src, dst, reps, evict))
        ok = ray.get(sender.digest.remote(src)) == ray.get(receiver.digest.remote(dst))
        run = list(range(n))
        contiguous = ray.get(receiver.time_pulls.remote("bench-sender", run, run, reps, evict))
        memcpy = ray.get(receiver.time_memcpy.remote(n, reps, evict))
        rows.append(
            {
                "size": f"{size >> 10} KB" if size < MB else f"{size >> 20} MB",
                "bytes": size,
                "blocks": n,
                "nixl_GBps": gbps(size, scattered),
                "nixl_contig_GBps": gbps(size, contiguous),
                "memcpy_GBps": gbps(size, memcpy),
                "ratio": gbps(size, scattered) / gbps(size, memcpy),
                "ratio_contig": gbps(size, contiguous) / gbps(size, memcpy),
                "p50_ms": statistics.median(scattered) * 1e3,
                "p90_ms": pct(scattered, 0.9) * 1e3,
                "verified": ok,
            }
        )
    return rows


def measure_overhead(receiver, num_blocks: int, block_kb: int, count: int, rng) -> list[dict]:
    src, dst = rng.sample(range(num_blocks), 4), rng.sample(range(num_blocks), 4)
    polled = ray.get(receiver.time_pulls.remote("bench-sender", src, dst, count, False))
    awaited = ray.get(receiver.time_async_pulls.remote("bench-sender", src, dst, count))
    copied = ray.get(receiver.time_memcpy.remote(4, count, False))
    return [
        {"handoff": f"4 x {block_kb} KB, {name}", "p50_ms": pct(ts, 0.5) * 1e3, "p90_ms": pct(ts, 0.9) * 1e3}
        for name, ts in [("start_pull->DONE", polled), ("await pull()", awaited), ("memcpy", copied)]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-kb", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="NIXL post threads / UCX workers on the receiver")
    ap.add_argument("--handoffs", type=int, default=200)
    ap.add_argument("--warm", action="store_true", help="do not evict caches before each copy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    block = args.block_kb << 10
    num_blocks = SIZES[-1] // block
    load_before = os.getloadavg()
    rows, overhead, huge = [], [], {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for pages, env in [("4k", {}), ("thp", {"THP_MEM_ALLOC_ENABLE": "1"})]:
            make = Endpoint.options(runtime_env={"env_vars": env})
            sender = make.remote("bench-sender", num_blocks, block, 1, {})
            receiver = make.remote("bench-receiver", num_blocks, block, 2, {"num_threads": args.threads})
            ray.get(receiver.add_peer.remote(ray.get(sender.peer_info.remote())))
            ray.get(receiver.time_pulls.remote("bench-sender", [0], [0], 3, False))  # connect
            huge[pages] = ray.get([sender.huge_mb.remote(), receiver.huge_mb.remote()])
            for row in measure_sizes(sender, receiver, num_blocks, block, not args.warm, rng):
                rows.append({"pages": pages, **row})
            for row in measure_overhead(receiver, num_blocks, args.block_kb, args.handoffs, rng):
                overhead.append({"pages": pages, **row})
            ray.kill(sender)
            ray.kill(receiver)
    finally:
        ray.shutdown()
    cols = ["pages", "size", "blocks", "nixl_GBps", "nixl_contig_GBps", "memcpy_GBps", "ratio"]
    print_table(rows, [*cols, "ratio_contig", "p50_ms", "p90_ms", "verified"])
    print()
    print_table(overhead, ["pages", "handoff", "p50_ms", "p90_ms"])
    print("\ncache MB on huge pages (sender, receiver):", huge)
    out = write_json(
        "kv_transfer" if args.block_kb == 64 else f"kv_transfer_{args.block_kb}kb",
        {
            "block_bytes": block,
            "nixl_threads": args.threads,
            "memcpy": "one contiguous torch copy_ of the same bytes in the receiver, on one thread",
            "evict_caches": not args.warm,
            "huge_page_mb": huge,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "rows": rows,
            "overhead": overhead,
        },
    )
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
