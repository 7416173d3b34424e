"""The receiving half of a KV handoff: one `Import` record per incoming request (a P->D handoff, a live
migration's final stage) and one `Staging` record per live migration's earlier stages. A transfer is made of
parts (one pull each: per tensor-parallel rank, per KV tier); a record is ready only when all its parts are,
and frees nothing while any part is still in flight. An abort or a drop is an event applied at the record's
next safe transition, never while a pull may write into its blocks.

    Import     event                              next       action
    RESERVING  reserved                           PULLING    start every part's pull
    RESERVING  reserved, aborted meanwhile        ABORTED    free the reservation (nothing was pulled)
    RESERVING  no room | out of blocks | error    FAILED     none (nothing reserved)
    RESERVING  reserved past the sender's hold    FAILED     free the reservation (no pull may start)
    PULLING    every part done                    READY      finish the import: the request runs here
    PULLING    a part failed, all parts ended     FAILED     free the reservation
    PULLING    all parts ended, aborted meanwhile ABORTED    free the reservation
    any live   abort                              same       aborted = True
    READY | FAILED | ABORTED                                 confirm to the sender (it releases); record gone

    Staging    event                              next       action
    IDLE       stage                              RESERVING  (a stage out of order: ValueError, unchanged)
    RESERVING  reserved                           PULLING    its blocks join the record's, which owns them
                                                             (past the source's hold: DROPPED, no pull)
    PULLING    every part done                    IDLE       none
    RESERVING | PULLING  failed, or dropped meanwhile  DROPPED  free every staged block
    RESERVING | PULLING  drop                     same       dropped = True
    IDLE       drop | expiry | source dead        DROPPED    free every staged block
    IDLE       final stage                        TAKEN      its Import takes the staged blocks over
    TAKEN      reserved | failed                  (gone)     the request's blocks now | free them
    TAKEN      drop                               TAKEN      none (the final's import decides)
    A drop returns only once no stage or final of its migration pulls any more (the source then releases).
"""

from __future__ import annotations

import asyncio
import enum
import math
import random
import time
from dataclasses import dataclass, field

from pdserve.config import WorkerConfig
from pdserve.engine.handoff import OutOfKVBlocks
from pdserve.handoff.peer import Engine, Peer, fire
from pdserve.kv.transport import KVTransport
from pdserve.protocol import DecodeStarted, KVHandoff, MigrationFinal, MigrationStage, StageResult


class ImportState(enum.Enum):
    RESERVING = "reserving"
    PULLING = "pulling"
    READY = "ready"
    FAILED = "failed"
    ABORTED = "aborted"


class StagingState(enum.Enum):
    IDLE = "idle"
    RESERVING = "reserving"
    PULLING = "pulling"
    DROPPED = "dropped"
    TAKEN = "taken"


class PartState(enum.Enum):
    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Import:
    request_id: str
    sender: Peer | None  # confirmed when the record ends (None: a migration's final, which its source ends)
    state: ImportState = ImportState.RESERVING
    parts: list[PartState] = field(default_factory=list)
    reserved: bool = False  # the engine holds blocks for it (freed by aborting the request there)
    aborted: bool = False
    migration_id: str = ""  # a migration's final stage: its drop waits for this record's end
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set when final


@dataclass
class Staging:
    migration_id: str
    request_id: str
    source: Peer | None = None  # asked whether it lives while the record is idle
    state: StagingState = StagingState.IDLE
    blocks: list[int] = field(default_factory=list)  # staged so far, in the request's block order
    parts: list[PartState] = field(default_factory=list)
    dropped: bool = False
    touched: float = field(default_factory=time.monotonic)  # last stage: a silent source's blocks expire
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set while no stage runs (IDLE, DROPPED)


