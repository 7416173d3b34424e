"""The controller's migrations: operators' moves, targets for workers out of KV blocks, the rebalancer
loop and draining by migration. Decisions come from `planner` (pure); every outcome lands in metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve.config import ServeConfig, decode_capable
from pdserve.controller.planner import KVLoad, pick_target, plan_rebalance
from pdserve.controller.registry import Registry
from pdserve.protocol import MigrationRecord

log = logging.getLogger(__name__)


class Migrations:
    def __init__(self, config: ServeConfig, registry: Registry, metrics) -> None:
        self.config, self.registry, self.metrics = config, registry, metrics
        self.call_timeout_s = config.controller.call_timeout_s
        self.block_size = config.engine.block_size
        self._busy: dict[str, float] = {}  # worker id -> when a migration it took part in ended (or 0 running)
        self.history: list[MigrationRecord] = []  # the latest records (status, tests)

    # ---- loads ---------------------------------------------------------------------------------------
    def loads(self, exclude: str | None = None) -> list[KVLoad]:
        out = []
        for rec in self.registry.workers.values():
            s = rec.stats
            if rec.state != "ready" or not decode_capable(rec.role) or s is None or rec.worker_id == exclude:
                continue
            queued = -(-s.num_prefill_tokens_queued // self.block_size)
            out.append(KVLoad(rec.worker_id, s.num_free_blocks, s.num_running, queued))
        return out

    def target_for(self, source: str, blocks: int):
        """(worker id, handle) of where a request of `blocks` blocks from `source` should go, or None."""
        target = pick_target(self.loads(exclude=source), source, blocks)
        return None if target is None else (target, self.registry.workers[target].handle)

    # ---- one migration -----------------------------------------------------------------------------------
    async def migrate(self, request_id: str, source: str, target: str | None, reason: str) -> MigrationRecord:
        src = self.registry.workers[source]
        if target is None:
            migratable = await asyncio.wait_for(src.handle.migratable.remote(), self.call_timeout_s)
            blocks = dict(migratable).get(request_id, 0)
            found = self.target_for(source, blocks)
            if found is None:
                rec = MigrationRecord(request_id=request_id, source=source, target="", reason=reason, outcome="refused")
                rec.error = "no other decode-capable worker has room"
                self.record(rec)
                return rec
            target = found[0]
        dst = self.registry.workers.get(target)
        if dst is None or dst.state != "ready" or not decode_capable(dst.role) or target == source:
            raise ValueError(f"target_worker {target!r} is not another ready decode-capable worker")
        self._busy[source] = self._busy[target] = float("inf")
        try:
            rec = await src.handle.migrate.remote(request_id, target, dst.handle, reason)
        finally:
            self._busy[source] = self._busy[target] = time.monotonic()
        self.record(rec)
        return rec

    def record(self, rec: MigrationRecord) -> None:
        self.history = [*self.history[-199:], rec]
        m = self.metrics
        m.migrations.labels(rec.reason, rec.outcome).inc()
        if rec.outcome == "migrated":
            m.migration_stages.observe(len(rec.blocks_per_stage))
            m.migration_bytes.inc(rec.num_bytes)
            m.migration_pause.observe(rec.pause_s)
            m.migration_seconds.observe(rec.total_s)

    async def operator(self, request_id: str, target: str | None) -> list[MigrationRecord]:
        """Move every engine request of the API request `request_id` (its choices) to `target` or the best."""
        found = []
        for rec in list(self.registry.workers.values()):
            if rec.state in ("ready", "draining") and decode_capable(rec.role):
                try:
                    rids = await asyncio.wait_for(rec.handle.find.remote(request_id), self.call_timeout_s)
                except Exception:  # a dead worker holds nothing we can move
                    continue
                found += [(rid, rec.worker_id) for rid in rids]
        if not found:
            raise KeyError(f"request_id {request_id!r} is not running on any decode-capable worker")
        return list(await asyncio.gather(*(self.migrate(rid, src, target, "operator") for rid, src in found)))

    # ---- the rebalancer ---------------------------------------------------------------------------------
    async def rebalance_once(self) -> MigrationRecord | None:
        settle = 3 * self.config.worker.report_interval_s  # loads must show the last move before the next
        now = time.monotonic()
        loads = [w for w in self.loads() if now - self._busy.get(w.worker_id, 0.0) > settle]
        if len(loads) < 2:
            return None
        worst = min(loads, key=KVLoad.freeness)
        if max(w.freeness() for w in loads) - worst.freeness() <= self.config.migration.rebalance_threshold:
            return None
        handle = self.registry.workers[worst.worker_id].handle
        candidates = {worst.worker_id: await asyncio.wait_for(handle.migratable.remote(), self.call_timeout_s)}
        move = plan_rebalance(loads, candidates, self.config.migration.rebalance_threshold)
        if move is None:
            return None
        rid, source, target = move
        return await self.migrate(rid, source, target, "rebalance")

    async def rebalancer(self) -> None:
        while True:
            await asyncio.sleep(self.config.migration.rebalance_interval_s)
            try:
                await self.rebalance_once()
            except Exception as e:  # a worker died mid-call: the next pass sees the new membership
                log.warning("rebalancing pass failed: %r", e)

    # ---- draining --------------------------------------------------------------------------------------
    async def drain(self, worker_id: str, deadline: float) -> None:
        """Move a draining worker's running requests to the others, a few at a time, until none is left
        or none can move (the rest then finish where they are)."""
        handle = self.registry.workers[worker_id].handle
        while time.monotonic() < deadline:
            try:
                candidates = await asyncio.wait_for(handle.migratable.remote(), self.call_timeout_s)
            except Exception:
                return
            if not candidates:
                return
            moves = []
            for rid, blocks in candidates[:8]:
                found = self.target_for(worker_id, blocks)
                if found is not None:
                    moves.append(self.migrate(rid, worker_id, found[0], "drain"))
            if not moves:
                return
            done = await asyncio.gather(*moves, return_exceptions=True)
            if not any(isinstance(r, MigrationRecord) and r.outcome == "migrated" for r in done):
                await asyncio.sleep(0.2)  # nothing moved this round (targets busy or full): let loads update
