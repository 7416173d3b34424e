"""Global prefix index: block hash -> workers caching it, fed by the workers' KV events.

Workers are bits in an int mask, so matching a request is a few integer operations per block. Bounded
(LRU over hashes); each worker's event stream carries (epoch, seq): a gap or a new epoch (a restart)
makes `apply` ask for a resync, which replaces that worker's entries with a full snapshot. Routing
decisions add short-lived predicted entries, so a burst sharing a prefix sees where it went before the
events arrive. Hashes are opaque keys (pdserve.hashing's; the simulator's trace ids in its own index), so
requests under different cache salts never match each other's entries.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import OrderedDict, deque
from itertools import accumulate, compress, islice, repeat, takewhile
from operator import and_, neg, not_, or_

from pdserve.config import RoutingConfig
from pdserve.hashing import BlockHash
from pdserve.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class PrefixIndex:
    def __init__(
        self,
        max_blocks: int = RoutingConfig.model_fields["max_index_blocks"].default,
        prediction_ttl_s: float = RoutingConfig.model_fields["prediction_ttl_s"].default,
    ) -> None:
        self.max_blocks = max_blocks
        self.prediction_ttl_s = prediction_ttl_s  # one lifetime for all: the expiry deques stay in time order
        self._holders: OrderedDict[BlockHash, int] = OrderedDict()  # hash -> worker mask; LRU, oldest first
        self._predicted: dict[BlockHash, int] = {}  # hash -> worker mask of unconfirmed routing decisions
        # One entry per prediction: (expiry time, mask, hashes, start, end), as parallel deques so routing
        # allocates no objects that outlive the decision (each would count toward the next GC pass).
        self._expiry: tuple[deque, ...] = (deque(), deque(), deque(), deque(), deque())
        self._bit: dict[str, int] = {}
        self._worker: dict[int, str] = {}  # bit -> worker id
        self._count: dict[str, int] = {}  # blocks indexed per worker
        self._stream: dict[str, tuple[str, int]] = {}  # worker -> (epoch, last seq applied)

    def bit(self, worker_id: str) -> int:
        """The worker's bit in the masks that match and predictions use (assigned on first use)."""
        return self._bit_of(worker_id)

    def _bit_of(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            used = set(self._bit.values())
            bit = self._bit[worker_id] = 1 << next(i for i in range(len(used) + 1) if 1 << i not in used)
            self._worker[bit] = worker_id
            self._count[worker_id] = 0
        return bit

    # ---- events ----------------------------------------------------------------------------------
    def apply(self, worker_id: str, epoch: str, seq: int, events: list[KVEvent]) -> bool:
        """Apply one batch; False (nothing applied) when it does not follow the last batch: resync."""
        last = self._stream.get(worker_id)
        if last is None or last[0] != epoch or seq != last[1] + 1:
            return False
        self._stream[worker_id] = (epoch, seq)
        bit = self._bit_of(worker_id)
        for event in events:
            if isinstance(event, BlockStored):
                self._store(worker_id, bit, event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._remove(worker_id, bit, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._drop_entries(worker_id, bit)
        return True

    def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[BlockHash]) -> None:
        """Replace a worker's entries with a snapshot taken at (epoch, seq)."""
        bit = self._bit_of(worker_id)
        self._drop_entries(worker_id, bit)
        self._store(worker_id, bit, hashes)
        self._stream[worker_id] = (epoch, seq)

    def remove_worker(self, worker_id: str) -> None:
        bit = self._bit.pop(worker_id, None)
        if bit is not None:
            self._worker.pop(bit, None)
            self._drop_entries(worker_id, bit)
            self._unpredict(bit, [h for h, m in self._predicted.items() if m & bit])
            times, masks, *rest = self._expiry  # the bit may be given to a new worker: its predictions end here
            self._expiry = (times, deque(m & ~bit for m in masks), *rest)
        self._stream.pop(worker_id, None)
        self._count.pop(worker_id, None)

    def predict(self, worker_id: str, hashes: list[BlockHash]) -> None:
        """A request with these block hashes was just routed to `worker_id`: count them as cached there
        until the worker's own events confirm them or `prediction_ttl_s` passes."""
        self.predict_mask(self._bit_of(worker_id), hashes)

    def predict_mask(
        self,
        mask: int,
        hashes: list[BlockHash],
        start: int = 0,
        end: int | None = None,
        unheld_from: int | None = None,
    ) -> None:
        """`predict` hashes[start:end] for every worker in `mask` at once. `unheld_from`: from this block on
        no worker caches the prompt (the longest match), so those entries are written without reading
        them first. (The router predicts the blocks past each worker's match, so they are almost never
        confirmed there already.)"""
        end = len(hashes) if end is None else min(end, len(hashes))
        if start >= end or not mask:
            return
        predicted = self._predicted
        split = end if unheld_from is None else min(end, max(start, unheld_from))
        if start < split:
            masked = map(or_, map(predicted.get, islice(hashes, start, split), repeat(0)), repeat(mask))
            predicted.update(zip(islice(hashes, start, split), masked))
        if split < end:
            predicted.update(zip(islice(hashes, split, end), repeat(mask)))
        for queue, value in zip(self._expiry, (time.monotonic() + self.prediction_ttl_s, mask, hashes, start, end)):
            queue.append(value)

    def expire_predictions(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times, masks, lists, starts, ends = self._expiry
        while times and times[0] <= now:
            times.popleft()
            self._unpredict(masks.popleft(), islice(lists.popleft(), starts.popleft(), ends.popleft()))

    # ---- queries ---------------------------------------------------------------------------------
    def match_all(self, hashes: list[BlockHash]) -> dict[str, int]:
        """Every worker caching (indexed or predicted) the first block of `hashes`, with how many leading
        blocks it caches."""
        found: dict[str, int] = {}
        for blocks, mask in self.match_ends(hashes):
            while mask:
                low = mask & -mask
                found[self._worker[low]] = blocks
                mask ^= low
        return found

    def match_ends(self, hashes: list[BlockHash]) -> list[tuple[int, int]]:
        """`match_all` as (leading blocks cached, mask of the workers caching exactly that many), one
        entry per distinct length, the masks disjoint.

        Assumes what a radix tree enforces: a worker caching a chained block caches its parent too (an
        engine evicts a chain from its tail). The worker masks along the prompt then only lose bits, so
        the ends are found by bisection: about log2(len) probes per distinct end instead of a probe per
        block. Where the assumption fails (a hole inside a chain), the answer is an estimate."""
        if not hashes:
            return []
        holders, predicted = self._holders.get, self._predicted.get
        first = holders(hashes[0], 0) | predicted(hashes[0], 0)
        if not first:
            return []
        n = len(hashes)
        last = (holders(hashes[-1], 0) | predicted(hashes[-1], 0)) & first
        ends = [(n, last)] if last else []
        todo = [(0, first, n - 1, last)] if first != last else []
        budget = max(16, n // 2)  # probes (Python) before a walk of every block (C) is cheaper (measured)
        while todo:
            lo, lo_mask, hi, hi_mask = todo.pop()  # bits of lo_mask & ~hi_mask end in (lo, hi]
            if hi - lo == 1:
                ends.append((hi, lo_mask & ~hi_mask))
                continue
            budget -= 1
            if budget < 0:
                return self._match_linear(hashes)
            mid = (lo + hi) // 2
            h = hashes[mid]
            mid_mask = (holders(h, 0) | predicted(h, 0)) & lo_mask | hi_mask  # kept nested
            if mid_mask != lo_mask:
                todo.append((lo, lo_mask, mid, mid_mask))
            if mid_mask != hi_mask:
                todo.append((mid, mid_mask, hi, hi_mask))
        return ends

    def _match_linear(self, hashes: list[BlockHash]) -> list[tuple[int, int]]:
        """`match_ends` by a probe per block (in C), stopping at the first block no worker caches."""
        zeros = repeat(0)
        masks = map(or_, map(self._holders.get, hashes, zeros), map(self._predicted.get, hashes, zeros))
        # A subset is a smaller int: negated, the running AND is sorted, so each run's end is a bisection.
        runs = list(map(neg, takewhile(bool, accumulate(masks, and_))))
        ends, end, n = [], 0, len(runs)
        while end < n:
            mask = -runs[end]
            end = bisect_right(runs, -mask, end)
            ends.append((end, mask & ~-runs[end] if end < n else mask))
        return ends

    def held_blocks(self, bit: int, hashes: list[BlockHash], end: int) -> int:
        """How many leading blocks of hashes[:end] the worker's own events index (predictions left out);
        by bisection, as in `match_ends`."""
        holders, lo, hi = self._holders.get, 0, end  # hashes[:lo] held; hashes[hi:] not known to be
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if holders(hashes[mid - 1], 0) & bit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def unique_blocks(self, worker_id: str) -> int:
        """Blocks only this worker holds (what its removal would lose from the fleet's cache); a full scan,
        for the rare scale-in decision."""
        bit = self._bit.get(worker_id)
        return 0 if bit is None else sum(1 for m in self._holders.values() if m == bit)

    def num_blocks(self, worker_id: str) -> int:
        return self._count.get(worker_id, 0)

    def __len__(self) -> int:
        return len(self._holders)

    # ---- internals -------------------------------------------------------------------------------
    # Events are applied a batch of hashes at a time with the loops in C (map, compress, dict.update): a
    # report's events cost about as much as the decisions made between two reports.
    def _store(self, worker_id: str, bit: int, hashes: list[BlockHash]) -> None:
        holders = self._holders
        old = list(map(holders.get, hashes, repeat(0)))
        self._count[worker_id] += len(old) - sum(map(bool, map(and_, old, repeat(bit))))
        holders.update(zip(hashes, map(or_, old, repeat(bit))))
        deque(map(holders.move_to_end, hashes), maxlen=0)  # most recently used
        for _ in range(len(holders) - self.max_blocks):
            self._evict_oldest()
        self._unpredict(bit, hashes)  # confirmed

    def _remove(self, worker_id: str, bit: int, hashes: list[BlockHash]) -> None:
        holders = self._holders
        old = list(map(holders.get, hashes, repeat(0)))
        held = list(compress(zip(hashes, old), map(and_, old, repeat(bit))))
        self._count[worker_id] -= len(held)
        holders.update((h, m & ~bit) for h, m in held if m != bit)
        deque(map(holders.__delitem__, (h for h, m in held if m == bit)), maxlen=0)

    def _evict_oldest(self) -> None:
        _, mask = self._holders.popitem(last=False)
        while mask:  # only the holders' bits, not every worker's
            low = mask & -mask
            self._count[self._worker[low]] -= 1
            mask ^= low

    def _unpredict(self, mask: int, hashes) -> None:
        """Take the bits of `mask` off these hashes' predictions; an entry left with none is deleted."""
        predicted, hashes = self._predicted, list(hashes)
        old = list(map(predicted.get, hashes, repeat(0)))
        present, after = list(compress(hashes, old)), list(map(and_, compress(old, old), repeat(~mask)))
        predicted.update(compress(zip(present, after), after))
        deque(map(predicted.__delitem__, compress(present, map(not_, after))), maxlen=0)

    def _drop_entries(self, worker_id: str, bit: int) -> None:
        self._remove(worker_id, bit, [h for h, m in self._holders.items() if m & bit])
