"""A simulated engine worker in virtual time: FIFO admission, chunked prefill, continuous-batching decode.

Like pdserve's engine scheduler, each step gives one token to every decoding sequence and the rest of the
`max_num_batched_tokens` budget to prefill chunks, oldest first; a waiting request is admitted (prefix
matched, blocks allocated) when it gets budget and its blocks fit. Simplifications: admission reserves the
whole prompt (plus, where it will decode, all of `max_tokens`), so nothing is preempted. Steps with no
prefill work run as one "macro step" up to the next finishing sequence, cut short at the step boundary
after new work arrives.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.protocol import KVEventBatch, WorkerStats
from pdserve.sim.kvcache import Blocks, KVCache
from pdserve.sim.model import LatencyModel
from pdserve.sim.trace import TraceRequest


@dataclass(eq=False)
class SimRequest:
    trace: TraceRequest
    prefill_worker: str = ""
    decode_worker: str = ""
    reason: str = ""
    policy_reason: str = ""
    predicted_cached: int = 0
    cached_tokens: int = 0  # prompt tokens the prefilling worker found in its cache
    computed: int = 0  # prompt tokens cached or computed on the prefilling worker
    stored: int = 0  # full prompt blocks registered in that worker's prefix cache
    blocks: Blocks | None = None  # on the worker that holds the request now
    prefill_blocks: Blocks | None = None  # held on the prefill worker until the KV transfer ends
    ready_s: float = 0.0  # prefill finished: waiting for the decode worker to reserve blocks since
    first_token_s: float | None = None
    decode_start_s: float | None = None  # joined a decode batch: the first token (local) or the KV landed (P/D)
    finish_s: float | None = None
    remaining: int = 0  # tokens left to decode
    context: int = 0  # tokens in the decode worker's KV for this request
    outcome: str = ""  # finished | rejected | failed:<why>
    transfer_tokens: int = 0


@dataclass
class Plan:
    """The step in flight: prefill chunks and decoders, or `steps` decode-only steps of a fixed batch."""

    start: float
    end: float
    chunks: list[tuple[SimRequest, int]] = field(default_factory=list)
    decoders: list[SimRequest] = field(default_factory=list)
    steps: int = 1
    context: int = 0


class SimWorker:
    def __init__(self, worker_id: str, role: str, model: LatencyModel, block_size: int, sim) -> None:
        self.worker_id, self.role, self.model, self.bs, self.sim = worker_id, role, model, block_size, sim
        self.cache = KVCache(model.kv_capacity_tokens // block_size)
        self.max_num_seqs = 128
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []
        self.decoding: list[SimRequest] = []
        self.imports: list[SimRequest] = []  # prefilled elsewhere, waiting for blocks here
        self.num_held = 0  # prefill: finished prefills whose blocks are held under a lease (as the engine's)
        self.num_pulling = 0  # decode: imports with blocks reserved, their KV on the way
        self.plan: Plan | None = None
        self.version = 0
        self.epoch, self.seq = f"{worker_id}-epoch", 0
        self.busy_s = 0.0
        self.prefill_tokens = 0
        self.decode_tokens = 0  # tokens sampled by decode steps (first tokens are counted by prefill)

    # ---- work arriving ---------------------------------------------------------------------------
    def add_prefill(self, req: SimRequest, now: float) -> None:
        self.waiting.append(req)
        self.kick(now)

    def add_decode(self, req: SimRequest, now: float) -> None:
        self.decoding.append(req)
        self.kick(now)

    def kick(self, now: float) -> None:
        """New work: start a step if idle; cut a decode macro step at its next boundary."""
        plan = self.plan
        if plan is None:
            self._start(now)
        elif plan.steps > 1:
            n = self._steps_by(plan, now)
            if n < plan.steps:
                self._schedule(Plan(plan.start, plan.start + self._run_s(plan, n), [], plan.decoders, n, plan.context))

    def _run_s(self, plan: Plan, steps: int) -> float:
        return self.model.decode_run_s(steps, len(plan.decoders), plan.context)

    def _steps_by(self, plan: Plan, now: float) -> int:
        """The first step boundary at or after `now` (in steps from the plan's start; at least 1)."""
        lo, hi = 1, plan.steps
        while lo < hi:
            mid = (lo + hi) // 2
            if plan.start + self._run_s(plan, mid) >= now:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ---- stepping --------------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        budget = self.model.max_num_batched_tokens - len(self.decoding)
        chunks, cost = [], 0.0
        for req in self.prefilling:
            if budget <= 0:
                break
            n = min(req.trace.num_prompt_tokens - req.computed, budget)
            chunks.append((req, n))
            cost += self.model.chunk_s(n, req.computed)
            budget -= n
        while self.waiting and budget > 0 and len(self.prefilling) + len(self.decoding) < self.max_num_seqs:
            req = self.waiting[0]
            fits = self._admit(req)
            if fits is None:  # larger than the whole cache
                self.waiting.popleft()
                self.sim.fail(req, "too_long")
                continue
            if not fits:
                break
            self.waiting.popleft()
            self.prefilling.append(req)
            n = min(req.trace.num_prompt_tokens - req.computed, budget)
            chunks.append((req, n))
            cost += self.model.chunk_s(n, req.computed)
            budget -= n
        context = sum(r.context for r in self.decoding)
        if chunks:
            dt = self.model.step_s(cost, len(self.decoding), context)
            self._schedule(Plan(now, now + dt, chunks, list(self.decoding), 1, context))
        elif self.decoding:
            decoders = list(self.decoding)
            plan = Plan(now, now, [], decoders, min(r.remaining for r in decoders), context)
            plan.end = now + self._run_s(plan, plan.steps)
            self._schedule(plan)

    def _usable(self, req: SimRequest) -> list[int]:
        """The prompt's block hashes a prefix hit may cover (the last token is always computed)."""
        return req.trace.block_hashes[: (req.trace.num_prompt_tokens - 1) // self.bs]

    def _admit(self, req: SimRequest) -> bool | None:
        """Match the prefix and allocate; False: not now (blocks busy), None: never (exceeds the cache)."""
        bs, trace = self.bs, req.trace
        usable = self._usable(req)
        hit = self.cache.match(usable)
        need = -(-(trace.num_prompt_tokens + (trace.max_tokens if self.role != "prefill" else 0)) // bs)
        if need > self.cache.num_blocks:
            return None
        blocks = self.cache.acquire(list(usable[:hit]), need - hit)
        if blocks is None:
            return False
        req.blocks, req.cached_tokens, req.computed, req.stored = blocks, hit * bs, hit * bs, hit
        return True

    def _schedule(self, plan: Plan) -> None:
        self.plan = plan
        self.version += 1
        self.sim.at(plan.end, self._end, self.version)

    def _end(self, now: float, version: int) -> None:
        if version != self.version:
            return  # superseded by a shorter plan
        plan, self.plan = self.plan, None
        self.busy_s += plan.end - plan.start
        self.decode_tokens += plan.steps * len(plan.decoders)
        freed = False
        for req in plan.decoders:
            req.remaining -= plan.steps
            req.context += plan.steps
            if req.remaining <= 0:
                self.decoding.remove(req)
                self.cache.release(req.blocks)
                self.sim.finish(req, now)
                freed = True
        for req, n in plan.chunks:
            req.computed += n
            self.prefill_tokens += n
            full = min(req.computed // self.bs, len(req.trace.block_hashes))
            if full > req.stored:
                self.cache.store(req.blocks, list(req.trace.block_hashes[req.stored : full]))
                req.stored = full
            if req.computed == req.trace.num_prompt_tokens:
                self.prefilling.remove(req)
                freed |= self._prefilled(req, now)
        if freed and self.imports:
            self.sim.try_imports(self, now)
        self._start(now)

    def _prefilled(self, req: SimRequest, now: float) -> bool:
        """The first token is out; True when the request's blocks were freed."""
        req.first_token_s = now
        self.sim.first_token(req, now)
        if req.trace.max_tokens == 1:
            self.cache.release(req.blocks)
            self.sim.finish(req, now)
            return True
        if self.role == "prefill":  # held under a lease until the decode worker has pulled the KV
            req.prefill_blocks, req.blocks = req.blocks, None
            self.num_held += 1
            self.sim.prefill_done(req, now)
            return False
        req.remaining, req.context = req.trace.max_tokens - 1, req.trace.num_prompt_tokens + 1
        req.decode_start_s = now
        self.decoding.append(req)
        return False

    def idle(self) -> bool:
        """Nothing queued, running, importing or held under a lease: a draining worker may stop."""
        busy = self.plan or self.waiting or self.prefilling or self.decoding or self.imports
        return not (busy or self.num_held or self.num_pulling)

    # ---- reports ---------------------------------------------------------------------------------
    def stats(self, now: float) -> WorkerStats:
        # as the engine does: a waiting prompt less the prefix this cache holds now
        queued = sum(r.trace.num_prompt_tokens - self.bs * self.cache.match(self._usable(r)) for r in self.waiting)
        queued += sum(r.trace.num_prompt_tokens - r.computed for r in self.prefilling)
        free = self.cache.num_free
        return WorkerStats(
            worker_id=self.worker_id,
            role=self.role,
            num_running=len(self.prefilling) + len(self.decoding),
            num_waiting=len(self.waiting),
            # as the engine reports it: requests routed before the next report start at once in these
            num_free_slots=max(0, self.max_num_seqs - len(self.prefilling) - len(self.decoding) - len(self.waiting)),
            num_held=self.num_held,
            num_importing=len(self.imports) + self.num_pulling,
            num_free_blocks=free,
            num_blocks=self.cache.num_blocks,
            kv_usage=1.0 - free / self.cache.num_blocks,
            num_prefill_tokens_queued=queued,
            time=now,
        )

    def events(self) -> KVEventBatch:
        self.seq += 1
        return KVEventBatch(worker_id=self.worker_id, epoch=self.epoch, seq=self.seq, events=self.cache.take_events())
