"""The router benchmark's harness: a synthetic multi-turn workload of block hashes, simulated workers that
cache what is routed to them and report load and KV events, and timing helpers (bench/router.py)."""

from __future__ import annotations

import gc
import random
import time
from collections import OrderedDict

import numpy as np

from pdserve.hashing import block_hashes, root_hash
from pdserve.protocol import BlockRemoved, BlockStored, KVEventBatch, RouteRequest, WorkerStats
from pdserve.router.router import NoCapacity

BS = 16
MAX_BLOCKS = 256


# ---- workload -------------------------------------------------------------------------------------------


def workload(n: int, seed: int, conversations: int = 1000, vocab: int = 32000) -> list[RouteRequest]:
    """`n` requests: 75% the next turn of an open chat, 20% a new chat on a (Zipf-popular) system prompt,
    5% a one-off prompt. A chat state is (block hashes, tail tokens not filling a block)."""
    rng = random.Random(seed)
    root = root_hash("bench-scheduler")

    def extend(state, n_tokens):
        hashes, tail = state
        tokens = tail + [rng.randrange(4, vocab) for _ in range(n_tokens)]
        new = block_hashes(tokens, BS, hashes[-1] if hashes else root)
        return hashes + new, tokens[len(new) * BS :]

    systems = [extend(([], []), rng.randint(512, 1024)) for _ in range(64)]
    weights = [1 / (i + 1) for i in range(len(systems))]
    chats: list[tuple[list[int], list[int]]] = []
    reqs = []
    for i in range(n):
        u = rng.random()
        if u < 0.05:
            state = extend(([], []), rng.randint(16, MAX_BLOCKS) * BS)
        elif u < 0.25 or len(chats) < conversations // 4:
            state = extend(rng.choices(systems, weights)[0], rng.randint(32, 512))
            if len(chats) < conversations:
                chats.append(state)
            else:
                chats[rng.randrange(len(chats))] = state
        else:
            j = rng.randrange(len(chats))
            state = extend(chats[j], rng.randint(64, 512) + rng.randint(32, 256))  # answer + user message
            if len(state[0]) > MAX_BLOCKS:  # too long: the chat ends, a new one starts on its system prompt
                state = extend(rng.choices(systems, weights)[0], rng.randint(32, 512))
            chats[j] = state
        hashes, tail = state
        reqs.append(
            RouteRequest(
                request_id=f"r{i}", num_prompt_tokens=len(hashes) * BS + len(tail), max_tokens=256, block_hashes=hashes
            )
        )
    return reqs


# ---- simulated workers ----------------------------------------------------------------------------------


class SimWorkers:
    """The workers' half of the protocol: each caches the blocks of the requests placed on it (LRU,
    prefix-first, so a chain is evicted from its tail) and reports load plus its new KV events."""

    def __init__(self, prefill: int, decode: int, capacity: int, seed: int = 0) -> None:
        self.roles = {f"p{i:02d}": "prefill" for i in range(prefill)} | {f"d{i:02d}": "decode" for i in range(decode)}
        self.capacity = capacity
        self.cache = {w: OrderedDict() for w in self.roles}
        self.events: dict[str, list] = {w: [] for w in self.roles}
        self.seq = dict.fromkeys(self.roles, 1)  # seq 1 asked for the resync done in `handshake`
        self.order = list(self.roles)
        self.next = 0
        self.rng = random.Random(seed)

    def handshake(self, report, resync) -> None:
        for w in self.roles:
            if not report(self.stats(w), KVEventBatch(worker_id=w, epoch="e", seq=1, events=[])):
                resync(w, "e", 1, [])

    def place(self, req: RouteRequest, route) -> None:
        if isinstance(route, NoCapacity):
            return
        self._store(route.prefill_worker or route.decode_worker, req.block_hashes)
        if route.prefill_worker:
            self._store(route.decode_worker, req.block_hashes)  # the decode worker caches the import too

    def _store(self, w: str, hashes: list[int]) -> None:
        cache = self.cache[w]
        new = [h for h in hashes if h not in cache]
        for h in reversed(hashes):  # the prefix ends up most recently used
            cache[h] = None
            cache.move_to_end(h)
        if new:
            self.events[w].append(BlockStored(block_hashes=new, parent_hash=None))
        if len(cache) > self.capacity:
            gone = [cache.popitem(last=False)[0] for _ in range(len(cache) - self.capacity)]
            self.events[w].append(BlockRemoved(block_hashes=gone))

    def stats(self, w: str) -> WorkerStats:
        running, waiting = self.rng.randint(0, 16), self.rng.randint(0, 4)
        total = 4 * self.capacity
        return WorkerStats(
            worker_id=w,
            role=self.roles[w],
            num_running=running,
            num_waiting=waiting,
            num_held=0,
            num_free_blocks=total - len(self.cache[w]) - 128 * running,
            num_blocks=total,
            kv_usage=(len(self.cache[w]) + 128 * running) / total,
            num_prefill_tokens_queued=waiting * 1024 if self.roles[w] == "prefill" else 0,
            time=time.time(),
        )

    def next_report(self) -> tuple[WorkerStats, KVEventBatch]:
        w = self.order[self.next % len(self.order)]
        self.next += 1
        self.seq[w] += 1
        batch = KVEventBatch(worker_id=w, epoch="e", seq=self.seq[w], events=self.events[w])
        self.events[w] = []
        return self.stats(w), batch


class GCPauses:
    """Full (generation 2) collections while active, and how long each paused the process."""

    def __init__(self) -> None:
        self.pauses, self._start, self.active = [], 0.0, False

    def __call__(self, phase, info) -> None:
        if not self.active or info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._start)

    def __enter__(self):
        self.pauses, self.active = [], True
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"count": len(self.pauses), "max_ms": 1000 * max(self.pauses, default=0.0)}


def pct_us(ns) -> dict:
    p50, p90, p99, p999 = np.percentile(np.asarray(ns) / 1000, [50, 90, 99, 99.9]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "p99.9": p999, "mean": float(np.mean(ns)) / 1000}
