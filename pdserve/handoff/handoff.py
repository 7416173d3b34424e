"""One worker's handoff: its Sender, Receiver and Migrator over one engine and one transport, and the single
entry point for an abort, which each half takes over when a transfer is using the request's blocks."""

from __future__ import annotations

from pdserve.config import MigrationConfig, WorkerConfig
from pdserve.handoff.migration import Migrator
from pdserve.handoff.peer import Engine
from pdserve.handoff.receiver import Receiver
from pdserve.handoff.sender import Sender
from pdserve.kv.transport import KVTransport


class Handoff:
    def __init__(
        self,
        worker_id: str,
        engine: Engine,
        transport: KVTransport,
        options: WorkerConfig,
        outboxes,
        migration: MigrationConfig | None = None,
    ) -> None:
        self.worker_id, self.engine = worker_id, engine
        self.migration = migration or MigrationConfig()
        self.sender = Sender(worker_id, engine, transport, options)
        self.receiver = Receiver(worker_id, engine, transport, options)
        self.migrator = Migrator(worker_id, engine, self.sender, outboxes, self.migration)

    async def abort(self, request_ids: list[str]) -> None:
        """Cancel requests in any state here, or where they migrated to. The sender keeps blocks a peer may
        be reading until its lease ends; an import frees blocks a pull may be writing once the pull ends;
        everything else is aborted in the engine now."""
        now = [rid for rid in request_ids if not (self.sender.abort(rid) or self.receiver.abort(rid))]
        if now:
            await self.engine.call(lambda e: [e.abort(rid) for rid in now])

    async def check(self, now: float, check_peers: bool) -> None:
        """Background, a few times a second: expired leases, dead peers, staged blocks of silent sources."""
        await self.sender.check(now, check_peers)
        await self.receiver.expire(2 * self.migration.stage_timeout_s, check_sources=check_peers)

    @property
    def busy(self) -> bool:
        """A transfer is under way in either direction (records not final yet)."""
        return bool(self.sender.leases or self.receiver.imports or self.receiver.staging)