class Receiver:
    def __init__(
        self, worker_id: str, engine: Engine, transport: KVTransport, options: WorkerConfig, num_parts: int = 1
    ) -> None:
        self.worker_id, self.engine, self.transport, self.options = worker_id, engine, transport, options
        self.num_parts = num_parts  # pulls per transfer (one today; per TP rank or per KV tier later)
        self.imports: dict[str, Import] = {}  # request id -> its import in progress
        self.staging: dict[str, Staging] = {}  # migration id -> its staged blocks
        self.stall_s = 0.0  # fault injection: stages wait this long before reserving
        self.fail_pulls = 0  # fault injection: this many next pulls fail before copying

    # ---- prefill -> decode, and a migration's final stage -------------------------------------------
    async def import_handoff(self, handoff: KVHandoff, sender: Peer | None) -> DecodeStarted | int:
        """Reserve, pull from the prefill worker, confirm so it releases its blocks, start decoding. An int:
        the engine is at its admission bound (that many admitted): nothing was reserved, the sender was told."""
        rid = handoff.request.request_id
        start = time.perf_counter()  # the handoff's time runs from reservation to confirmation
        rec = self.imports[rid] = Import(rid, sender)
        try:
            got = await self.reserve(
                lambda e: e.handoff.import_request(handoff.request) if e.has_room(rid) else e.num_admitted()
            )
        except BaseException:  # cancelled while the engine ran the import, it may have reserved
            rec.reserved = True
            await self._end(rec, ImportState.FAILED)
            raise
        if isinstance(got, int):
            await self._end(rec, ImportState.FAILED)
            return got
        rec.reserved, n = True, got.num_cached_blocks
        # finish before the sender's lease runs out, or it may reuse the blocks we are reading
        deadline = handoff.lease_deadline - 0.5
        await self._pull(rec, handoff.prefill_worker, sender, handoff.block_ids[n:], got.block_ids[n:], deadline)
        elapsed = time.perf_counter() - start
        return DecodeStarted(kv_transfer_s=elapsed, num_bytes=(len(handoff.block_ids) - n) * self.layout_bytes)

    async def finish_migration(self, final: MigrationFinal, source: Peer | None) -> StageResult:
        """Import the paused request over the staged blocks, pull the rest, and resume it here."""
        rid = final.request.request_id
        st = self.staging.get(final.migration_id) or Staging(final.migration_id, rid)
        if st.state is not StagingState.IDLE or final.start != len(st.blocks):
            await self.drop(final.migration_id)
            raise ValueError(f"migration {final.migration_id}: final at {final.start}, {len(st.blocks)} staged")
        st.state = StagingState.TAKEN  # the record stays until the import has taken the blocks over
        st.settled.clear()
        have = st.blocks if final.start else None  # nothing staged: reuse our own prefix cache instead
        rec = self.imports[rid] = Import(rid, None, migration_id=final.migration_id)
        try:
            got = await self.reserve(
                lambda e: e.handoff.import_request(final.request, have=have) if e.has_room(rid) else None
            )
            if got is None:
                raise RuntimeError(f"{self.worker_id} is at its admission bound: no room for {rid}")
        except BaseException:
            await self._drop_now(st)  # not taken over after all
            await self._end(rec, ImportState.FAILED)
            raise
        st.blocks = []  # the request's now
        self.staging.pop(final.migration_id, None)
        rec.reserved, n = True, got.num_cached_blocks  # leading blocks that need no copy (staged, or cached)
        src = final.src_block_ids[n - final.start :]
        await self._pull(rec, final.source, source, src, got.block_ids[n:], final.deadline or math.inf)
        return StageResult(num_copied=len(src), num_reused=len(final.src_block_ids) - len(src))

    async def _pull(self, rec: Import, peer: str, sender: Peer | None, src: list[int], dst: list[int], deadline):
        """`deadline` (wall clock): until when the sender keeps the blocks readable; no pull outlives it."""
        rid = rec.request_id
        if rec.aborted:
            await self._end(rec, ImportState.ABORTED)
            raise asyncio.CancelledError(f"{rid} was aborted before its KV transfer")
        timeout = self._timeout(deadline)
        if timeout <= 0:
            await self._end(rec, ImportState.FAILED)
            raise TimeoutError(f"the sender's hold on the KV of {rid} ends before it could be pulled")
        rec.state = ImportState.PULLING
        try:
            error = await self._pull_parts(rec.parts, peer, sender, src, dst, timeout)
        except BaseException:  # cancelled: gather returns only once every part has ended
            await self._end(rec, ImportState.ABORTED)
            raise
        if rec.aborted:
            await self._end(rec, ImportState.ABORTED)
            raise asyncio.CancelledError(f"{rid} was aborted during its KV transfer")
        if error is not None:
            await self._end(rec, ImportState.FAILED)
            raise error
        await self._end(rec, ImportState.READY)

    async def _end(self, rec: Import, state: ImportState) -> None:
        """The record's final transition: the record goes at once, then the engine and the sender are told."""
        rec.state = ImportState.ABORTED if rec.aborted and state is not ImportState.READY else state
        self.imports.pop(rec.request_id, None)
        rec.settled.set()
        rid = rec.request_id
        if rec.sender is not None:
            fire(rec.sender.confirm(rid))  # it has the KV, or will never read it: the sender releases
        if rec.state is ImportState.READY:
            await self._run(lambda e: e.handoff.finish_import(rid))
        elif rec.reserved or rec.aborted:  # frees the reservation (and gives back a reserved slot)
            await self._run(lambda e: e.abort(rid))

    async def _run(self, fn) -> None:
        """A record's final action: submitted, so that cancelling the caller cannot skip it; then wait for it."""
        self.engine.submit(fn)
        await self.engine.call(lambda e: None)

    # ---- live migration, target side ---------------------------------------------------------------------
    async def stage(self, stage: MigrationStage, source: Peer | None) -> StageResult:
        """Stage the source's new full blocks: reuse what our cache holds, pull the rest."""
        st = self.staging.setdefault(stage.migration_id, Staging(stage.migration_id, stage.request_id))
        if st.state is not StagingState.IDLE or stage.start != len(st.blocks):
            raise ValueError(f"migration {stage.migration_id}: stage at {stage.start}, {len(st.blocks)} staged")
        st.source, st.touched, st.state = source, time.monotonic(), StagingState.RESERVING
        st.settled.clear()
        try:
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            if st.dropped:
                raise RuntimeError(f"migration {stage.migration_id} was dropped while staging")
            have = list(st.blocks)
            new, reused = await self.reserve(lambda e: e.handoff.stage_blocks(stage.token_ids, have, stage.cache_salt))
        except BaseException:
            await self._drop_now(st)
            raise
        st.blocks += new  # the record owns them from here: a drop only marks it, this stage frees them
        if st.dropped:
            await self._drop_now(st)
            raise RuntimeError(f"migration {stage.migration_id} was dropped while staging")
        timeout = self._timeout(stage.deadline or math.inf)
        if timeout <= 0:
            await self._drop_now(st)
            raise TimeoutError(f"migration {stage.migration_id}: the source's hold ends before the stage's pull")
        st.state = StagingState.PULLING
        src, dst = stage.src_block_ids[reused:], new[reused:]
        try:
            error = await self._pull_parts(st.parts, stage.source, source, src, dst, timeout)
        except BaseException:
            await self._drop_now(st)
            raise
        if error is None and not st.dropped:
            st.state, st.touched = StagingState.IDLE, time.monotonic()
            st.settled.set()
            return StageResult(num_copied=len(new) - reused, num_reused=reused)
        await self._drop_now(st)
        raise error or RuntimeError(f"migration {stage.migration_id} was dropped while staging")

    async def drop(self, migration_id: str) -> None:
        """The migration will not complete: give its staged blocks back (a running stage does, at its end).
        Returns once nothing of this migration reads from the source any more: the source waits for this
        before it releases what it holds for the migration."""
        rec = next((r for r in self.imports.values() if r.migration_id == migration_id), None)
        if rec is not None:  # its final stage: the import decides for the staged blocks too
            await rec.settled.wait()
        st = self.staging.get(migration_id)
        if st is None or st.state is StagingState.TAKEN:
            return
        if st.state in (StagingState.RESERVING, StagingState.PULLING):
            st.dropped = True
            await st.settled.wait()
            return
        await self._drop_now(st)

    async def _drop_now(self, st: Staging) -> None:
        st.state = StagingState.DROPPED
        st.settled.set()
        if self.staging.get(st.migration_id) is st:
            del self.staging[st.migration_id]
        blocks, st.blocks = st.blocks, []
        if blocks:
            await self._run(lambda e: e.handoff.drop_blocks(blocks))

    async def expire(self, max_age_s: float, check_sources: bool = False) -> None:
        """Drop idle staged migrations whose source went silent for `max_age_s` (it died, or lost track),
        and, with `check_sources`, those whose source is known dead."""
        now = time.monotonic()
        for mid, st in list(self.staging.items()):
            if st.state is not StagingState.IDLE:
                continue
            if now - st.touched > max_age_s or (check_sources and st.source and not await st.source.alive()):
                if st.state is StagingState.IDLE:  # still: `alive` awaited
                    await self.drop(mid)

    # ---- common steps ----------------------------------------------------------------------------------
    def _timeout(self, deadline: float) -> float:
        return min(self.options.pull_timeout_s, deadline - time.time())

    async def reserve(self, fn):
        """Run `fn(engine)` (an import or a stage), retrying while the engine is out of blocks."""
        deadline = time.monotonic() + self.options.reserve_timeout_s
        delay = 0.005
        while True:
            try:
                return await self.engine.call(fn)
            except OutOfKVBlocks:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def _pull_parts(self, parts: list[PartState], peer: str, sender, src, dst, timeout_s) -> BaseException | None:
        """Pull `src` into `dst` in up to `num_parts` parts at once, tracking each in `parts`; returns the first
        error once every part has ended (a failed part never frees blocks another part still writes)."""
        n = max(1, min(self.num_parts, len(src)))
        chunks = [(src[i::n], dst[i::n]) for i in range(n)]
        parts[:] = [PartState.PULLING] * n

        async def part(i: int, s: list[int], d: list[int]) -> None:
            try:
                await self._pull_one(peer, sender, s, d, timeout_s)
                parts[i] = PartState.DONE
            except BaseException:
                parts[i] = PartState.FAILED
                raise

        results = await asyncio.gather(*(part(i, s, d) for i, (s, d) in enumerate(chunks)), return_exceptions=True)
        return next((r for r in results if isinstance(r, BaseException)), None)

    async def _pull_one(self, peer: str, sender, src: list[int], dst: list[int], timeout_s: float) -> None:
        """Copy the sender's blocks `src` into ours `dst`; a two-sided transport gets the sender's step too."""
        if not src:
            return
        if self.fail_pulls:
            self.fail_pulls -= 1
            raise RuntimeError(f"injected fault: KV transfer from {peer} failed")
        if not self.transport.two_sided:
            await self.transport.pull(peer, src, dst, timeout_s=timeout_s)
            return
        key = random.getrandbits(31)
        serve = sender.serve(self.worker_id, src, key, timeout_s)
        results = await asyncio.gather(
            self.transport.pull(peer, src, dst, timeout_s=timeout_s, key=key), serve, return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    # ---- aborts and reports --------------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        """True when an import of `request_id` is in progress: it ends aborted at its next transition."""
        rec = self.imports.get(request_id)
        if rec is None:
            return False
        rec.aborted = True
        return True

    @property
    def layout_bytes(self) -> int:
        return self.transport.layout.block_bytes

    def describe(self) -> dict[str, str]:
        return {mid: f"{len(st.blocks)} blocks ({st.state.value})" for mid, st in self.staging.items()}

    @property
    def num_staging(self) -> int:
        return len(self.staging)
