"""KV handoff over NIXL and over the collective transport (Gloo on CPU) between two Ray actors against a plain
memcpy of the same bytes, by payload size.

Run: `python bench/kv_transfer.py` (add `--warm` to skip the cache eviction before each copy, `--max-mb` to cap
the payload). The collective is two-sided: the sender's actor serves each key while the receiver times its
start_pull -> DONE, so its time includes the handshake through the pair's TCPStore.
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

from bench.common import print_table, write_json

MB = 1 << 20
SIZES = [64 << 10, 256 << 10, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]


@ray.remote(num_cpus=1)
class Endpoint:
    """One side of the handoff: a block-major cache of `num_blocks` blocks and a NIXL transport over it."""

    def __init__(self, kind: str, name: str, num_blocks: int, block_bytes: int, seed: int, options: dict) -> None:
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
        self.transport = make_transport(kind, name, self.kv, layout, **options)
        self.key = 0
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

    async def serve_keys(self, peer: str, src: list[int], keys: list[int]) -> None:
        """The sender's step of a two-sided transport, one serve per key, in order."""
        for key in keys:
            await self.transport.serve(peer, src, key, timeout_s=60.0)

    def time_pulls(
        self, peer: str, src: list[int], dst: list[int], reps: int, evict: bool, key0: int = 0
    ) -> list[float]:
        from pdserve.kv import TransferState

        out = []
        for i in range(reps):
            self._evict(evict)
            start = time.perf_counter()
            handle = self.transport.start_pull(peer, src, dst, key0 + i)
            while (state := self.transport.poll(handle)) is TransferState.PENDING:
                time.sleep(20e-6)  # a sleeping poll: spinning would steal a core from the copy threads
            out.append(time.perf_counter() - start)
            self.transport.release(handle)
            assert state is TransferState.DONE, self.transport.error(handle)
        return out

    async def time_async_pulls(
        self, peer: str, src: list[int], dst: list[int], reps: int, key0: int = 0
    ) -> list[float]:
        out = []
        for i in range(reps):
            start = time.perf_counter()
            await self.transport.pull(peer, src, dst, timeout_s=10.0, key=key0 + i)
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


_keys = iter(range(1, 1 << 31))


def pulls(pair, src: list[int], dst: list[int], reps: int, evict: bool) -> list[float]:
    """Receiver's start_pull -> DONE times; a two-sided pair's sender serves the same keys alongside."""
    kind, sender, receiver = pair
    key0 = next(_keys)
    for _ in range(reps):
        next(_keys)
    timed = receiver.time_pulls.remote("bench-sender", src, dst, reps, evict, key0)
    if kind == "nccl":
        ray.get(sender.serve_keys.remote("bench-receiver", src, list(range(key0, key0 + reps))))
    return ray.get(timed)


def measure_sizes(nixl, nccl, num_blocks: int, block: int, evict: bool, rng, max_bytes: int) -> list[dict]:
    rows = []
    for size in (s for s in SIZES if block <= s <= max_bytes):
        n = size // block
        reps = 30 if size <= 16 * MB else 10 if size <= 64 * MB else 6
        src, dst = rng.sample(range(num_blocks), n), rng.sample(range(num_blocks), n)
        scattered = pulls(nixl, src, dst, reps, evict)
        ok = ray.get(nixl[1].digest.remote(src)) == ray.get(nixl[2].digest.remote(dst))
        collective = pulls(nccl, src, dst, reps, evict)
        ok = ok and ray.get(nccl[1].digest.remote(src)) == ray.get(nccl[2].digest.remote(dst))
        run = list(range(n))
        contiguous = pulls(nixl, run, run, reps, evict)
        memcpy = ray.get(nixl[2].time_memcpy.remote(n, reps, evict))
        rows.append(
            {
                "size": f"{size >> 10} KB" if size < MB else f"{size >> 20} MB",
                "bytes": size,
                "blocks": n,
                "nixl_GBps": gbps(size, scattered),
                "nixl_contig_GBps": gbps(size, contiguous),
                "nccl_GBps": gbps(size, collective),
                "memcpy_GBps": gbps(size, memcpy),
                "ratio": gbps(size, scattered) / gbps(size, memcpy),
                "ratio_contig": gbps(size, contiguous) / gbps(size, memcpy),
                "nccl_ratio": gbps(size, collective) / gbps(size, memcpy),
                "p50_ms": statistics.median(scattered) * 1e3,
                "nccl_p50_ms": statistics.median(collective) * 1e3,
                "verified": ok,
            }
        )
    return rows


