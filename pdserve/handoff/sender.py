"""The sending half of a KV handoff: one `Lease` record per outgoing transfer (a prefill's held request, a
live migration's stages and paused request), served to two-sided transports, and released on confirmation,
expiry, the peer's death or when nobody will pull; and where requests that migrated away went.

A lease's blocks may be read by its peer at any moment while it is HELD or SERVING (a one-sided READ needs
nothing from us), so only these events free them, each applied at once or, while serving, when it ends:

    state      event                                   next       action
    OPEN       held(blocks)                            HELD       deadline = now + lease_s; blocks readable
    OPEN       abort | unclaimed                       RELEASED   none (the prefill is aborted in the engine)
    HELD       stage(blocks)         [migration]       HELD       take a reference on each; readable
    HELD       begin_final, final(blocks) [migration]  HELD       the paused request is this lease's; readable
    HELD       serve                                   SERVING    serving += 1
    SERVING    serve | serve done                      SERVING    serving +/- 1; at 0: HELD, apply `pending`
    HELD       release(confirmed | expired | peer died | unclaimed)  RELEASED  free the request and references
    HELD       resume                [migration]       RELEASED   references dropped; the request runs here
                                                                  again (or is aborted, if `aborted`)
    SERVING    release | resume                        SERVING    pending = that event
    HELD/SERVING abort (prefill, or migration final)   same       aborted = True: its release still comes
    RELEASED   any                                     RELEASED   none (idempotent); the record is gone
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from pdserve.config import WorkerConfig
from pdserve.handoff.peer import Engine, Peer, fire
from pdserve.kv.transport import KVTransferError, KVTransport

log = logging.getLogger(__name__)

_MOVED_TTL_S = 120.0


class LeaseState(enum.Enum):
    OPEN = "open"  # the prefill for the peer still runs: nothing is held yet
    HELD = "held"  # blocks held for the peer, which may be reading them right now
    SERVING = "serving"  # held, and a two-sided transport is sending some of them
    RELEASED = "released"  # final: freed, or the request runs here again


@dataclass
class Lease:
    lease_id: str  # the request id (a prefill) or the migration id
    request_id: str
    peer: Peer | None
    state: LeaseState = LeaseState.OPEN
    migration: bool = False
    holds_request: bool = False  # the held engine request is this lease's (a prefill's; a migration's final)
    readable: set[int] = field(default_factory=set)  # blocks the peer may read (and a two-sided serve send)
    refs: list[int] = field(default_factory=list)  # references taken on blocks (a migration's stages)
    deadline: float | None = None  # wall clock; None: no expiry (a prefill still running, a migration)
    serving: int = 0
    pending: str | None = None  # a release reason, or "resume", that arrived while serving
    aborted: bool = False

    @property
    def live(self) -> bool:
        return self.state in (LeaseState.HELD, LeaseState.SERVING)


class Sender:
    def __init__(self, worker_id: str, engine: Engine, transport: KVTransport, options: WorkerConfig) -> None:
        self.worker_id, self.engine, self.transport, self.options = worker_id, engine, transport, options
        self.leases: dict[str, Lease] = {}
        self._moved: dict[str, tuple[Peer, float]] = {}  # request id -> (where it went, when)

    # ---- prefill -> decode -----------------------------------------------------------------------------
    def open(self, request_id: str, peer: Peer | None) -> None:
        """A prefill for `peer` starts: its blocks will be held once it ends (`held`)."""
        self.leases[request_id] = Lease(request_id, request_id, peer, holds_request=True)

    def held(self, request_id: str, block_ids: list[int]) -> float | None:
        """The prefill ended with its blocks held: the lease runs from now; its deadline, or None when the
        lease is no longer open (aborted meanwhile: there is no handoff, the engine aborts the request)."""
        lease = self.leases.get(request_id)
        if lease is None or lease.state is not LeaseState.OPEN:
            return None
        lease.state, lease.readable = LeaseState.HELD, set(block_ids)
        lease.deadline = time.time() + self.options.lease_s
        return lease.deadline

    def unclaimed(self, request_id: str) -> None:
        """Nobody will pull: the prefill failed, finished at its first token, or its caller left before it
        saw the handoff. An open lease ends; a held one releases at once (no peer knows its blocks)."""
        lease = self.leases.get(request_id)
        if lease is not None and lease.state is LeaseState.OPEN:
            self._end(lease, None)
        elif lease is not None:
            self._release(lease, "unclaimed")

    async def release(self, lease_id: str, reason: str) -> bool:
        """`reason`: confirmed (the receiver has the KV or gave up), expired, peer died, unclaimed. False
        when there was no live lease (already released: releases are idempotent)."""
        lease = self.leases.get(lease_id)
        if lease is None or not lease.live:
            return False
        self._release(lease, reason)
        await self.engine.call(lambda e: None)  # commands run in order: the blocks are free after this
        return True

    def abort(self, request_id: str) -> bool:
        """The client left. True when the handoff takes the abort over (the request moved away: forwarded;
        its blocks are held for a peer: released when the lease ends); False when the engine aborts it now."""
        moved = self._moved.pop(request_id, None)
        if moved is not None:
            fire(moved[0].abort([request_id]))
            return True
        for lease in list(self.leases.values()):
            if lease.request_id != request_id or lease.state is LeaseState.RELEASED:
                continue
            if lease.state is LeaseState.OPEN:
                self._end(lease, None)  # nothing held: the engine aborts the running prefill
            elif lease.holds_request:
                lease.aborted = True
                return True
        return False

    # ---- live migration, source side ---------------------------------------------------------------
    def open_migration(self, migration_id: str, request_id: str, peer: Peer) -> bool:
        """False when `request_id` is migrating already."""
        if any(lease.migration and lease.request_id == request_id for lease in self.leases.values()):
            return False
        self.leases[migration_id] = Lease(migration_id, request_id, peer, LeaseState.HELD, migration=True)
        return True

    async def hold_stage(self, migration_id: str, start: int):
        """The request's full blocks from `start` on, referenced until the migration ends (see
        EngineHandoff.hold_full_blocks); None when the request cannot migrate any more."""
        lease = self.leases[migration_id]
        view = await self.engine.call(lambda e: e.handoff.hold_full_blocks(lease.request_id, start))
        if view is not None:
            lease.refs += view[0]
            lease.readable.update(view[0])
        return view

    def begin_final(self, migration_id: str) -> None:
        """From here the paused request is this lease's: an abort waits for the final stage's end."""
        self.leases[migration_id].holds_request = True

    def hold_final(self, migration_id: str, block_ids: list[int]) -> None:
        self.leases[migration_id].readable.update(block_ids)

    async def end_migration(self, migration_id: str, migrated: bool) -> bool:
        """Migrated: release the paused request and the references; otherwise resume the request here (or
        abort it, if the client left meanwhile). Returns whether the client left during the final stage."""
        lease = self.leases.get(migration_id)
        if lease is None:
            return False
        aborted = lease.aborted
        self._release(lease, "confirmed") if migrated else self._resume(lease)
        await self.engine.call(lambda e: None)
        return aborted

    def moved(self, request_id: str, peer: Peer) -> None:
        self._moved[request_id] = (peer, time.monotonic())

    # ---- the sender-side step of two-sided transports ------------------------------------------------
    async def serve(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        """Send blocks to `receiver`'s pull; only blocks a live lease for it holds are served."""
        leases = [ls for ls in self.leases.values() if ls.live and ls.peer is not None and ls.peer.name == receiver]
        readable = set().union(*(ls.readable for ls in leases))
        if not set(block_ids) <= readable:
            missing = sorted(set(block_ids) - readable)[:8]
            raise KVTransferError(f"{self.worker_id}: blocks {missing} are not held for {receiver}")
        leases = [ls for ls in leases if ls.readable & set(block_ids)]
        for lease in leases:
            lease.state, lease.serving = LeaseState.SERVING, lease.serving + 1
        try:
            await self.transport.serve(receiver, block_ids, key, timeout_s)
        finally:
            for lease in leases:
                lease.serving -= 1
                if not lease.serving:
                    lease.state = LeaseState.HELD
                    pending, lease.pending = lease.pending, None
                    if pending == "resume":
                        self._resume(lease)
                    elif pending is not None:
                        self._release(lease, pending)

    # ---- background: expiry and dead peers -----------------------------------------------------------
    async def check(self, now: float, check_peers: bool) -> None:
        for lease in list(self.leases.values()):
            if lease.live and lease.deadline is not None and lease.deadline < now:
                log.warning("lease for %s expired; freeing its blocks", lease.lease_id)
                self._release(lease, "expired")
        for rid, (_, when) in list(self._moved.items()):
            if time.monotonic() - when > _MOVED_TTL_S:
                del self._moved[rid]
        if check_peers:
            held = [ls for ls in self.leases.values() if ls.live and ls.deadline is not None and ls.peer is not None]
            for peer in {ls.peer.name: ls.peer for ls in held}.values():
                if not await peer.alive():
                    for lease in [ls for ls in held if ls.peer.name == peer.name]:
                        log.warning("receiver %s is gone; freeing the blocks held for %s", peer.name, lease.lease_id)
                        self._release(lease, "peer died")

    # ---- transitions -----------------------------------------------------------------------------------
    def _release(self, lease: Lease, reason: str) -> None:
        if lease.state is LeaseState.SERVING:
            lease.pending = reason
            return
        rid, refs, holds = lease.request_id, lease.refs, lease.holds_request
        self._end(lease, lambda e: (e.handoff.release_blocks(refs), holds and e.handoff.release(rid)))

    def _resume(self, lease: Lease) -> None:
        if lease.state is LeaseState.SERVING:
            lease.pending = "resume"
            return
        rid, refs, holds, aborted = lease.request_id, lease.refs, lease.holds_request, lease.aborted

        def resume(e) -> None:
            e.handoff.release_blocks(refs)
            if holds and aborted:
                e.abort(rid)
            elif holds and e.handoff.resume(rid):
                log.info("%s carries on at %s", rid, self.worker_id)

        self._end(lease, resume)

    def _end(self, lease: Lease, action) -> None:
        """Final: the record goes at once (so no second event acts on it); the engine runs `action` next."""
        lease.state = LeaseState.RELEASED
        self.leases.pop(lease.lease_id, None)
        if action is not None:
            self.engine.submit(action)
