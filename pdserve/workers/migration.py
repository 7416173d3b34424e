"""A worker's side of live migration, as source (find, migratable, migrate; out-of-blocks moves asked of
the controller) and as target (stages, the final stage, drop). Mixed into `Worker`; the protocol itself
lives in `pdserve.handoff`."""

from __future__ import annotations

import asyncio
import logging

from pdserve.protocol import MigrationFinal, MigrationRecord, MigrationStage, StageResult

log = logging.getLogger(__name__)


class MigrationMixin:
    """Needs the Worker's engine, loop, outboxes, receiver, migrator, migration config and _controller."""

    def find(self, request_id: str) -> list[str]:
        """Engine request ids here that belong to the API request `request_id` (its choices, retries)."""
        n = len(request_id) + 1
        return [
            rid for rid in self.engine.requests
            if rid == request_id or (rid[:n] == request_id + "-" and rid[n:].split(".")[0].isdigit())
        ]  # fmt: skip

    async def migratable(self) -> list[tuple[str, int]]:
        return await self.loop.call(lambda e: e.migratable())

    async def migrate(
        self, request_id: str, target: str, target_handle, reason: str, mode: str = "multi_stage"
    ) -> MigrationRecord:
        """Move a running request to `target` (source side); the record says how it went."""
        return await self.migrator.migrate(request_id, target, target_handle, reason, mode)

    async def migrate_stage(self, stage: MigrationStage, source_handle) -> StageResult:
        self._admit_check()
        return await self.receiver.stage(stage, source_handle)

    async def migrate_finish(self, final: MigrationFinal, source_handle) -> StageResult:
        """Target side of the final stage: take the request over and resume it here."""
        self._admit_check()
        rid = final.request.request_id
        self.outboxes.register(rid, final.reply_to)
        waiter = self._first_token[rid] = self._aio.create_future()
        try:
            result = await self.receiver.finish_migration(final, source_handle)
        except BaseException:
            self._first_token.pop(rid, None)
            self.outboxes.forget(rid)
            raise
        self.num_requests_total += 1
        try:
            m = self.migration
            wait = max(m.first_token_wait_s, m.stage_timeout_s / 2)  # a recompute takes a prefill
            result.first_token_at = await asyncio.wait_for(asyncio.shield(waiter), wait)
        except asyncio.TimeoutError:
            self._first_token.pop(rid, None)
        return result

    async def migrate_drop(self, migration_id: str) -> None:
        await self.receiver.drop(migration_id)

    async def _migrate_parked(self, rid: str) -> None:
        """Out of blocks, the engine parked `rid` instead of preempting it: move it where there is room,
        or let the engine preempt it after all."""
        record = None
        try:
            target = None
            if self._controller is not None:
                blocks = dict(await self.migratable()).get(rid, 0)
                target = await asyncio.wait_for(self._controller.migration_target.remote(self.worker_id, blocks), 5.0)
            if target is not None:
                record = await self.migrator.migrate(rid, target[0], target[1], "out_of_blocks")
                await asyncio.wait_for(self._controller.record_migration.remote(record), 5.0)
        except Exception as e:
            log.warning("could not migrate parked request %s: %r", rid, e)
        finally:
            if record is None or record.outcome != "migrated":
                await self.loop.call(lambda e: e.unpark(rid))