def measure_overhead(nixl, nccl, num_blocks: int, block_kb: int, count: int, rng) -> list[dict]:
    src, dst = rng.sample(range(num_blocks), 4), rng.sample(range(num_blocks), 4)
    runs = [("nixl start_pull->DONE", pulls(nixl, src, dst, count, False))]
    key0 = next(_keys)
    for _ in range(count):
        next(_keys)
    awaited = nixl[2].time_async_pulls.remote("bench-sender", src, dst, count, key0)
    runs.append(("nixl await pull()", ray.get(awaited)))
    runs.append(("nccl start_pull->DONE (+serve)", pulls(nccl, src, dst, count, False)))
    runs.append(("memcpy", ray.get(nixl[2].time_memcpy.remote(4, count, False))))
    return [
        {"handoff": f"4 x {block_kb} KB, {name}", "p50_ms": pct(ts, 0.5) * 1e3, "p90_ms": pct(ts, 0.9) * 1e3}
        for name, ts in runs
    ]


def endpoints(kind: str, env: dict, num_blocks: int, block: int, options: dict):
    make = Endpoint.options(num_cpus=0.5, runtime_env={"env_vars": env})
    sender = make.remote(kind, "bench-sender", num_blocks, block, 1, {})
    receiver = make.remote(kind, "bench-receiver", num_blocks, block, 2, options)
    infos = ray.get([sender.peer_info.remote(), receiver.peer_info.remote()])
    ray.get([receiver.add_peer.remote(infos[0]), sender.add_peer.remote(infos[1])])
    pair = (kind, sender, receiver)
    pulls(pair, [0], [0], 3, False)  # connect
    return pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-kb", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="NIXL post threads / UCX workers on the receiver")
    ap.add_argument("--handoffs", type=int, default=200)
    ap.add_argument("--warm", action="store_true", help="do not evict caches before each copy")
    ap.add_argument("--max-mb", type=int, default=SIZES[-1] // MB, help="largest payload")
    ap.add_argument("--pages", default="4k,thp", help="page modes to run: 4k, thp or both")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    block = args.block_kb << 10
    max_bytes = args.max_mb * MB
    num_blocks = max(s for s in SIZES if s <= max_bytes) // block
    load_before = os.getloadavg()
    rows, overhead, huge = [], [], {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for pages, env in [("4k", {}), ("thp", {"THP_MEM_ALLOC_ENABLE": "1"})]:
            if pages not in args.pages.split(","):
                continue
            nixl = endpoints("nixl", env, num_blocks, block, {"num_threads": args.threads})
            nccl = endpoints("nccl", env, num_blocks, block, {})
            huge[pages] = ray.get([nixl[1].huge_mb.remote(), nixl[2].huge_mb.remote()])
            for row in measure_sizes(nixl, nccl, num_blocks, block, not args.warm, rng, max_bytes):
                rows.append({"pages": pages, **row})
            for row in measure_overhead(nixl, nccl, num_blocks, args.block_kb, args.handoffs, rng):
                overhead.append({"pages": pages, **row})
            for actor in (*nixl[1:], *nccl[1:]):
                ray.kill(actor)
    finally:
        ray.shutdown()
    cols = ["pages", "size", "blocks", "nixl_GBps", "nixl_contig_GBps", "nccl_GBps", "memcpy_GBps", "ratio"]
    print_table(rows, [*cols, "ratio_contig", "nccl_ratio", "p50_ms", "nccl_p50_ms", "verified"])
    print()
    print_table(overhead, ["pages", "handoff", "p50_ms", "p90_ms"])
    print("\ncache MB on huge pages (sender, receiver):", huge)
    out = write_json(
        "kv_transfer" if args.block_kb == 64 else f"kv_transfer_{args.block_kb}kb",
        {
            "block_bytes": block,
            "nixl_threads": args.threads,
            "nccl": "the collective transport on Gloo (CPU caches); time includes the store handshake",
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
