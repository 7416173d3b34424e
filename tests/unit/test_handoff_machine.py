"""The KV handoff as a state machine, driven at random (hypothesis.stateful, derandomized): a real sender
engine and a real receiver engine (the tiny demo model), each with its `Handoff`, over an in-process transport,
peers and engine-command queues that this machine drives by hand, so a pull, an engine command or a message
can be held in flight between rules. Rules: prefill and migration requests arrive, engines step, imports
reserve, pulls start / finish / fail, confirmations arrive, clients abort on either side, leases expire, a peer
dies, a migration's stage or final stage times out. After every rule: no block a pull reads or writes is free
or anyone else's; every block's references are those the live requests and the records hold; at most
`max_num_seqs` run. At the end, everything drained: no record, no request, no referenced block, and greedy
outputs of the requests that finished equal an undisturbed run's. Three machines: the base one, a tight receiver,
and a receiver whose free pool holds cached prefixes that imports reuse while other work squeezes the pool.
`python -m tests.put_back_races` puts each historic race back and checks that one of them fails."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pdserve.config import EngineConfig, MigrationConfig, WorkerConfig
from pdserve.engine.engine import LLMEngine, OutOfKVBlocks
from pdserve.handoff import Handoff, LocalPeer
from pdserve.hashing import block_hashes, root_hash
from pdserve.kv.transport import KVTransferError
from pdserve.protocol import KVHandoff, SamplingParams
from pdserve.workers.outbox import Outboxes
from tests.unit.test_engine_random import reference

BS = 4
PREFIXES = [[11, 12, 13, 14, 15, 16, 17, 18], [41, 42, 43, 44, 45, 46, 47, 48]]
PARAMS = {
    "pd": SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    "mig": SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
    "local": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
}
ROLES = {"pd": "prefill", "mig": "colocated", "local": "colocated"}
OPTIONS = WorkerConfig(lease_s=1e6, pull_timeout_s=1e6, reserve_timeout_s=1e-6)
MIGRATION = MigrationConfig(stage_timeout_s=1e6, max_stages=3, final_blocks=1)
# what a task of the handoff may fail with: a failed pull, no room, a timeout, a dead peer, a dropped stage
EXPECTED = (asyncio.CancelledError, KVTransferError, OutOfKVBlocks, TimeoutError, ConnectionError)
EXPECTED_TEXT = ("dropped while staging", "admission bound", "staged")
RARELY = st.integers(0, 3).map(lambda n: n == 0)  # destructive events: one draw in four


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class QueuedEngine:
    """The `Engine` seam with this machine as the engine thread: commands wait until a rule runs them."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.queue = engine, []

    async def call(self, fn, after_step: bool = False):
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((fn, fut))
        return await fut

    def submit(self, fn, after_step: bool = False) -> None:
        self.queue.append((fn, None))

    def run_commands(self) -> None:
        commands, self.queue = self.queue, []
        for fn, fut in commands:
            if fut is not None and fut.cancelled():
                continue  # as EngineThread: a command whose caller gave up does not run
            try:
                result = fn(self.engine)
            except Exception as e:
                assert fut is not None, f"a fire-and-forget engine command failed: {e!r}"
                fut.set_exception(e)
            else:
                if fut is not None:
                    fut.set_result(result)


class Transfer:
    def __init__(self, src: list[int], dst: list[int], src_engine: LLMEngine, dst_engine: LLMEngine) -> None:
        self.src, self.dst, self.src_engine, self.dst_engine = src, dst, src_engine, dst_engine
        self.state = "requested"  # -> copying -> done | failed; the transport may write from "requested" on
        self.gate = asyncio.get_running_loop().create_future()


class GatedTransport:
    """A one-sided transport whose pulls wait for the machine: started, then finished (the copy) or failed."""

    two_sided = False

    def __init__(self, machine: HandoffMachine, engine: LLMEngine) -> None:
        self.machine, self.engine = machine, engine
        self.layout = SimpleNamespace(block_bytes=engine.kv_cache[0].numel() * engine.kv_cache.element_size())

    async def pull(self, peer: str, src: list[int], dst: list[int], timeout_s: float, key: int = 0) -> None:
        t = Transfer(src, dst, self.machine.engines[peer], self.engine)
        self.machine.transfers.append(t)
        try:
            for phase in ("copying", "done"):
                if not await t.gate:
                    raise KVTransferError(f"pull of {len(src)} blocks from {peer} failed")
                if phase == "done":
                    t.dst_engine.kv_cache[t.dst] = t.src_engine.kv_cache[t.src]
                t.state, t.gate = phase, asyncio.get_running_loop().create_future()
        finally:
            t.state = "done" if t.state == "done" else "failed"
            self.machine.transfers.remove(t)


