"""The receiving half of a KV handoff: reserve blocks (reusing this engine's prefix cache), pull the rest
from the sender (asking it for its side when the transport is two-sided), finish the import; and a live
migration's staged blocks until the final stage takes them over or the migration is dropped.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from pdserve.config import WorkerConfig
from pdserve.engine.handoff import OutOfKVBlocks
from pdserve.kv.transport import KVTransport
from pdserve.protocol import DecodeStarted, KVHandoff, MigrationFinal, MigrationStage, StageResult


@dataclass
class _Inbound:
    request_id: str
    blocks: list[int] = field(default_factory=list)  # staged so far, in the request's block order
    busy: bool = False  # a stage is reserving or pulling into them
    dropped: bool = False
    touched: float = field(default_factory=time.monotonic)  # last stage; staged blocks of a silent source expire
    source_handle: object | None = None  # pinged between stages: a dead source's staged blocks are dropped


class Receiver:
    def __init__(self, worker_id: str, loop, transport: KVTransport, options: WorkerConfig) -> None:
        self.worker_id, self.loop, self.transport, self.options = worker_id, loop, transport, options
        # requests being imported (from before their reservation to the end of the pull): an abort of one
        # waits, or it would free blocks the reservation is taking or a transfer is writing into
        self._pulling: set[str] = set()
        self._abort_after_pull: set[str] = set()
        self._inbound: dict[str, _Inbound] = {}  # migration id -> staged blocks
        self.stall_s = 0.0  # fault injection: stages wait this long before copying
        self.fail_pulls = 0  # fault injection: this many next pulls fail before copying

    # ---- common steps ----------------------------------------------------------------------------------
    async def reserve(self, fn):
        """Run `fn(engine)` (an import or a stage), retrying while the engine is out of blocks."""
        deadline = time.monotonic() + self.options.reserve_timeout_s
        delay = 0.005
        while True:
            try:
                return await self.loop.call(fn)
            except OutOfKVBlocks:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def pull(self, sender: str, sender_handle, src: list[int], dst: list[int], timeout_s: float) -> None:
        """Copy the sender's blocks `src` into ours `dst`; a two-sided transport gets the sender's step too."""
        if not src:
            return
        if self.fail_pulls:
            self.fail_pulls -= 1
            raise RuntimeError(f"injected fault: KV transfer from {sender} failed")
        if not self.transport.two_sided:
            await self.transport.pull(sender, src, dst, timeout_s=timeout_s)
            return
        key = random.getrandbits(31)
        serve = sender_handle.serve_kv.remote(self.worker_id, src, key, timeout_s)
        results = await asyncio.gather(
            self.transport.pull(sender, src, dst, timeout_s=timeout_s, key=key), serve, return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    # ---- prefill -> decode -------------------------------------------------------------------------------
    async def import_handoff(self, handoff: KVHandoff, sender_handle) -> DecodeStarted | int:
        """Reserve, pull from the prefill worker, confirm so it frees its blocks, and start decoding. An int:
        the engine is at its admission bound (that many admitted) and the request holds no reserved slot;
        nothing was reserved, and the sender was told to free its blocks."""
        rid = handoff.request.request_id
        start = time.perf_counter()  # the handoff's time runs from reservation to confirmation
        self._pulling.add(rid)  # before the reservation: an abort arriving meanwhile waits for the pull
        try:
            reservation = await self.reserve(
                lambda e: e.import_request(handoff.request) if e.has_room(rid) else e.num_admitted()
            )
        except BaseException:
            self._not_importing(rid, sender_handle)
            raise
        if isinstance(reservation, int):
            self._not_importing(rid, sender_handle)
            return reservation
        n = reservation.num_cached_blocks
        # finish before the sender's lease runs out, or it may reuse the blocks we are reading
        timeout = min(self.options.pull_timeout_s, handoff.lease_deadline - time.time() - 0.5)
        try:
            if rid in self._abort_after_pull:
                raise asyncio.CancelledError(f"{rid} was aborted before its KV transfer")
            if timeout <= 0:
                raise TimeoutError(f"lease for {rid} ends before its KV could be pulled")
            await self.pull(
                handoff.prefill_worker, sender_handle, handoff.block_ids[n:], reservation.block_ids[n:], timeout
            )
        except BaseException:
            self._pulling.discard(rid)
            self._abort_after_pull.discard(rid)
            await self._abort_local([rid])
            raise
        finally:
            if sender_handle is not None:
                sender_handle.release.remote(rid)  # confirm (or give up): the sender frees either way
        elapsed = time.perf_counter() - start
        await self._finish(rid)
        return DecodeStarted(kv_transfer_s=elapsed, num_bytes=(len(handoff.block_ids) - n) * self.layout_bytes)

    def _not_importing(self, rid: str, sender_handle) -> None:
        self._pulling.discard(rid)
        self._abort_after_pull.discard(rid)
        if sender_handle is not None:
            sender_handle.release.remote(rid)  # nothing will be pulled: the sender may free its blocks

    async def _finish(self, rid: str) -> None:
        self._pulling.discard(rid)
        if rid in self._abort_after_pull:  # cancelled while the transfer was writing into our blocks
            self._abort_after_pull.discard(rid)
            await self._abort_local([rid])
            raise asyncio.CancelledError(f"{rid} was aborted during its KV transfer")
        await self.loop.call(lambda e: e.finish_import(rid))

    @property
    def layout_bytes(self) -> int:
        return self.transport.layout.block_bytes

    # ---- live migration, target side ---------------------------------------------------------------------
    async def stage(self, stage: MigrationStage, sender_handle) -> StageResult:
        """Stage the source's new full blocks: reuse what our cache holds, pull the rest."""
        inbound = self._inbound.setdefault(stage.migration_id, _Inbound(stage.request_id))
        inbound.source_handle = sender_handle
        if inbound.busy or stage.start != len(inbound.blocks):
            raise ValueError(f"migration {stage.migration_id}: stage at {stage.start}, {len(inbound.blocks)} staged")
        inbound.touched = time.monotonic()
        inbound.busy, ok = True, False  # from here a drop only marks it: this stage frees what it staged
        try:
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            have = list(inbound.blocks)
            new, reused = await self.reserve(lambda e: e.stage_blocks(stage.token_ids, have, stage.cache_salt))
            inbound.blocks += new
            if not inbound.dropped:
                src, dst = stage.src_block_ids[reused:], new[reused:]
                await self.pull(stage.source, sender_handle, src, dst, self.options.pull_timeout_s)
            ok = True
        finally:
            inbound.busy = False
            if not ok or inbound.dropped:
                self._inbound.pop(stage.migration_id, None)
                await self.loop.call(lambda e: e.drop_blocks(inbound.blocks))
        if inbound.dropped:
            raise RuntimeError(f"migration {stage.migration_id} was dropped while staging")
        return StageResult(num_copied=len(new) - reused, num_reused=reused)

    async def finish_migration(self, final: MigrationFinal, sender_handle) -> StageResult:
        """Import the paused request over the staged blocks, pull the rest, and resume it here."""
        inbound = self._inbound.pop(final.migration_id, _Inbound(final.request.request_id))
        rid = final.request.request_id
        if inbound.busy or final.start != len(inbound.blocks):
            await self.loop.call(lambda e: e.drop_blocks(inbound.blocks))
            raise ValueError(f"migration {final.migration_id}: final at {final.start}, {len(inbound.blocks)} staged")
        have = inbound.blocks if final.start else None  # nothing staged: reuse our own prefix cache instead
        self._pulling.add(rid)  # before the reservation: an abort arriving meanwhile waits for the pull
        try:
            reservation = await self.reserve(
                lambda e: e.import_request(final.request, have=have) if e.has_room(rid) else None
            )
            if reservation is None:
                raise RuntimeError(f"{self.worker_id} is at its admission bound: no room for {rid}")
        except BaseException:
            self._pulling.discard(rid)
            self._abort_after_pull.discard(rid)
            await self.loop.call(lambda e: e.drop_blocks(inbound.blocks))
            raise
        n = reservation.num_cached_blocks  # leading blocks that need no copy (staged, or cached here)
        src = final.src_block_ids[n - final.start :]
        try:
            await self.pull(final.source, sender_handle, src, reservation.block_ids[n:], self.options.pull_timeout_s)
        except BaseException:
            self._pulling.discard(rid)
            self._abort_after_pull.discard(rid)
            await self._abort_local([rid])
            raise
        await self._finish(rid)
        return StageResult(num_copied=len(src), num_reused=len(final.src_block_ids) - len(src))

    async def drop(self, migration_id: str) -> None:
        """The migration will not complete: give its staged blocks back (after a pull into them ends)."""
        inbound = self._inbound.pop(migration_id, None)
        if inbound is None:
            return
        if inbound.busy:
            inbound.dropped = True  # the running stage frees them when it ends
            return
        await self.loop.call(lambda e: e.drop_blocks(inbound.blocks))

    async def expire(self, max_age_s: float, check_sources: bool = False) -> None:
        """Drop staged migrations whose source went silent (it died, or lost track) for `max_age_s`, and,
        with `check_sources`, those whose source Ray reports dead."""
        now = time.monotonic()
        for mid, inbound in list(self._inbound.items()):
            if not inbound.busy and now - inbound.touched > max_age_s:
                await self.drop(mid)
            elif check_sources and not inbound.busy and not await self._alive(inbound.source_handle):
                await self.drop(mid)

    async def _alive(self, handle) -> bool:
        if handle is None or not hasattr(handle, "ping"):
            return True
        import ray

        try:
            await asyncio.wait_for(handle.ping.remote(), self.options.liveness_interval_s * 4)
            return True
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            return False

    # ---- aborts -------------------------------------------------------------------------------------------
    def defer_abort(self, request_ids: list[str]) -> list[str]:
        """Those of `request_ids` safe to abort now; the rest are aborted when their transfer ends."""
        now = []
        for rid in request_ids:
            if rid in self._pulling:
                self._abort_after_pull.add(rid)
            else:
                now.append(rid)
        return now

    async def _abort_local(self, request_ids: list[str]) -> None:
        await self.loop.call(lambda e: [e.abort(rid) for rid in request_ids])

    def describe(self) -> dict[str, str]:
        return {mid: f"{len(i.blocks)} blocks{' (copying)' if i.busy else ''}" for mid, i in self._inbound.items()}

    @property
    def num_staging(self) -> int:
        return len(self._inbound)
