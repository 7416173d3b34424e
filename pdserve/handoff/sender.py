"""The sending half of a KV handoff: blocks held for a receiver under a lease (a prefill's blocks, a
migration's pinned stages), served to two-sided transports, freed on confirmation, lease expiry, abort or
the receiver's death; and where requests that migrated away went (so a late abort follows them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from pdserve.config import WorkerConfig
from pdserve.engine.sequence import Status
from pdserve.kv.transport import KVTransferError, KVTransport

log = logging.getLogger(__name__)

_MOVED_TTL_S = 120.0


@dataclass
class _Lease:
    receiver: str
    receiver_handle: object | None  # a Ray actor handle, pinged while the lease is open
    deadline: float | None = None  # None while the prefill still runs
    blocks: set[int] = field(default_factory=set)  # what the receiver may ask a two-sided transport for


class Sender:
    def __init__(self, worker_id: str, loop, transport: KVTransport, options: WorkerConfig) -> None:
        self.worker_id, self.loop, self.transport, self.options = worker_id, loop, transport, options
        self._leases: dict[str, _Lease] = {}
        self._pins: dict[str, set[int]] = {}  # migration id -> pinned blocks (served to its target)
        self._moved: dict[str, tuple[object, float]] = {}  # request id -> (target handle, when)

    # ---- leases (prefill -> decode) ------------------------------------------------------------------
    def hold(self, request_id: str, receiver: str, receiver_handle) -> None:
        """A prefill for `receiver` starts: its blocks will be held once it ends (`start_lease`)."""
        self._leases[request_id] = _Lease(receiver, receiver_handle)

    def start_lease(self, request_id: str, block_ids: list[int]) -> float:
        """The prefill ended and its blocks are held: the lease runs from now; returns its deadline."""
        deadline = time.time() + self.options.lease_s
        lease = self._leases.get(request_id)
        if lease is not None:
            lease.deadline, lease.blocks = deadline, set(block_ids)
        return deadline

    def is_held(self, request_id: str) -> bool:
        """Its prefill ended and its blocks wait for a receiver, which may be reading them right now."""
        lease = self._leases.get(request_id)
        return lease is not None and lease.deadline is not None

    def forget(self, request_id: str) -> None:
        """No blocks were held after all (the prefill failed, finished at once, or was cancelled)."""
        self._leases.pop(request_id, None)

    async def release(self, request_id: str) -> bool:
        """The receiver has the KV (or gave up): free the held blocks now."""
        if self._leases.pop(request_id, None) is None:
            return False
        await self.loop.call(lambda e: _release_held(e, request_id))
        return True

    def release_now(self, request_id: str) -> None:
        self._leases.pop(request_id, None)
        self.loop.submit(lambda e: _release_held(e, request_id))

    # ---- pins (live migration) -----------------------------------------------------------------------
    async def pin(self, migration_id: str, request_id: str, start: int):
        """The request's full blocks from `start` on, referenced until `unpin` (see engine.pin_full_blocks)."""
        view = await self.loop.call(lambda e: e.pin_full_blocks(request_id, start))
        if view is not None:
            self._pins.setdefault(migration_id, set()).update(view[0])
        return view

    async def unpin(self, migration_id: str, block_ids: list[int]) -> None:
        await self.loop.call(lambda e: e.unpin(block_ids))

    def allow(self, migration_id: str, block_ids: list[int]) -> None:
        """Blocks the migration's target may ask for (the final stage's, held by the paused request)."""
        self._pins.setdefault(migration_id, set()).update(block_ids)

    def end_migration(self, migration_id: str) -> None:
        self._pins.pop(migration_id, None)

    # ---- the sender-side step of two-sided transports ------------------------------------------------
    async def serve(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        """Send blocks to `receiver`'s pull; only blocks held for a handoff (lease or migration) are served."""
        allowed = set().union(*(lease.blocks for lease in self._leases.values() if lease.receiver == receiver))
        allowed = allowed.union(*self._pins.values())
        if not set(block_ids) <= allowed:
            missing = sorted(set(block_ids) - allowed)[:8]
            raise KVTransferError(f"{self.worker_id}: blocks {missing} are not held for {receiver}")
        await self.transport.serve(receiver, block_ids, key, timeout_s)

    # ---- requests that left ----------------------------------------------------------------------------
    def moved(self, request_id: str, target_handle) -> None:
        self._moved[request_id] = (target_handle, time.monotonic())

    def follow_aborts(self, request_ids: list[str]) -> list[str]:
        """Forward aborts of requests that migrated away to where they went; returns the others."""
        rest = []
        for rid in request_ids:
            entry = self._moved.pop(rid, None)
            if entry is None:
                rest.append(rid)
            else:
                entry[0].abort.remote([rid])
        return rest

    # ---- background: expiry and dead receivers ---------------------------------------------------------
    async def check(self, now: float, check_receivers: bool) -> None:
        for rid, lease in list(self._leases.items()):
            if lease.deadline is not None and lease.deadline < now:
                log.warning("lease for %s expired; freeing its blocks", rid)
                self.release_now(rid)
        for rid, (_, when) in list(self._moved.items()):
            if time.monotonic() - when > _MOVED_TTL_S:
                del self._moved[rid]
        if check_receivers and self._leases:
            await self._check_receivers()

    async def _check_receivers(self) -> None:
        import ray

        handles = {lease.receiver: lease.receiver_handle for lease in self._leases.values() if lease.receiver_handle}
        for name, handle in handles.items():
            try:
                await asyncio.wait_for(handle.ping.remote(), timeout=self.options.liveness_interval_s * 4)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                for rid, lease in list(self._leases.items()):
                    if lease.receiver == name and lease.deadline is not None:
                        log.warning("receiver %s is gone; freeing the blocks held for %s", name, rid)
                        self.release_now(rid)


def _release_held(engine, request_id: str) -> None:
    req = engine.requests.get(request_id)
    if req is not None and req.status is Status.HELD:
        engine.release(request_id)
