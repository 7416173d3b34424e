"""Live migration, source side (Llumnix's multi-stage copy): stages copy the request's full blocks while it
keeps decoding here; when at most `final_blocks` remain, the request is paused, the rest and its state
(sampling RNG included) go to the target, which resumes it; our blocks are released once it confirms. Any
failure before that confirmation leaves the request running here, as if nothing had happened. The blocks
and the abort of a migration are its Sender lease's (see sender.py's table); this module only drives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import msgspec

from pdserve.config import MigrationConfig
from pdserve.handoff.peer import Engine, Peer, fire
from pdserve.handoff.sender import Sender
from pdserve.protocol import MigrationFinal, MigrationRecord, MigrationStage, TokenDelta

log = logging.getLogger(__name__)

MODES = ("multi_stage", "stop_and_copy", "recompute")


class Migrator:
    """`outboxes`: the worker's token outboxes (`consumer_of`, `put`, `forget`): the moved-to marker goes
    there, after every token sent from here."""

    def __init__(self, worker_id: str, engine: Engine, sender: Sender, outboxes, config: MigrationConfig) -> None:
        self.worker_id, self.engine, self.sender, self.outboxes, self.config = (
            worker_id,
            engine,
            sender,
            outboxes,
            config,
        )

    async def migrate(self, request_id: str, target: Peer, reason: str, mode: str = "multi_stage") -> MigrationRecord:
        """`mode`: multi_stage (live stages, then a short pause), stop_and_copy (pause, copy everything) or
        recompute (pause, send no KV: the target recomputes it; what peers do, kept for comparison)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rec = MigrationRecord(
            request_id=request_id, source=self.worker_id, target=target.name, reason=reason, outcome="failed"
        )
        mid = f"{self.worker_id}:{request_id}:{uuid.uuid4().hex[:8]}"
        if not self.sender.open_migration(mid, request_id, target):
            rec.outcome, rec.error = "refused", "already migrating"
            return rec
        start = time.perf_counter()
        try:
            sent = await self._stages(mid, request_id, target, rec) if mode == "multi_stage" else 0
            if sent is not None:
                await self._final(mid, request_id, target, sent, rec, mode == "recompute")
        except Exception as e:  # the target refused or died, or a transfer failed: carry on here
            rec.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log.warning("migration of %s to %s failed: %s", request_id, target.name, rec.error)
        finally:
            migrated = rec.outcome == "migrated"
            if not migrated:  # its staged blocks, if any; once the target has stopped pulling, we release
                try:
                    await asyncio.wait_for(target.drop_migration(mid), self.config.stage_timeout_s)
                except Exception as e:  # dead or silent past the deadlines we gave: it reads nothing more
                    log.warning("target %s did not drop migration %s: %r", target.name, mid, e)
            if await self.sender.end_migration(mid, migrated):  # the client left during the final stage
                if migrated:
                    fire(target.abort([request_id]))
                else:
                    rec.outcome = "aborted"
            if not migrated:
                self.engine.submit(lambda e: e.handoff.unpark(request_id))
        rec.total_s = time.perf_counter() - start
        rec.num_bytes = sum(rec.blocks_per_stage) * self.sender.transport.layout.block_bytes
        return rec

    async def _stages(self, mid: str, rid: str, target: Peer, rec: MigrationRecord) -> int | None:
        """Copy full blocks while the request runs; the number staged, or None when it ended here."""
        sent = 0
        while len(rec.blocks_per_stage) < self.config.max_stages:
            view = await self.sender.hold_stage(mid, sent)
            if view is None:
                rec.outcome = "failed" if await self.engine.call(lambda e: e.has_request(rid)) else "finished"
                rec.error = rec.error or ("" if rec.outcome == "finished" else "preempted or not running here")
                return None
            ids, tokens, num_kv_blocks, cache_salt = view
            if num_kv_blocks - sent <= self.config.final_blocks or not ids:
                return sent
            stage = MigrationStage(
                migration_id=mid, request_id=rid, source=self.worker_id, start=sent, token_ids=tokens,
                src_block_ids=ids, cache_salt=cache_salt, deadline=self._deadline(),
            )  # fmt: skip
            result = await asyncio.wait_for(target.stage(stage), self.config.stage_timeout_s)
            rec.blocks_per_stage.append(result.num_copied)
            rec.num_reused += result.num_reused
            sent += len(ids)
        return sent

    async def _final(self, mid: str, rid: str, target: Peer, sent: int, rec: MigrationRecord, recompute: bool):
        self.sender.begin_final(mid)  # before the export: an abort from here waits for the final's end
        try:
            record, blocks = await self.engine.call(lambda e: e.handoff.export_request(rid))
        except (KeyError, ValueError):
            rec.outcome = "finished"
            return
        paused_at = time.time()
        if recompute:
            record, blocks = msgspec.structs.replace(record, num_computed_tokens=0), []
        self.sender.hold_final(mid, blocks[sent:])
        final = MigrationFinal(
            migration_id=mid, request=record, source=self.worker_id, start=sent, src_block_ids=blocks[sent:],
            reply_to=self.outboxes.consumer_of(rid), paused_at=paused_at, deadline=self._deadline(),
        )  # fmt: skip
        try:
            result = await asyncio.wait_for(target.finish_migration(final), self.config.stage_timeout_s)
        except BaseException:
            fire(target.abort([rid]))  # whatever it got, it must not run it too
            raise
        rec.outcome = "migrated"
        rec.blocks_per_stage.append(result.num_copied)
        rec.num_reused += result.num_reused
        if result.first_token_at:
            rec.pause_s = max(0.0, result.first_token_at - paused_at)
        # the stream's next tokens come from the target: say so, after every token sent from here
        marker = TokenDelta(
            request_id=rid, new_token_ids=[], text="", index=len(record.output_token_ids), moved_to=target.name
        )
        self.outboxes.put([marker])
        self.outboxes.forget(rid)
        self.sender.moved(rid, target)

    def _deadline(self) -> float:
        """For the target's pulls: well before our wait for its answer ends (and the lease's blocks go)."""
        return time.time() + 0.8 * self.config.stage_timeout_s
