"""`RayPeer`: the handoff's `Peer` (pdserve.handoff.peer) over another worker's Ray actor handle."""

from __future__ import annotations

import asyncio

from pdserve.protocol import MigrationFinal, MigrationStage, StageResult


class RayPeer:
    """`handle`: the peer's actor (or anything whose methods answer `.remote(...)` with an awaitable, as the
    tests' in-process handles); `me`: this worker's own handle, passed where the peer calls back (a
    migration target pulls from its source). `alive` is False once Ray reports the actor dead or it does
    not answer a ping within `liveness_timeout_s`."""

    def __init__(self, handle, name: str, me=None, liveness_timeout_s: float = 4.0) -> None:
        self.handle, self.name, self.me, self.liveness_timeout_s = handle, name, me, liveness_timeout_s

    async def confirm(self, request_id: str) -> None:
        await self.handle.confirm.remote(request_id)

    async def serve(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        await self.handle.serve_kv.remote(receiver, block_ids, key, timeout_s)

    async def alive(self) -> bool:
        import ray

        try:
            await asyncio.wait_for(self.handle.ping.remote(), self.liveness_timeout_s)
            return True
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            return False

    async def stage(self, stage: MigrationStage) -> StageResult:
        return await self.handle.migrate_stage.remote(stage, self.me)

    async def finish_migration(self, final: MigrationFinal) -> StageResult:
        return await self.handle.migrate_finish.remote(final, self.me)

    async def drop_migration(self, migration_id: str) -> None:
        await self.handle.migrate_drop.remote(migration_id)

    async def abort(self, request_ids: list[str]) -> None:
        await self.handle.abort.remote(request_ids)
