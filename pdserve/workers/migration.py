"""A worker's side of live migration, held by the Worker as `worker.migrations`: as source (migrate, and the
out-of-blocks moves asked of the controller) and as target (stages, the final stage and its first token,
drop). The protocol itself is `pdserve.handoff`'s."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pdserve.protocol import MigrationFinal, MigrationRecord, MigrationStage, StageResult, TokenDelta

if TYPE_CHECKING:
    from pdserve.workers.worker import Worker

log = logging.getLogger(__name__)


class Migrations:
    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self._first_token: dict[str, asyncio.Future] = {}  # migrated in: waiting for the resumed first token

    def on_delta(self, delta: TokenDelta) -> None:
        """Every delta of this worker, on the asyncio loop: a migrated-in request's first one resolves its wait."""
        waiter = self._first_token.pop(delta.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(time.time())

    async def migratable(self) -> list[tuple[str, int]]:
        return await self.w.engine_thread.call(lambda e: e.handoff.migratable())

    async def migrate(
        self, request_id: str, target: str, target_handle, reason: str, mode: str = "multi_stage"
    ) -> MigrationRecord:
        """Move a running request to `target` (source side); the record says how it went."""
        return await self.w.handoff.migrator.migrate(request_id, self.w.peer(target_handle, target), reason, mode)

    async def stage(self, stage: MigrationStage, source_handle) -> StageResult:
        self.w._admit_check()
        return await self.w.handoff.receiver.stage(stage, self.w.peer(source_handle, stage.source))

    async def finish(self, final: MigrationFinal, source_handle) -> StageResult:
        """Target side of the final stage: take the request over and resume it here."""
        w = self.w
        w._admit_check()
        rid = final.request.request_id
        w.outboxes.register(rid, final.reply_to)
        waiter = self._first_token[rid] = asyncio.get_running_loop().create_future()
        try:
            result = await w.handoff.receiver.finish_migration(final, w.peer(source_handle, final.source))
        except BaseException:
            self._first_token.pop(rid, None)
            w.outboxes.forget(rid)
            raise
        w.num_requests_total += 1
        try:
            m = w.migration
            wait = max(m.first_token_wait_s, m.stage_timeout_s / 2)  # a recompute takes a prefill
            result.first_token_at = await asyncio.wait_for(asyncio.shield(waiter), wait)
        except asyncio.TimeoutError:
            self._first_token.pop(rid, None)
        return result

    async def drop(self, migration_id: str) -> None:
        await self.w.handoff.receiver.drop(migration_id)

    async def migrate_parked(self, rid: str) -> None:
        """Out of blocks, the engine parked `rid` instead of preempting it: move it where there is room,
        or let the engine preempt it after all."""
        w, record = self.w, None
        try:
            target = None
            if w._controller is not None:
                blocks = dict(await self.migratable()).get(rid, 0)
                target = await asyncio.wait_for(w._controller.migration_target.remote(w.worker_id, blocks), 5.0)
            if target is not None:
                record = await self.migrate(rid, target[0], target[1], "out_of_blocks")
                await asyncio.wait_for(w._controller.record_migration.remote(record), 5.0)
        except Exception as e:
            log.warning("could not migrate parked request %s: %r", rid, e)
        finally:
            if record is None or record.outcome != "migrated":
                await w.engine_thread.call(lambda e: e.handoff.unpark(rid))
