"""Local continuous batching: each step picks requests and how many tokens of each to compute.

Token-centric (as vLLM v1): a request needs `num_tokens - num_computed_tokens` more tokens computed;
prefill, chunked prefill, decode and recompute after preemption are all that one rule. Running requests
go first; when blocks run out the most recently admitted running request is preempted (its blocks freed,
recomputed later from its prompt plus outputs).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    out_of_blocks: list[Request] = field(default_factory=list)  # alone and still too long to fit
    parked: list[Request] = field(default_factory=list)  # would have been preempted: to migrate instead

    @property
    def empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Out of blocks, with `park_on_pressure` on, the victim is parked (kept with its blocks, not
        # scheduled) for its worker to migrate away instead of preempted; one at a time, others wait for it.
        self.park_on_pressure = False
        self.parked: list[Request] = []

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.parked:
            self.parked.remove(req)

    def admit(self, req: Request) -> None:
        """The entry point for a request that arrives with its KV computed (imported, resumed after an export,
        unparked): it runs from the next step when a batch slot is free (`max_num_seqs`); else it waits first
        in line as a preempted request does, its blocks freed (only running requests hold blocks, so the
        running ones can always preempt their way to room; its full blocks stay in the prefix cache)."""
        if len(self.running) < self.max_num_seqs:
            req.status = Status.RUNNING
            self.running.append(req)
        else:
            self._free_blocks(req)
            req.status = Status.WAITING
            self.waiting.appendleft(req)

    def unpark(self, req: Request) -> None:
        """The migration did not happen: schedule it here again; next time it is preempted, not parked."""
        if req in self.parked:
            self.parked.remove(req)
            req.no_park = True
            self.admit(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, req: Request, num_new: int) -> int:
        bs = self.blocks.block_size
        return max(0, -(-(req.num_computed_tokens + num_new) // bs) - len(req.block_ids))

    def _total_blocks(self, req: Request, num_new: int) -> int:
        return -(-(req.num_computed_tokens + num_new) // self.blocks.block_size)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self._blocks_needed(req, num_new)
            while not self.blocks.can_allocate(need):
                victim = self.running[-1]
                if victim is req and i == 0:
                    break
                if self._park(victim, out):
                    break  # blocks come back when the parked request has migrated: wait a step
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req itself was preempted
            if req in self.parked:
                continue  # it was the last one and parked itself: the next one is at i now
            if not self.blocks.can_allocate(need):
                if self._total_blocks(req, num_new) > self.blocks.num_blocks:
                    self.running.remove(req)
                    out.out_of_blocks.append(req)
                else:
                    i += 1  # blocks held outside the scheduler (handoffs) will come back; wait
                continue
            req.block_ids += self.blocks.allocate(need)
            out.requests.append(req)
            out.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if not req.block_ids:
                self._match_prefix(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self._blocks_needed(req, num_new)
            if not self.blocks.can_allocate(need):
                if self._total_blocks(req, req.num_tokens - req.num_computed_tokens) > self.blocks.num_blocks:
                    self.waiting.popleft()
                    self._free_blocks(req)
                    out.out_of_blocks.append(req)
                    continue
                self._free_blocks(req)
                break
            self.waiting.popleft()
            req.block_ids += self.blocks.allocate(need)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.status = Status.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(num_new)
            budget -= num_new
        return out

    def cached_prefix(self, req: Request) -> list[int]:
        """Block ids of the cached full blocks `req` can reuse, always leaving at least one token to compute
        (for the logits). Nothing is referenced."""
        hashes = req.update_hashes(self.blocks.block_size)
        return self.blocks.cached_prefix(
            hashes[: (req.num_tokens - 1) // self.blocks.block_size], req.all_token_ids, req.root
        )

    def _match_prefix(self, req: Request) -> None:
        """Reuse cached full blocks."""
        ids = self.cached_prefix(req)
        self.blocks.touch(ids)
        req.block_ids = ids
        req.num_cached_blocks = len(ids)
        req.num_computed_tokens = len(ids) * self.blocks.block_size
        if not req.admitted:
            req.num_cached_tokens = req.num_computed_tokens
            req.admitted = True

    def _free_blocks(self, req: Request) -> None:
        self.blocks.free(req.block_ids)
        req.block_ids = []
        req.num_cached_blocks = 0
        req.num_computed_tokens = 0

    def _park(self, victim: Request, out: ScheduledBatch) -> bool:
        if not self.park_on_pressure or victim.no_park or not victim.output_token_ids:
            return False
        if not self.parked:
            self.running.remove(victim)
            self.parked.append(victim)
            out.parked.append(victim)
        return True

    def _preempt(self, req: Request, out: ScheduledBatch) -> None:
        self.running.remove(req)
        self._free_blocks(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
