"""Global prefix index: block hash -> workers caching it, fed by the workers' KV events.

Workers are bits in an int mask, so matching a request is a few integer operations per block. Bounded
(LRU over hashes); each worker's event stream carries (epoch, seq): a gap or a new epoch (a restart)
makes `apply` ask for a resync, which replaces that worker's entries with a full snapshot. Routing
decisions add short-lived predicted entries, so a burst sharing a prefix sees where it went before the
events arrive.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from pdserve.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

PREDICTION_TTL_S = 10.0


class PrefixIndex:
    def __init__(self, max_blocks: int = 1_000_000) -> None:
        self.max_blocks = max_blocks
        self._holders: OrderedDict[int, int] = OrderedDict()  # hash -> worker mask; LRU, oldest first
        self._predicted: dict[int, int] = {}  # hash -> worker mask of unconfirmed routing decisions
        self._expiry: deque[tuple[float, int, list[int]]] = deque()  # (time, bit, hashes): one per predict()
        self._bit: dict[str, int] = {}
        self._worker: dict[int, str] = {}  # bit -> worker id
        self._count: dict[str, int] = {}  # blocks indexed per worker
        self._stream: dict[str, tuple[str, int]] = {}  # worker -> (epoch, last seq applied)

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
                for h in event.block_hashes:
                    self._add(worker_id, bit, h)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._discard(worker_id, bit, h)
            elif isinstance(event, AllBlocksCleared):
                self._drop_entries(worker_id, bit)
        return True

    def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[int]) -> None:
        """Replace a worker's entries with a snapshot taken at (epoch, seq)."""
        bit = self._bit_of(worker_id)
        self._drop_entries(worker_id, bit)
        for h in hashes:
            self._add(worker_id, bit, h)
        self._stream[worker_id] = (epoch, seq)

    def remove_worker(self, worker_id: str) -> None:
        bit = self._bit.pop(worker_id, None)
        if bit is not None:
            self._worker.pop(bit, None)
            self._drop_entries(worker_id, bit)
            for h in [h for h, m in self._predicted.items() if m & bit]:
                self._unpredict(bit, h)
        self._stream.pop(worker_id, None)
        self._count.pop(worker_id, None)

    def predict(self, worker_id: str, hashes: list[int], ttl_s: float = PREDICTION_TTL_S) -> None:
        """A request with these block hashes was just routed to `worker_id`: count them as cached there
        until the worker's own events confirm them or `ttl_s` passes."""
        bit = self._bit_of(worker_id)
        holders, predicted = self._holders, self._predicted
        new = [h for h in hashes if not holders.get(h, 0) & bit]
        for h in new:
            predicted[h] = predicted.get(h, 0) | bit
        if new:
            self._expiry.append((time.monotonic() + ttl_s, bit, new))

    def expire_predictions(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self._expiry and self._expiry[0][0] <= now:
            _, bit, hashes = self._expiry.popleft()
            for h in hashes:
                self._unpredict(bit, h)

    # ---- queries ---------------------------------------------------------------------------------
    def match(self, hashes: list[int], workers: list[str]) -> dict[str, int]:
        """Per worker, how many leading blocks of `hashes` it caches (indexed or predicted)."""
        bits = {w: self._bit.get(w, 0) for w in workers}
        live = 0
        for b in bits.values():
            live |= b
        ended_at: dict[int, int] = {}  # bit -> matched blocks
        holders, predicted = self._holders, self._predicted
        for i, h in enumerate(hashes):
            now_live = live & (holders.get(h, 0) | predicted.get(h, 0))
            gone = live & ~now_live
            while gone:
                low = gone & -gone
                ended_at[low] = i
                gone ^= low
            live = now_live
            if not live:
                break
        return {w: ended_at.get(b, len(hashes)) if b else 0 for w, b in bits.items()}

    def num_blocks(self, worker_id: str) -> int:
        return self._count.get(worker_id, 0)

    def __len__(self) -> int:
        return len(self._holders)

    # ---- internals -------------------------------------------------------------------------------
    def _add(self, worker_id: str, bit: int, h: int) -> None:
        mask = self._holders.get(h)
        if mask is None:
            self._holders[h] = bit
            self._count[worker_id] += 1
            if len(self._holders) > self.max_blocks:
                self._evict_oldest()
        else:
            self._holders.move_to_end(h)
            if not mask & bit:
                self._holders[h] = mask | bit
                self._count[worker_id] += 1
        if self._predicted.get(h, 0) & bit:
            self._unpredict(bit, h)

    def _evict_oldest(self) -> None:
        _, mask = self._holders.popitem(last=False)
        while mask:  # only the holders' bits, not every worker's
            low = mask & -mask
            self._count[self._worker[low]] -= 1
            mask ^= low

    def _discard(self, worker_id: str, bit: int, h: int) -> None:
        mask = self._holders.get(h, 0)
        if mask & bit:
            self._count[worker_id] -= 1
            if mask == bit:
                del self._holders[h]
            else:
                self._holders[h] = mask & ~bit

    def _unpredict(self, bit: int, h: int) -> None:
        mask = self._predicted.get(h, 0) & ~bit
        if mask:
            self._predicted[h] = mask
        else:
            self._predicted.pop(h, None)

    def _drop_entries(self, worker_id: str, bit: int) -> None:
        for h in [h for h, m in self._holders.items() if m & bit]:
            self._discard(worker_id, bit, h)
