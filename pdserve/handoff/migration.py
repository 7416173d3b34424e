"""Live migration, source side (Llumnix's multi-stage copy): stages copy the request's full blocks while it
keeps decoding here; when at most `final_blocks` remain, the request is paused, the rest and its state
(sampling RNG included) go to the target, which resumes it; our blocks are freed once it confirms. Any
failure before that confirmation leaves the request running here, as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import msgspec

from pdserve.config import MigrationConfig
from pdserve.handoff.sender import Sender, _release_held
from pdserve.protocol import MigrationFinal, MigrationRecord, MigrationStage, TokenDelta

log = logging.getLogger(__name__)

MODES = ("multi_stage", "stop_and_copy", "recompute")


class Migrator:
    def __init__(self, worker_id: str, loop, sender: Sender, outboxes, config: MigrationConfig) -> None:
        self.worker_id, self.loop, self.sender, self.outboxes, self.config = worker_id, loop, sender, outboxes, config
        self.self_handle = None  # this worker's actor handle (the target asks it for two-sided transfers)
        self._active: set[str] = set()
        self._finalizing: set[str] = set()
        self._abort_after: set[str] = set()

    def defer_abort(self, request_ids: list[str]) -> list[str]:
        """Those safe to abort now; a request in its final stage is aborted once the stage ends."""
        now = []
        for rid in request_ids:
            (self._abort_after.add if rid in self._finalizing else now.append)(rid)
        return now

    async def migrate(
        self, request_id: str, target: str, target_handle, reason: str, mode: str = "multi_stage"
    ) -> MigrationRecord:
        """`mode`: multi_stage (live stages, then a short pause), stop_and_copy (pause, copy everything) or
        recompute (pause, send no KV: the target recomputes it; what peers do, kept for comparison)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rec = MigrationRecord(
            request_id=request_id, source=self.worker_id, target=target, reason=reason, outcome="failed"
        )
        if request_id in self._active:
            rec.outcome, rec.error = "refused", "already migrating"
            return rec
        mid = f"{self.worker_id}:{request_id}:{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        self._active.add(request_id)
        try:
            sent = await self._stages(mid, request_id, target_handle, rec) if mode == "multi_stage" else 0
            if sent is not None:
                await self._final(mid, request_id, target, target_handle, sent, rec, mode == "recompute")
        except Exception as e:  # the target refused or died, or a transfer failed: carry on here
            rec.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log.warning("migration of %s to %s failed: %s", request_id, target, rec.error)
        finally:
            self._active.discard(request_id)
            self.sender.end_migration(mid)
            if rec.outcome != "migrated":
                target_handle.migrate_drop.remote(mid)  # its staged blocks, if any
                await self.loop.call(lambda e: e.unpark(request_id))
        rec.total_s = time.perf_counter() - start
        rec.num_bytes = sum(rec.blocks_per_stage) * self.sender.transport.layout.block_bytes
        return rec

    async def _stages(self, mid: str, rid: str, target_handle, rec: MigrationRecord) -> int | None:
        """Copy full blocks while the request runs; the number staged, or None when it ended here."""
        sent = 0
        while len(rec.blocks_per_stage) < self.config.max_stages:
            view = await self.sender.pin(mid, rid, sent)
            if view is None:
                rec.outcome = "finished" if await self.loop.call(lambda e: rid not in e.requests) else "failed"
                rec.error = rec.error or ("" if rec.outcome == "finished" else "preempted or not running here")
                return None
            ids, tokens, num_kv_blocks, cache_salt = view
            try:
                if num_kv_blocks - sent <= self.config.final_blocks or not ids:
                    return sent
                stage = MigrationStage(
                    migration_id=mid, request_id=rid, source=self.worker_id, start=sent, token_ids=tokens,
                    src_block_ids=ids, cache_salt=cache_salt,
                )  # fmt: skip
                result = await asyncio.wait_for(
                    target_handle.migrate_stage.remote(stage, self.self_handle), self.config.stage_timeout_s
                )
            finally:
                await self.sender.unpin(mid, ids)
            rec.blocks_per_stage.append(result.num_copied)
            rec.num_reused += result.num_reused
            sent += len(ids)
        return sent

    async def _final(
        self, mid: str, rid: str, target: str, target_handle, sent: int, rec: MigrationRecord, recompute: bool
    ) -> None:
        self._finalizing.add(rid)
        try:
            try:
                record, blocks = await self.loop.call(lambda e: e.export_request(rid))
            except (KeyError, ValueError):
                rec.outcome = "finished"
                return
            paused_at = time.time()
            if recompute:
                record, blocks = msgspec.structs.replace(record, num_computed_tokens=0), []
            self.sender.allow(mid, blocks[sent:])
            final = MigrationFinal(
                migration_id=mid, request=record, source=self.worker_id, start=sent, src_block_ids=blocks[sent:],
                reply_to=self.outboxes.consumer_of(rid), paused_at=paused_at,
            )  # fmt: skip
            try:
                result = await asyncio.wait_for(
                    target_handle.migrate_finish.remote(final, self.self_handle), self.config.stage_timeout_s
                )
            except BaseException:
                target_handle.abort.remote([rid])  # whatever it got, it must not run it too
                if await self.loop.call(lambda e: e.resume(rid)):
                    log.info("%s carries on at %s", rid, self.worker_id)
                raise
            rec.outcome = "migrated"
            rec.blocks_per_stage.append(result.num_copied)
            rec.num_reused += result.num_reused
            if result.first_token_at:
                rec.pause_s = max(0.0, result.first_token_at - paused_at)
            # the stream's next tokens come from the target: say so, after every token sent from here
            marker = TokenDelta(
                request_id=rid, new_token_ids=[], text="", index=len(record.output_token_ids), moved_to=target
            )
            self.outboxes.put([marker])
            self.outboxes.forget(rid)
            self.sender.moved(rid, target_handle)
            await self.loop.call(lambda e: _release_held(e, rid))
        finally:
            self._finalizing.discard(rid)
            aborted = rid in self._abort_after
            self._abort_after.discard(rid)
            if aborted:
                rec.outcome = "aborted" if rec.outcome != "migrated" else rec.outcome
                if rec.outcome == "migrated":
                    target_handle.abort.remote([rid])
                else:
                    await self.loop.call(lambda e: e.abort(rid))