class MachinePeer(LocalPeer):
    """LocalPeer whose confirmations wait for a rule to deliver them and whose migration calls a rule can
    time out (the call goes on at the target, as a remote call does)."""

    def __init__(self, machine: HandoffMachine, handoff: Handoff) -> None:
        super().__init__(handoff)
        self.machine = machine

    async def confirm(self, request_id: str) -> None:
        if self.dead:
            raise ConnectionError(f"peer {self.name} died")
        self.machine.confirms.append(request_id)

    async def stage(self, stage):
        self.machine.messages.setdefault(stage.migration_id, []).append(stage)
        return await self._call(self.handoff.receiver.stage(stage, self.me), stage.migration_id)

    async def finish_migration(self, final):
        self.machine.messages.setdefault(final.migration_id, []).append(final)
        return await self._call(self.handoff.receiver.finish_migration(final, self.me), final.migration_id)

    async def drop_migration(self, migration_id: str) -> None:
        await self._call(self.handoff.receiver.drop(migration_id), migration_id, gave_up=True)

    async def _call(self, coro, migration_id: str = "", gave_up: bool = False):
        """A time-out of a call about a migration may mean its deadlines passed at the target too; one of
        a drop always does (the source waited for it longer than the deadlines it gave)."""
        timeout = asyncio.get_running_loop().create_future()
        timeout.migration_id, timeout.gave_up = migration_id, gave_up
        self.machine.calls.append(timeout)
        try:
            call = asyncio.ensure_future(super()._call(coro))
            await asyncio.wait([call, timeout], return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise TimeoutError("the peer did not answer in time")
            return call.result()
        finally:
            self.machine.calls.remove(timeout)


def _engine(num_kv_blocks: int, max_num_seqs: int) -> LLMEngine:
    cfg = EngineConfig(block_size=BS, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
    return LLMEngine(cfg)


class HandoffMachine(RuleBasedStateMachine):
    RECEIVER_BLOCKS = 12  # the receiver is short of blocks and of batch slots
    MAX_REQUESTS = 4

    def __init__(self) -> None:
        super().__init__()
        self.aio = asyncio.new_event_loop()
        asyncio.set_event_loop(self.aio)
        self.s, self.r = _engine(24, 4), _engine(self.RECEIVER_BLOCKS, 2)
        self.engines = {"s": self.s, "r": self.r}
        self.se, self.re = QueuedEngine(self.s), QueuedEngine(self.r)
        self.transfers: list[Transfer] = []
        self.confirms: list[str] = []
        self.calls: list[asyncio.Future] = []
        self.tasks: list[asyncio.Task] = []
        self.hs = Handoff("s", self.se, GatedTransport(self, self.s), OPTIONS, Outboxes(), MIGRATION)
        self.hr = Handoff("r", self.re, GatedTransport(self, self.r), OPTIONS, Outboxes(), MIGRATION)
        self.hr.receiver.num_parts = 2  # every transfer in two parts: ready only when both are
        self.peer_r, self.peer_s = MachinePeer(self, self.hr), MachinePeer(self, self.hs)  # as S, R see each other
        self.peer_r.me, self.peer_s.me = self.peer_s, self.peer_r
        self.reqs: dict[str, dict] = {}
        self.handoffs: list[KVHandoff] = []  # prefills done, not yet sent to the receiver
        self.imports: dict[str, asyncio.Task] = {}
        self.messages: dict[str, list] = {}  # migration id -> its stages and final, as sent
        self.sent: dict[str, KVHandoff] = {}  # every handoff made, by request id (the receiver reads its deadline)
        self.occupied: list[int] = []  # R's blocks held by other work (see `occupy`)

    # ---- driving -----------------------------------------------------------------------------------
    def settle(self) -> None:
        for _ in range(20):
            self.aio.run_until_complete(asyncio.sleep(0))

    def spawn(self, coro) -> asyncio.Task:
        task = self.aio.create_task(coro)
        self.tasks.append(task)
        self.settle()
        return task

    def record(self, deltas) -> None:
        for d in deltas:
            req = self.reqs[d.request_id]
            for i, t in enumerate(d.new_token_ids):
                assert req["tokens"].setdefault(d.index + i, t) == t, f"{d.request_id}: token {d.index + i} differs"
            if d.finished:
                req["finished"] = d.finish_reason

    def step(self, side: str) -> None:
        eng, queue = self.engines[side], self.se if side == "s" else self.re
        queue.run_commands()
        self.settle()
        queue.run_commands()
        if not eng.has_unfinished():
            return
        deltas = eng.step()
        self.record(deltas)
        for d in deltas:  # as the worker does: export on the engine thread, start the lease on the loop
            if side == "s" and d.held:
                record, blocks = self.s.handoff.export_request(d.request_id)
                deadline = self.hs.sender.held(d.request_id, blocks)
                if deadline is not None:
                    h = KVHandoff(request=record, prefill_worker="s", block_ids=blocks, lease_deadline=deadline,
                                  num_bytes=0)  # fmt: skip
                    self.handoffs.append(h)
                    self.sent[d.request_id] = h
        self.settle()

    # ---- rules -------------------------------------------------------------------------------------
    @precondition(lambda self: len(self.reqs) < self.MAX_REQUESTS)
    @rule(
        kind=st.sampled_from(["pd", "mig", "local"]),
        prefix=st.integers(0, 2),
        tail=st.lists(st.integers(50, 250), max_size=6),
    )
    def add(self, kind, prefix, tail):
        """A request: prefilled at S for R (pd), decoding at S and migratable (mig), or run at R alone (local:
        it fills R's blocks and, once done, leaves its prefix cached in R's free pool)."""
        rid = f"{kind}{len(self.reqs)}"
        prompt = (PREFIXES[prefix] if prefix < len(PREFIXES) else [])[: 4 + len(tail)] + tail or [7]
        self.reqs[rid] = {"kind": kind, "prompt": prompt, "tokens": {}, "finished": None, "aborted": False}
        if kind == "pd":
            self.hs.sender.open(rid, self.peer_r)
        (self.r if kind == "local" else self.s).add_request(rid, prompt, PARAMS[kind], role=ROLES[kind])

    @rule(side=st.sampled_from(["s", "r"]))
    def step_engine(self, side):
        self.step(side)

    @rule(side=st.sampled_from(["s", "r"]))
    def run_engine_commands(self, side):
        (self.se if side == "s" else self.re).run_commands()
        self.settle()

    @precondition(lambda self: self.handoffs)
    @rule(i=st.integers(0, 7))
    def start_import(self, i):
        h = self.handoffs.pop(i % len(self.handoffs))
        self.imports[h.request.request_id] = self.spawn(self.hr.receiver.import_handoff(h, self.peer_s))

    @precondition(lambda self: self.transfers)
    @rule(i=st.integers(0, 7), fail=RARELY)
    def advance_pull(self, i, fail):
        """Start a requested pull, or finish a copying one; or make it fail."""
        t = self.transfers[i % len(self.transfers)]
        t.gate.set_result(not fail)
        self.settle()

    @precondition(lambda self: self.confirms)
    @rule(i=st.integers(0, 7))
    def deliver_confirm(self, i):
        self.spawn(self.hs.sender.release(self.confirms.pop(i % len(self.confirms)), "confirmed"))

    @precondition(lambda self: self.reqs)
    @rule(side=st.sampled_from(["s", "r"]), i=st.integers(0, 7), now=RARELY)
    def client_aborts(self, side, i, now):
        """Mostly a request mid-handoff (the interesting case), now and then any request."""
        moving = sorted({*self.hr.receiver.imports, *(ls.request_id for ls in self.hs.sender.leases.values())})
        if not (moving or now):
            return
        rids = moving if moving and not now else sorted(self.reqs)
        rid = rids[i % len(rids)]
        self.reqs[rid]["aborted"] = True
        self.spawn((self.hs if side == "s" else self.hr).abort([rid]))

    @precondition(lambda self: any(ls.deadline for ls in self.hs.sender.leases.values()))
    @rule(i=st.integers(0, 7), now=RARELY)
    def lease_expires(self, i, now):
        if not now:
            return
        leases = [ls for ls in self.hs.sender.leases.values() if ls.deadline]
        cutoff = leases[i % len(leases)].deadline
        for lease in [ls for ls in leases if ls.deadline <= cutoff]:  # these expire: the receiver's clock agrees
            self.sent[lease.request_id].lease_deadline = 1.0
            self.time_out_pulls(lease.readable)  # its limit ends before the lease
        self.settle()
        self.spawn(self.hs.sender.check(cutoff + 1e-6, False))

    def time_out_pulls(self, blocks: set[int]) -> None:
        for t in list(self.transfers):
            if set(t.src) & blocks and not t.gate.done():
                t.gate.set_result(False)

    @rule(dead=st.sampled_from(["r", "s"]), now=RARELY)
    def peer_dies(self, dead, now):
        """The peer is seen dead: its pulls die with it (a receiver's imports too), then the survivor's
        liveness check frees what it kept for the peer. The machine then lets it come back empty-handed."""
        if not now:
            return
        for t in list(self.transfers):
            if not t.gate.done():
                t.gate.set_result(False)
        peer = self.peer_r if dead == "r" else self.peer_s
        peer.dead = True
        if dead == "r":
            for task in self.imports.values():
                task.cancel()
            self.handoffs.clear()  # a dead receiver gets no more handoffs
            self.settle()
            self.spawn(self.hs.sender.check(0.0, True))
        else:
            self.spawn(self.hr.receiver.expire(1e9, check_sources=True))
        peer.dead = False

    @precondition(lambda self: self.migratable())
    @rule(i=st.integers(0, 7))
    def migrate(self, i):
        rids = self.migratable()
        self.spawn(self.hs.migrator.migrate(rids[i % len(rids)], self.peer_r, "test"))

    def migratable(self) -> list[str]:
        busy = {ls.request_id for ls in self.hs.sender.leases.values() if ls.migration}
        return [rid for rid, _ in self.s.handoff.migratable() if rid not in busy]

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 7), now=RARELY, deadline_passed=st.booleans())
    def peer_call_times_out(self, i, now, deadline_passed):
        """The source stops waiting for a stage or final stage. Either the deadline it gave has passed (the
        target starts no pull for it and its pulls have ended: that deadline limits them), or it gave up
        early (then its drop waits for the target to stop pulling)."""
        if not now:
            return
        timeout = self.calls[i % len(self.calls)]
        if timeout.migration_id and (deadline_passed or timeout.gave_up):
            for message in self.messages.get(timeout.migration_id, []):
                message.deadline = 1.0
            lease = self.hs.sender.leases.get(timeout.migration_id)
            self.time_out_pulls(lease.readable if lease else set())
        timeout.set_result(None)
        self.settle()

    # ---- invariants --------------------------------------------------------------------------------
    @invariant()
    def no_pull_touches_a_block_its_record_does_not_hold(self):
        readable = set().union(*(ls.readable for ls in self.hs.sender.leases.values() if ls.live))
        owners = Counter()
        for req in self.r.requests.values():
            owners.update(req.block_ids)
        for stg in self.hr.receiver.staging.values():
            owners.update(stg.blocks)
        for t in self.transfers:
            assert set(t.src) <= readable, f"a pull reads {sorted(set(t.src) - readable)}, which no lease holds"
            assert all(self.s.blocks.blocks[b].ref_cnt > 0 for b in t.src), f"a pull reads free blocks {t.src}"
            assert all(self.r.blocks.blocks[b].ref_cnt > 0 for b in t.dst), f"a pull writes free blocks {t.dst}"
            assert all(owners[b] == 1 for b in t.dst), f"a pull writes blocks {t.dst} not owned by its record alone"

    @invariant()
    def references_are_what_requests_and_records_hold(self):
        for side, eng, queue in (("s", self.s, self.se), ("r", self.r, self.re)):
            held = Counter()
            for req in eng.requests.values():
                held.update(req.block_ids)
            if side == "s":
                for lease in self.hs.sender.leases.values():
                    held.update(lease.refs)
            else:
                for stg in self.hr.receiver.staging.values():
                    held.update(stg.blocks)
                held.update(self.occupied)
            for b in eng.blocks.blocks:
                # a release may still be queued for the engine: then it holds more, never less
                assert b.ref_cnt >= held[b.block_id], f"{side}: block {b.block_id} freed while held {held[b.block_id]}x"
                if not queue.queue:
                    assert b.ref_cnt == held[b.block_id], (
                        f"{side}: block {b.block_id} has {b.ref_cnt} references, the records hold {held[b.block_id]}"
                    )
            assert eng.blocks.num_free_blocks == sum(b.ref_cnt == 0 for b in eng.blocks.blocks)
            assert len(eng.scheduler.running) <= eng.scheduler.max_num_seqs

    @invariant()
    def tasks_fail_only_as_the_protocol_allows(self):
        for task in [t for t in self.tasks if t.done()]:
            self.tasks.remove(task)
            if task.cancelled():
                continue
            e = task.exception()
            if e is None or isinstance(e, EXPECTED) or any(s in str(e) for s in EXPECTED_TEXT):
                continue
            raise AssertionError(f"a handoff task failed unexpectedly: {e!r}") from e

    # ---- the end: drain, then nothing is left ------------------------------------------------------
    def teardown(self):
        try:
            self.r.blocks.free(self.occupied)
            self.occupied = []
            for _ in range(400):
                if not (self.transfers or self.confirms or self.handoffs or self.calls or self.se.queue
                        or self.re.queue or self.s.has_unfinished() or self.r.has_unfinished()
                        or any(not t.done() for t in self.tasks)):  # fmt: skip
                    if not self.hs.sender.leases:
                        break
                    # time passes: leases nobody will confirm (a confirmation lost to a "dead" sender) expire
                    for h in self.sent.values():
                        h.lease_deadline = 1.0
                    self.spawn(self.hs.sender.check(math.inf, False))
                while self.handoffs:
                    self.start_import(0)
                for t in list(self.transfers):
                    if not t.gate.done():
                        t.gate.set_result(True)
                while self.confirms:
                    self.deliver_confirm(0)
                self.step("s")
                self.step("r")
            else:
                raise AssertionError("the handoff did not drain")
            self.tasks_fail_only_as_the_protocol_allows()
            assert not self.hs.sender.leases, self.hs.sender.leases
            assert not self.hr.receiver.imports and not self.hr.receiver.staging
            for eng in (self.s, self.r):
                assert not eng.requests, [(r.request_id, r.status, r.role) for r in eng.requests.values()]
                eng.blocks.check_no_leak()
            for rid, req in self.reqs.items():
                if req["aborted"] or not req["finished"]:
                    continue
                tokens = [req["tokens"][i] for i in range(len(req["tokens"]))]
                assert tokens == reference(tuple(req["prompt"]), PARAMS[req["kind"]])[0], rid
        finally:
            for task in asyncio.all_tasks(self.aio):
                task.cancel()
            self.settle()
            self.aio.close()
            asyncio.set_event_loop(None)


