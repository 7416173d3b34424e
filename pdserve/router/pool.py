"""One pool of workers as the Router sees it: their views, their bits in the prefix index and, for a ranked
policy, their order by cost, so a decision scores a handful of workers instead of every one."""

from __future__ import annotations

from bisect import bisect_left, insort

from pdserve.router.policies import Candidate, RoutingPolicy, WorkerView


class Pool:
    """The workers of one pool ("prefill", or "decode" with the colocated ones) with their bits in the prefix
    index and, for a ranked policy (see `CostPolicy`), their order by (worker cost, tiebreak), kept sorted
    as views change."""

    def __init__(self, name: str, policy: RoutingPolicy) -> None:
        self.name = name
        self.policy = policy if getattr(policy, "ranked", False) else None
        self.views: dict[str, WorkerView] = {}
        self.bits: dict[str, int] = {}
        self._ids: dict[int, str] = {}  # bit -> worker id
        self.mask = 0
        self._order: list[tuple] = []  # (worker cost, tiebreak, view, bit); tiebreak ends with the worker id
        self._keys: dict[str, tuple] = {}
        self._by_queue: list[tuple] = []  # prefill pool: (queued prompt tokens, worker id, view), for the decider
        self._queue_keys: dict[str, tuple] = {}

    def add(self, view: WorkerView, bit: int) -> None:
        self.views[view.worker_id], self.bits[view.worker_id], self._ids[bit] = view, bit, view.worker_id
        self.mask |= bit
        self.update(view)

    def remove(self, worker_id: str) -> None:
        self.views.pop(worker_id, None)
        bit = self.bits.pop(worker_id, 0)
        self._ids.pop(bit, None)
        self.mask &= ~bit
        _place(self._order, self._keys, worker_id, None)
        _place(self._by_queue, self._queue_keys, worker_id, None)

    def update(self, view: WorkerView) -> None:
        if self.name == "prefill":
            _place(self._by_queue, self._queue_keys, view.worker_id, (view.queued_tokens, view.worker_id, view))
        if self.policy is not None:
            cost, tiebreak = self.policy.worker_cost(view, self.name), self.policy.tiebreak(view, self.name)
            _place(self._order, self._keys, view.worker_id, (cost, tiebreak, view, self.bits[view.worker_id]))

    def first(self, admits, among: int = -1) -> WorkerView | None:
        """The lowest-ranked worker (of those in the mask `among`) that `admits`."""
        if among > 0 and among.bit_count() <= 3:  # a few (-1: all): compare their keys
            keys, ids, members = self._keys, self._ids, []
            while among:
                low = among & -among
                among ^= low
                if admits((key := keys[ids[low]])[2]):
                    members.append(key)
            return min(members)[2] if members else None
        for _, _, view, bit in self._order:
            if bit & among and admits(view):
                return view
        return None

    def least_queued(self, admits) -> WorkerView | None:
        """The admissible worker with the fewest prompt tokens queued for prefill."""
        return next((view for _, _, view in self._by_queue if admits(view)), None)

    def candidates(self, admits, ends: list[tuple[int, int]], to_tokens) -> list[tuple[Candidate, int]]:
        """(candidate, cached blocks) for each admissible worker that may win: for an unranked policy all of
        them; for a ranked one the first admissible worker of each group caching the same number of leading
        blocks, and the first admissible of all (every other worker costs at least as much)."""
        if self.policy is None:
            found = {}
            for blocks, mask in ends:
                for worker_id, bit in self.bits.items():
                    if bit & mask:
                        found[worker_id] = blocks
            matched = ((w, found.get(w.worker_id, 0)) for w in self.views.values() if admits(w))
            return [(Candidate(w, to_tokens(blocks)), blocks) for w, blocks in matched]
        best = self.first(admits)
        if best is None:
            return []
        best_bit, best_blocks, out = self.bits[best.worker_id], 0, []
        for blocks, mask in ends:
            if mask & best_bit:
                best_blocks = blocks
            elif mask & self.mask and (w := self.first(admits, mask & self.mask)) is not None:
                out.append((Candidate(w, to_tokens(blocks)), blocks))
        out.append((Candidate(best, to_tokens(best_blocks)), best_blocks))
        return out


def _place(order: list[tuple], keys: dict[str, tuple], worker_id: str, key: tuple | None) -> None:
    """Move the worker's entry in the sorted `order` to `key` (None: take it out)."""
    old = keys.pop(worker_id, None)
    if old == key and key is not None:
        keys[worker_id] = key
        return
    if old is not None:
        del order[bisect_left(order, old)]
    if key is not None:
        insort(order, key)
        keys[worker_id] = key
