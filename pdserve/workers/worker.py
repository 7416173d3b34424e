"""A worker: one engine on its thread, one KV transport and the handoff (sender, receiver, migration driver)
behind async methods; this module is the wiring between them.

Wrapped as Ray actors in `actors.py` (PrefillWorker, DecodeWorker, ColocatedWorker). Tokens leave a worker in
batches: `poll_outputs` returns everything produced since the last call (one call per step at most).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.config import ROLES, EngineConfig, KVConfig, MigrationConfig, WorkerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine_client import WorkerDraining, WorkerFailed
from pdserve.handoff import Handoff
from pdserve.protocol import (
    DecodeStarted,
    EngineRequest,
    KVHandoff,
    KVLayout,
    MigrationFinal,
    MigrationStage,
    PeerInfo,
    PrefillResult,
    Refused,
    StageResult,
    TokenDelta,
    WorkerStats,
)
from pdserve.workers.engine_thread import EngineThread
from pdserve.workers.migration import Migrations
from pdserve.workers.outbox import Outboxes
from pdserve.workers.ray_peer import RayPeer
from pdserve.workers.reports import report_loop

log = logging.getLogger(__name__)


class Worker:
    """`on_fatal` runs once, on the asyncio loop, after the engine broke and every waiter was failed; the
    actor passes a function that ends its process, so the failure is a death everyone can see."""

    def __init__(
        self,
        worker_id: str,
        role: str,
        config: EngineConfig,
        options: WorkerConfig,
        transport: KVConfig | str = "nixl",
        on_fatal: Callable[[BaseException], None] | None = None,
        migration: MigrationConfig | None = None,
        max_waiting: int | None = None,
    ) -> None:
        """`max_waiting`: requests admitted past `config.max_num_seqs` before this worker refuses more
        (`routing.max_waiting_per_worker`; None: no bound)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if options.torch_threads:
            import torch

            torch.set_num_threads(options.torch_threads)
        self.worker_id, self.role, self.options = worker_id, role, options
        self.migration = migration or MigrationConfig()
        self._on_fatal = on_fatal
        self.engine = LLMEngine(config)
        self.engine.max_waiting = max_waiting
        self.engine.scheduler.park_on_pressure = self.migration.on_out_of_blocks and role != "prefill"
        self.layout = _layout(self.engine)
        from pdserve.kv.transport import make_transport, transport_options

        kv = transport if isinstance(transport, KVConfig) else KVConfig(transport=transport)  # a kind: its defaults
        options_ = transport_options(kv)
        self.transport = make_transport(kv.transport, worker_id, self.engine.kv_cache, self.layout, **options_)
        self._loop = asyncio.get_running_loop()
        self.outboxes = Outboxes()
        self.engine_thread = EngineThread(
            self.engine, self._on_outputs, name=f"engine-{worker_id}", on_error=self._on_engine_error
        )
        self.handoff = Handoff(worker_id, self.engine_thread, self.transport, options, self.outboxes, self.migration)
        self.migrations = Migrations(self)
        self.self_handle = None  # this worker's actor handle: a migration target calls back through it
        self._prefills: dict[str, asyncio.Future] = {}  # prefills here whose result the caller awaits
        self._draining = False
        self._closed = False
        self._controller = None
        self._closed_event = asyncio.Event()
        self._first_pending: set[str] = set()  # requests prefilled here whose first token has not come out
        self.prefix_prompt_tokens_total = 0
        self.prefix_hit_tokens_total = 0
        self.num_requests_total = 0
        self.num_refused_total = 0
        self.started_at = time.time()
        self._tasks = [asyncio.ensure_future(self._housekeeping())]

    # ---- lifecycle ----------------------------------------------------------------------------------
    def peer_info(self) -> PeerInfo:
        return self.transport.peer_info()

    def add_peers(self, infos: list[PeerInfo]) -> None:
        for info in infos:
            if info.name != self.worker_id:
                self.transport.add_peer(info)

    def info(self):
        import os

        import ray

        from pdserve.protocol import WorkerInfo

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, node_id=node, pid=os.getpid(),
            started_at=self.started_at, peer=self.peer_info(),
        )  # fmt: skip

    def set_controller(self, handle, self_handle=None) -> None:
        """Start pushing load reports (the heartbeat) to the controller; idempotent."""
        first = self._controller is None
        self._controller = handle
        if self_handle is not None:
            self.self_handle = self_handle
        if first:
            self._tasks.append(asyncio.ensure_future(report_loop(self)))

    async def wait_closed(self) -> None:
        """Returns when the worker shuts down (a death is seen by the caller as an actor error)."""
        await self._closed_event.wait()

    async def health(self) -> bool:
        if not self.engine_thread.alive:
            raise RuntimeError(f"worker {self.worker_id}: engine thread failed: {self.engine_thread.error!r}")
        await self.engine_thread.call(lambda e: None)
        return True

    async def stats(self) -> WorkerStats:
        return self.wrap_stats(await self.engine_thread.call(lambda e: e.stats()))

    def wrap_stats(self, raw: dict) -> WorkerStats:
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, time=time.time(), alive=self.engine_thread.alive,
            draining=self._draining, prefix_prompt_tokens_total=self.prefix_prompt_tokens_total,
            prefix_hit_tokens_total=self.prefix_hit_tokens_total, num_requests_total=self.num_requests_total,
            num_refused_total=self.num_refused_total, **raw,
        )  # fmt: skip

    async def leak_report(self) -> str | None:
        """None when every KV block is free or cached-and-unreferenced; otherwise what is still held."""

        staging = self.handoff.receiver.describe()

        def check(engine: LLMEngine) -> str | None:
            try:
                engine.blocks.check_no_leak()
            except AssertionError as e:
                return f"{e}; live requests: {list(engine.requests)[:8]}; migrations staged here: {staging}"
            return None

        return await self.engine_thread.call(check)

    async def drain(self) -> None:
        """Refuse new requests and wait until everything admitted here has finished or been handed off."""
        self._draining = True
        while True:
            s = await self.stats()
            if not (s.num_running or s.num_waiting or s.num_held or s.num_importing or self.handoff.busy):
                return
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        """Idempotent: stop the engine, fail waiters, free the transport."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        for t in self._tasks:
            t.cancel()
        self.engine_thread.stop()
        for fut in self._prefills.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"worker {self.worker_id} shut down"))
        self.transport.close()

    def _on_engine_error(self, error: BaseException) -> None:
        """Engine thread: the engine is broken (the thread logged the traceback); stop serving on the asyncio loop."""
        self._loop.call_soon_threadsafe(self._fail, error)

    def _fail(self, error: BaseException) -> None:
        self._closed = True
        failure = WorkerFailed(f"worker {self.worker_id}: the engine failed: {type(error).__name__}: {error}")
        for fut in self._prefills.values():
            if not fut.done():
                fut.set_exception(failure)
        if self._on_fatal is not None:
            self._on_fatal(error)

    def inject_fault(self, kind: str) -> None:
        """For failure tests and chaos runs: `engine_step` makes the engine's next step raise;
        `stall_migration` makes every migration stage arriving here wait 3 s before it copies;
        `fail_transfer` makes the next KV pull into this worker (a P->D handoff or a migration) fail."""
        if kind == "stall_migration":
            self.handoff.receiver.stall_s = 3.0
            return
        if kind == "fail_transfer":
            self.handoff.receiver.fail_pulls += 1
            return
        if kind != "engine_step":
            raise ValueError(f"unknown fault kind {kind!r}; known: ['engine_step', 'stall_migration', 'fail_transfer']")

        def broken_step():
            raise RuntimeError("injected fault: engine step failed")

        self.engine_thread.submit(lambda e: setattr(e, "step", broken_step))

    # ---- outputs ------------------------------------------------------------------------------------
    def _on_outputs(self, deltas: list[TokenDelta]) -> None:
        """Engine thread, once per step: export finished prefills, queue the rest for poll_outputs."""
        handoffs = {}
        for d in deltas:
            if d.request_id in self._prefills and d.held:
                handoffs[d.request_id] = self.engine.handoff.export_request(d.request_id)
        parked, self.engine.parked_ids = self.engine.parked_ids, []
        self._loop.call_soon_threadsafe(self._deliver, deltas, handoffs, parked)

    def _deliver(self, deltas: list[TokenDelta], handoffs: dict, parked: list[str]) -> None:
        out = []
        for d in deltas:
            if d.request_id in self._first_pending and (d.new_token_ids or d.finished):
                self._first_pending.discard(d.request_id)
                self.prefix_prompt_tokens_total += d.num_prompt_tokens
                self.prefix_hit_tokens_total += d.num_cached_tokens
            self.migrations.on_delta(d)
            fut = self._prefills.pop(d.request_id, None)
            if fut is None:
                out.append(d)
                continue
            if fut.done():  # the caller left: its prefill() frees what is held
                continue
            handoff, (record, blocks) = None, handoffs.get(d.request_id, (None, []))
            deadline = self.handoff.sender.held(d.request_id, blocks) if record is not None else None
            if deadline is not None:  # the lease runs from the prefill's end
                handoff = KVHandoff(
                    request=record, prefill_worker=self.worker_id, block_ids=blocks, lease_deadline=deadline,
                    num_bytes=len(blocks) * self.layout.block_bytes,
                )  # fmt: skip
            fut.set_result(
                PrefillResult(delta=d, handoff=handoff, queue_s=d.queue_s or 0.0, prefill_s=d.prefill_s or 0.0)
            )
        if out:
            self.outboxes.put(out)
        for rid in parked:
            asyncio.ensure_future(self.migrations.migrate_parked(rid))

    async def poll_outputs(self, timeout_s: float = 1.0, consumer: str = "") -> list[TokenDelta]:
        """Everything produced for `consumer` (a frontend) since its last call; waits up to timeout_s."""
        return await self.outboxes.poll(consumer, timeout_s)

    # ---- requests -----------------------------------------------------------------------------------
    def _admit_check(self) -> None:
        if self.engine_thread.error is not None:
            raise WorkerFailed(f"worker {self.worker_id}: the engine failed: {self.engine_thread.error!r}")
        if self._draining or self._closed:
            raise WorkerDraining(f"worker {self.worker_id} is draining and takes no new requests")

    def _refused(self, num_admitted: int) -> Refused:
        self.num_refused_total += 1
        return Refused(
            worker_id=self.worker_id, reason="full", num_admitted=num_admitted, limit=self.engine.admission_limit or 0
        )

    async def _add(self, req: EngineRequest, role: str) -> int | None:
        """Add `req` to the engine if it has room, in one engine command; else how many it has admitted."""

        def add(e: LLMEngine) -> int | None:
            if not e.has_room(req.request_id):
                return e.num_admitted()
            e.add_request(req.request_id, req.prompt_token_ids, req.params, role, req.cache_salt)
            return None

        return await self.engine_thread.call(add)

    async def generate(self, req: EngineRequest) -> Refused | None:
        """Colocated/decode role: prefill and decode here; tokens come out through poll_outputs. A `Refused`
        answer (at the admission bound) means nothing was started: route it elsewhere."""
        self._admit_check()
        self.outboxes.register(req.request_id, req.reply_to)
        self._first_pending.add(req.request_id)
        try:
            full = await self._add(req, "colocated")
        except BaseException:
            self._first_pending.discard(req.request_id)
            self.outboxes.forget(req.request_id)
            raise
        if full is not None:
            self._first_pending.discard(req.request_id)
            self.outboxes.forget(req.request_id)
            return self._refused(full)
        self.num_requests_total += 1
        return None

    async def reserve(self, req: EngineRequest) -> Refused | None:
        """Decode role, before the request's prefill elsewhere: count it as admitted here, so the KV handoff
        that follows (`decode`) finds room. Refused: nothing is reserved. An abort gives the slot back, and
        so does the consumer timeout of a frontend that never follows up."""
        self._admit_check()
        self.outboxes.register(req.request_id, req.reply_to)
        full = await self.engine_thread.call(lambda e: None if e.reserve_slot(req.request_id) else e.num_admitted())
        if full is not None:
            self.outboxes.forget(req.request_id)
            return self._refused(full)
        return None

    async def prefill(self, req: EngineRequest, decode_worker: str = "", decode_handle=None) -> PrefillResult | Refused:
        """Compute the prompt and the first token; hold the blocks under a lease for `decode_worker`. A
        `Refused` answer (at the admission bound) means nothing was started."""
        self._admit_check()
        fut = self._loop.create_future()
        rid, sender = req.request_id, self.handoff.sender
        self._prefills[rid] = fut
        sender.open(rid, self.peer(decode_handle, decode_worker) if decode_handle is not None else None)
        self._first_pending.add(rid)
        try:
            full = await self._add(req, "prefill")
            if full is not None:
                self._prefills.pop(rid, None)
                sender.unclaimed(rid)
                self._first_pending.discard(rid)
                return self._refused(full)
            self.num_requests_total += 1
            result = await asyncio.shield(fut)
        except BaseException:  # aborted, or the caller left: nobody will see a handoff
            self._prefills.pop(rid, None)
            sender.unclaimed(rid)
            self._first_pending.discard(rid)
            await self.engine_thread.call(lambda e: e.abort(rid))
            raise
        if result.handoff is None:
            sender.unclaimed(rid)
        return result

    def peer(self, handle, name: str) -> RayPeer:
        """Another worker, as this worker's handoff calls it."""
        return RayPeer(handle, name, self.self_handle, self.options.liveness_interval_s * 4)

    async def confirm(self, request_id: str) -> bool:
        """The receiver has pulled the KV (or gave up): release the held blocks now."""
        return await self.handoff.sender.release(request_id, "confirmed")

    async def serve_kv(self, receiver: str, block_ids: list[int], key: int, timeout_s: float) -> None:
        """The sender's step of a two-sided transport, for blocks held for `receiver`."""
        await self.handoff.sender.serve(receiver, block_ids, key, timeout_s)

    async def decode(self, handoff: KVHandoff, prefill_handle=None, reply_to: str = "") -> DecodeStarted | Refused:
        """Reserve blocks, pull the KV from the prefill worker, confirm so it frees them, continue decoding;
        tokens go to `reply_to`'s outbox. Takes over the slot `reserve` kept; without one (aborted, or never
        reserved) and at the bound it is `Refused`, and the prefill worker may free its blocks."""
        self._admit_check()
        self.outboxes.register(handoff.request.request_id, reply_to)
        sender = self.peer(prefill_handle, handoff.prefill_worker) if prefill_handle is not None else None
        try:
            started = await self.handoff.receiver.import_handoff(handoff, sender)
        except BaseException:
            self.outboxes.forget(handoff.request.request_id)
            raise
        if isinstance(started, int):
            self.outboxes.forget(handoff.request.request_id)
            return self._refused(started)
        self.num_requests_total += 1
        return started

    async def ping(self) -> bool:
        return True

    # ---- live migration (worker.migrations) ---------------------------------------------------------
    def find(self, request_id: str) -> list[str]:
        """Engine request ids here that belong to the API request `request_id` (its choices, retries)."""
        n = len(request_id) + 1
        return [
            rid for rid in self.engine.requests
            if rid == request_id or (rid[:n] == request_id + "-" and rid[n:].split(".")[0].isdigit())
        ]  # fmt: skip

    async def migratable(self) -> list[tuple[str, int]]:
        return await self.migrations.migratable()

    async def migrate(self, request_id: str, target: str, target_handle, reason: str, mode: str = "multi_stage"):
        return await self.migrations.migrate(request_id, target, target_handle, reason, mode)

    async def migrate_stage(self, stage: MigrationStage, source_handle) -> StageResult:
        return await self.migrations.stage(stage, source_handle)

    async def migrate_finish(self, final: MigrationFinal, source_handle) -> StageResult:
        return await self.migrations.finish(final, source_handle)

    async def migrate_drop(self, migration_id: str) -> None:
        await self.migrations.drop(migration_id)

    async def abort(self, request_ids: list[str]) -> None:
        """Cancel requests in any state here (or where they migrated to); the handoff frees blocks a
        transfer is still reading or writing once it ends (see `Handoff.abort`)."""
        for rid in request_ids:
            fut = self._prefills.pop(rid, None)
            if fut is not None and not fut.done():
                fut.cancel()
            self._first_pending.discard(rid)
            self.outboxes.forget(rid)
        await self.handoff.abort(request_ids)

    # ---- background -------------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Free expired leases (and those of receivers Ray reports dead); abort the requests of frontends
        that stopped polling."""
        last_check = 0.0
        while True:
            await asyncio.sleep(0.05)
            for consumer, rids in self.outboxes.stale(self.options.consumer_timeout_s).items():
                if rids:
                    log.warning("frontend %s stopped polling; aborting its %d requests", consumer, len(rids))
                    asyncio.ensure_future(self.abort(rids))
            now = time.time()
            check = now - last_check > self.options.liveness_interval_s
            if check:
                last_check = now
            await self.handoff.check(now, check)


def _layout(engine: LLMEngine) -> KVLayout:
    kv = engine.kv_cache
    num_blocks, num_layers, _, block_size, heads, head_dim = kv.shape
    return KVLayout(
        model_id=engine.model_id,
        device_type=kv.device.type,
        dtype=str(kv.dtype).removeprefix("torch."),
        block_size=block_size,
        num_layers=num_layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        num_blocks=num_blocks,
        block_bytes=kv[0].numel() * kv.element_size(),
    )
