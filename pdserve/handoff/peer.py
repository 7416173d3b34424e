"""The seams of the handoff: `Peer` (the calls it makes on another worker), `Engine` (how it runs commands on
its own engine), and `LocalPeer`, the in-process Peer over another worker's `Handoff` (tests, the oracle).
The Ray-actor Peer lives in `pdserve.workers.ray_peer`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pdserve.protocol import MigrationFinal, MigrationStage, StageResult

if TYPE_CHECKING:
    from pdserve.engine.engine import LLMEngine
    from pdserve.handoff.handoff import Handoff

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Runs commands on one engine's thread, between steps (`pdserve.workers.engine_thread.EngineThread`).
    The handoff touches its engine only through these, and only through the engine's public methods."""

    async def call(self, fn: Callable[[LLMEngine], Any], after_step: bool = False) -> Any: ...

    def submit(self, fn: Callable[[LLMEngine], Any], after_step: bool = False) -> Any:
        """Run `fn` without waiting for it (fire and forget; commands run in the order they are given)."""


class Peer(Protocol):
    """Another worker, as this worker's handoff calls it. Who calls: the Receiver calls a sender's `confirm`
    and `serve`; the Sender and the Receiver call `alive`; the Migrator calls a target's `stage`,
    `finish_migration`, `drop_migration` and `abort`. Every call may raise when the peer died; none of them
    frees or writes this worker's blocks (the records here decide that)."""

    name: str

    async def confirm(self, request_id: str) -> None:
        """Receiver -> sender: it has the KV of `request_id`, or gave up; the sender releases the held blocks."""

    async def serve(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        """Receiver -> sender, two-sided transports only: send these held blocks to `receiver`'s pull `key`."""

    async def alive(self) -> bool:
        """False once the peer is known dead (or silent past the liveness timeout)."""

    async def stage(self, stage: MigrationStage) -> StageResult:
        """Source -> target: stage these full blocks (the target pulls them from the source)."""

    async def finish_migration(self, final: MigrationFinal) -> StageResult:
        """Source -> target: take the paused request over, pull the rest, resume it there."""

    async def drop_migration(self, migration_id: str) -> None:
        """Source -> target: the migration will not complete; give its staged blocks back."""

    async def abort(self, request_ids: list[str]) -> None:
        """Cancel requests there (a request that migrated there, or a final stage that failed)."""


class LocalPeer:
    """A Peer that is another `Handoff` in this process: `me` is the caller as the peer sees it (how it reaches
    back: a migration target pulls from its source). Each call runs as its own task, as a remote call does: a
    caller that stops waiting (a timeout) does not stop it. `dead`: every call fails and `alive` is False."""

    def __init__(self, handoff: Handoff, me: LocalPeer | None = None) -> None:
        self.handoff, self.me, self.dead = handoff, me, False
        self.name = handoff.worker_id

    async def _call(self, coro):
        if self.dead:
            coro.close()
            raise ConnectionError(f"peer {self.name} died")
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def confirm(self, request_id: str) -> None:
        await self._call(self.handoff.sender.release(request_id, "confirmed"))

    async def serve(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        await self._call(self.handoff.sender.serve(receiver, block_ids, key, timeout_s))

    async def alive(self) -> bool:
        return not self.dead

    async def stage(self, stage: MigrationStage) -> StageResult:
        return await self._call(self.handoff.receiver.stage(stage, self.me))

    async def finish_migration(self, final: MigrationFinal) -> StageResult:
        return await self._call(self.handoff.receiver.finish_migration(final, self.me))

    async def drop_migration(self, migration_id: str) -> None:
        await self._call(self.handoff.receiver.drop(migration_id))

    async def abort(self, request_ids: list[str]) -> None:
        await self._call(self.handoff.abort(request_ids))


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("call from a peer failed: %r", task.exception())


def fire(coro) -> None:
    """Run a call to a peer without waiting for it; a dead peer's error is logged, not raised."""

    asyncio.ensure_future(coro).add_done_callback(_retrieve)