class TightHandoffMachine(HandoffMachine):
    """More requests on a receiver with fewer blocks: imports meet a full pool, often with the prompt's cached
    prefix in its free part (and so among the blocks they take)."""

    RECEIVER_BLOCKS = 8
    MAX_REQUESTS = 8


class ReuseHandoffMachine(TightHandoffMachine):
    """A receiver that has served both shared prefixes before, whose free pool other work keeps at the edge:
    imports reuse cached blocks that sit in the free pool, with barely enough room (or not) for the rest."""

    MAX_REQUESTS = 10

    @initialize()
    def warm_receiver_cache(self):
        for prefix in range(len(PREFIXES)):
            self.add("local", prefix, [60 + prefix, 61, 62, 63])
            while self.r.has_unfinished():
                self.step("r")

    @rule(leave=st.integers(0, 3))
    def occupy(self, leave):
        """Other work at R takes its free blocks until `leave` are left. The pool hands out the blocks freed
        longest ago first, so a finished request's cached prefix stays among the last free ones."""
        self.occupied += self.r.blocks.allocate(max(self.r.blocks.num_free_blocks - leave, 0))

    @precondition(lambda self: self.occupied)
    @rule()
    def release_occupied(self):
        self.r.blocks.free(self.occupied)
        self.occupied = []

    @precondition(lambda self: self.handoffs)
    @rule(short=st.booleans())
    def squeeze_then_import(self, short):
        """Other work at R takes free blocks until what is left fits the import that reuses the most free
        cached blocks exactly (those blocks and the new ones it needs), or one block less; then it starts."""
        pool = self.r.blocks

        def plan(h: KVHandoff) -> tuple[list[int], int]:  # the free cached blocks it reuses, the new ones
            rec = h.request
            tokens = [*rec.prompt_token_ids, *rec.output_token_ids]
            root = root_hash(self.r.model_id, rec.cache_salt)
            hashes = block_hashes(tokens, BS, root)[: rec.num_computed_tokens // BS]
            cached = pool.cached_prefix(hashes, tokens, root)
            return [b for b in cached if pool.blocks[b].ref_cnt == 0], -(-rec.num_computed_tokens // BS) - len(cached)

        i = max(range(len(self.handoffs)), key=lambda i: len(plan(self.handoffs[i])[0]))
        reused, new = plan(self.handoffs[i])
        pool.touch(reused)  # kept out of the other work's way, then put back last in eviction order
        self.occupied += pool.allocate(max(pool.num_free_blocks - (new - short), 0))
        pool.free(reused)
        self.start_import(i)

    @rule(side=st.sampled_from(["s", "r"]))
    def step_engine_ten_times(self, side):
        """Enough for a request to finish and leave its prefix cached and free."""
        for _ in range(10):
            self.step(side)


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
for machine in (HandoffMachine, TightHandoffMachine, ReuseHandoffMachine):
    machine.TestCase.settings = SETTINGS
test_handoff_machine = HandoffMachine.TestCase
test_handoff_machine_tight = TightHandoffMachine.TestCase
test_handoff_machine_reuse = ReuseHandoffMachine.TestCase
