"""A worker: one engine, one KV transport, and the handoff transaction, behind async methods.

Wrapped as Ray actors in `actors.py` (PrefillWorker, DecodeWorker, ColocatedWorker). Tokens leave a worker in
batches: `poll_outputs` returns everything produced since the last call (one call per step at most).
Leases: a prefill worker holds a finished prefill's blocks until the decode worker calls `release`, the
lease deadline passes, the request is aborted, or the decode worker is found dead; then it frees them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.config import ROLES, EngineConfig, WorkerConfig
from pdserve.engine.engine import LLMEngine, OutOfKVBlocks
from pdserve.engine_client import WorkerDraining, WorkerFailed
from pdserve.protocol import (
    DecodeStarted,
    EngineRequest,
    KVEventBatch,
    KVHandoff,
    KVLayout,
    PeerInfo,
    PrefillResult,
    TokenDelta,
    WorkerStats,
)
from pdserve.workers.engine_loop import EngineLoop
from pdserve.workers.outbox import Outboxes

log = logging.getLogger(__name__)


@dataclass
class _Lease:
    deadline: float
    decode_worker: str
    decode_handle: object | None  # a Ray actor handle, pinged while the lease is open


class Worker:
    """`on_fatal` runs once, on the asyncio loop, after the engine broke and every waiter was failed; the
    actor passes a function that ends its process, so the failure is a death everyone can see."""

    def __init__(
        self,
        worker_id: str,
        role: str,
        config: EngineConfig,
        options: WorkerConfig,
        transport: str = "nixl",
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if options.torch_threads:
            import torch

            torch.set_num_threads(options.torch_threads)
        self.worker_id, self.role, self.options = worker_id, role, options
        self._on_fatal = on_fatal
        self.engine = LLMEngine(config)
        self.layout = _layout(self.engine)
        from pdserve.kv.transport import make_transport

        self.transport = make_transport(transport, worker_id, self.engine.kv_cache, self.layout)
        self._aio = asyncio.get_running_loop()
        self.outboxes = Outboxes()
        self._prefills: dict[str, asyncio.Future] = {}
        self._pulling: set[str] = set()  # imports whose blocks a transfer is writing into right now
        self._abort_after_pull: set[str] = set()
        self._leases: dict[str, _Lease] = {}
        self._draining = False
        self._closed = False
        self._controller = None
        self._closed_event = asyncio.Event()
        self._first_pending: set[str] = set()  # requests prefilled here whose first token has not come out
        self.prefix_prompt_tokens_total = 0
        self.prefix_hit_tokens_total = 0
        self.num_requests_total = 0
        self.started_at = time.time()
        self.loop = EngineLoop(
            self.engine, self._on_outputs, name=f"engine-{worker_id}", on_error=self._on_engine_error
        )
        self._tasks = [asyncio.ensure_future(self._lease_keeper())]

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

    def set_controller(self, handle) -> None:
        """Start pushing load reports (the heartbeat) to the controller; idempotent."""
        first = self._controller is None
        self._controller = handle
        if first:
            self._tasks.append(asyncio.ensure_future(self._report_loop()))

    async def wait_closed(self) -> None:
        """Returns when the worker shuts down (a death is seen by the caller as an actor error)."""
        await self._closed_event.wait()

    async def health(self) -> bool:
        if not self.loop.alive:
            raise RuntimeError(f"worker {self.worker_id}: engine loop failed: {self.loop.error!r}")
        await self.loop.call(lambda e: None)
        return True

    async def stats(self) -> WorkerStats:
        return self._stats(await self.loop.call(lambda e: e.stats()))

    def _stats(self, raw: dict) -> WorkerStats:
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, time=time.time(), alive=self.loop.alive,
            draining=self._draining, prefix_prompt_tokens_total=self.prefix_prompt_tokens_total,
            prefix_hit_tokens_total=self.prefix_hit_tokens_total, num_requests_total=self.num_requests_total, **raw,
        )  # fmt: skip

    async def leak_report(self) -> str | None:
        """None when every KV block is free or cached-and-unreferenced; otherwise what is still held."""

        def check(engine: LLMEngine) -> str | None:
            try:
                engine.blocks.check_no_leak()
            except AssertionError as e:
                return f"{e}; live requests: {list(engine.requests)[:8]}"
            return None

        return await self.loop.call(check)

    async def drain(self) -> None:
        """Refuse new requests and wait until everything admitted here has finished or been handed off."""
        self._draining = True
        while True:
            s = await self.stats()
            if not (s.num_running or s.num_waiting or s.num_held):
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
        self.loop.stop()
        for fut in self._prefills.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"worker {self.worker_id} shut down"))
        self.transport.close()

    def _on_engine_error(self, error: BaseException) -> None:
        """Engine thread: the engine is broken (the loop logged the traceback); stop serving on the asyncio loop."""
        self._aio.call_soon_threadsafe(self._fail, error)

    def _fail(self, error: BaseException) -> None:
        self._closed = True
        failure = WorkerFailed(f"worker {self.worker_id}: the engine failed: {type(error).__name__}: {error}")
        for fut in self._prefills.values():
            if not fut.done():
                fut.set_exception(failure)
        if self._on_fatal is not None:
            self._on_fatal(error)

    def inject_fault(self, kind: str) -> None:
        """For failure tests and chaos runs: `engine_step` makes the engine's next step raise."""
        if kind != "engine_step":
            raise ValueError(f"unknown fault kind {kind!r}; known: ['engine_step']")

        def broken_step():
            raise RuntimeError("injected fault: engine step failed")

        self.loop.submit(lambda e: setattr(e, "step", broken_step))

    # ---- outputs ------------------------------------------------------------------------------------
    def _on_outputs(self, deltas: list[TokenDelta]) -> None:
        """Engine thread, once per step: resolve prefills, queue the rest for poll_outputs."""
        handoffs = {}
        for d in deltas:
            if d.request_id in self._prefills and d.kv_held:
                record, blocks = self.engine.export_request(d.request_id)
                handoffs[d.request_id] = (record, blocks)
        self._aio.call_soon_threadsafe(self._deliver, deltas, handoffs)

    def _deliver(self, deltas: list[TokenDelta], handoffs: dict) -> None:
        out = []
        for d in deltas:
            if d.request_id in self._first_pending and (d.new_token_ids or d.finished):
                self._first_pending.discard(d.request_id)
                self.prefix_prompt_tokens_total += d.num_prompt_tokens
                self.prefix_hit_tokens_total += d.num_cached_tokens
            fut = self._prefills.pop(d.request_id, None)
            if fut is None:
                out.append(d)
                continue
            handoff = None
            if d.request_id in handoffs:
                record, blocks = handoffs[d.request_id]
                lease = self._leases.get(d.request_id)
                deadline = time.time() + self.options.lease_s  # the lease runs from the end of the prefill
                if lease is not None:
                    lease.deadline = deadline
                handoff = KVHandoff(
                    request=record,
                    prefill_worker=self.worker_id,
                    block_ids=blocks,
                    lease_deadline=deadline,
                    num_bytes=len(blocks) * self.layout.block_bytes,
                )
            if not fut.done():
                fut.set_result(
                    PrefillResult(delta=d, handoff=handoff, queue_s=d.queue_s or 0.0, prefill_s=d.prefill_s or 0.0)
                )
            elif handoff is not None:  # the caller gave up (cancelled): nobody will pull
                self._release_now(d.request_id)
        if out:
            self.outboxes.put(out)

    async def poll_outputs(self, timeout_s: float = 1.0, consumer: str = "") -> list[TokenDelta]:
        """Everything produced for `consumer` (a frontend) since its last call; waits up to timeout_s."""
        return await self.outboxes.poll(consumer, timeout_s)

    # ---- requests -----------------------------------------------------------------------------------
    def _admit_check(self) -> None:
        if self.loop.error is not None:
            raise WorkerFailed(f"worker {self.worker_id}: the engine failed: {self.loop.error!r}")
        if self._draining or self._closed:
            raise WorkerDraining(f"worker {self.worker_id} is draining and takes no new requests")

    async def generate(self, req: EngineRequest) -> None:
        """Colocated/decode role: prefill and decode here; tokens come out through poll_outputs."""
        self._admit_check()
        self.outboxes.register(req.request_id, req.reply_to)
        self.num_requests_total += 1
        self._first_pending.add(req.request_id)
        try:
            await self.loop.call(lambda e: e.add_request(req.request_id, req.prompt_token_ids, req.params))
        except BaseException:
            self._first_pending.discard(req.request_id)
            raise

    async def prefill(self, req: EngineRequest, decode_worker: str = "", decode_handle=None) -> PrefillResult:
        """Compute the prompt and the first token; hold the blocks under a lease for `decode_worker`."""
        self._admit_check()
        fut = self._aio.create_future()
        self._prefills[req.request_id] = fut
        self._leases[req.request_id] = _Lease(time.time() + self.options.lease_s, decode_worker, decode_handle)
        self._first_pending.add(req.request_id)
        self.num_requests_total += 1
        try:
            await self.loop.call(lambda e: e.add_request(req.request_id, req.prompt_token_ids, req.params, "prefill"))
            result = await asyncio.shield(fut)
        except BaseException:
            self._prefills.pop(req.request_id, None)
            self._leases.pop(req.request_id, None)
            self._first_pending.discard(req.request_id)
            await self._abort_local([req.request_id])
            raise
        if result.handoff is None:
            self._leases.pop(req.request_id, None)
        return result

    async def release(self, request_id: str) -> bool:
        """The decode worker has pulled the KV (or gave up): free the held blocks now."""
        if self._leases.pop(request_id, None) is None:
            return False
        await self.loop.call(lambda e: e.release(request_id) if _is_held(e, request_id) else None)
        return True

    def _release_now(self, request_id: str) -> None:
        self._leases.pop(request_id, None)
        self.loop.submit(lambda e: e.release(request_id) if _is_held(e, request_id) else None)

    async def decode(self, handoff: KVHandoff, prefill_handle=None, reply_to: str = "") -> DecodeStarted:
        """Reserve blocks, pull the KV from the prefill worker, confirm so it frees them, continue decoding;
        tokens go to `reply_to`'s outbox."""
        self._admit_check()
        self.outboxes.register(handoff.request.request_id, reply_to)
        self.num_requests_total += 1
        rid = handoff.request.request_id
        start = time.perf_counter()  # the handoff's time runs from reservation to confirmation
        try:
            reservation = await self._reserve(handoff)
        except BaseException:
            self.outboxes.forget(rid)
            raise
        n = reservation.num_cached_blocks
        # finish before the sender's lease runs out, or it may reuse the blocks we are reading
        timeout = min(self.options.pull_timeout_s, handoff.lease_deadline - time.time() - 0.5)
        self._pulling.add(rid)
        try:
            if timeout <= 0:
                raise TimeoutError(f"lease for {rid} ends before its KV could be pulled")
            await self.transport.pull(
                handoff.prefill_worker, handoff.block_ids[n:], reservation.block_ids[n:], timeout_s=timeout
            )
        except BaseException:
            self._pulling.discard(rid)
            self._abort_after_pull.discard(rid)
            await self._abort_local([rid])
            raise
        finally:
            if prefill_handle is not None:
                prefill_handle.release.remote(rid)  # confirm (or give up): the sender frees either way
        elapsed = time.perf_counter() - start
        self._pulling.discard(rid)
        if rid in self._abort_after_pull:  # cancelled while the transfer was writing into our blocks
            self._abort_after_pull.discard(rid)
            await self._abort_local([rid])
            raise asyncio.CancelledError(f"{rid} was aborted during its KV transfer")
        await self.loop.call(lambda e: e.finish_import(rid))
        return DecodeStarted(kv_transfer_s=elapsed, num_bytes=(len(handoff.block_ids) - n) * self.layout.block_bytes)

    async def ping(self) -> bool:
        return True

    async def _reserve(self, handoff: KVHandoff):
        deadline = time.monotonic() + self.options.reserve_timeout_s
        delay = 0.005
        while True:
            try:
                return await self.loop.call(lambda e: e.import_request(handoff.request))
            except OutOfKVBlocks:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def abort(self, request_ids: list[str]) -> None:
        """Cancel requests in any state here; blocks a transfer is still writing are freed after it ends."""
        now = []
        for rid in request_ids:
            fut = self._prefills.pop(rid, None)
            if fut is not None and not fut.done():
                fut.cancel()
            self._first_pending.discard(rid)
            self.outboxes.forget(rid)
            self._leases.pop(rid, None)
            if rid in self._pulling:
                self._abort_after_pull.add(rid)
            else:
                now.append(rid)
        await self._abort_local(now)

    async def _abort_local(self, request_ids: list[str]) -> None:
        await self.loop.call(lambda e: [e.abort(rid) for rid in request_ids])

    # ---- background -------------------------------------------------------------------------------
    async def _lease_keeper(self) -> None:
        """Free leases past their deadline, and those of decode workers that Ray reports dead."""
        last_check = 0.0
        while True:
            await asyncio.sleep(0.05)
            for consumer, rids in self.outboxes.stale(self.options.consumer_timeout_s).items():
                if rids:
                    log.warning("frontend %s stopped polling; aborting its %d requests", consumer, len(rids))
                    asyncio.ensure_future(self.abort(rids))
            now = time.time()
            for rid, lease in list(self._leases.items()):
                if lease.deadline < now and rid not in self._prefills:
                    log.warning("lease for %s expired; freeing its blocks", rid)
                    self._release_now(rid)
            if self._leases and now - last_check > self.options.liveness_interval_s:
                last_check = now
                await self._check_decoders()

    async def _check_decoders(self) -> None:
        import ray

        handles = {lease.decode_worker: lease.decode_handle for lease in self._leases.values() if lease.decode_handle}
        for name, handle in handles.items():
            try:
                await asyncio.wait_for(handle.ping.remote(), timeout=self.options.liveness_interval_s * 4)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError):
                for rid, lease in list(self._leases.items()):
                    if lease.decode_worker == name and rid not in self._prefills:
                        log.warning("decode worker %s is gone; freeing the blocks held for %s", name, rid)
                        self._release_now(rid)

    async def _report_loop(self) -> None:
        """Load and KV events to the controller (the heartbeat); a full snapshot of the prefix cache when it
        asks to resync (a gap, or a restarted controller that lost its index)."""
        import uuid

        epoch, seq, failing = uuid.uuid4().hex, 0, False
        while True:
            try:
                raw, events = await self.loop.call(lambda e: (e.stats(), e.take_kv_events()))
                seq += 1
                batch = KVEventBatch(worker_id=self.worker_id, epoch=epoch, seq=seq, events=events)
                if not await asyncio.wait_for(self._controller.report.remote(self._stats(raw), batch), 5.0):
                    seq += 1
                    hashes = await self.loop.call(lambda e: e.kv_snapshot())
                    await asyncio.wait_for(self._controller.resync.remote(self.worker_id, epoch, seq, hashes), 5.0)
                if failing:
                    log.warning("reports to the controller go through again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a restarting controller must not kill the worker; the next report resyncs
                if not failing:
                    log.warning("report to the controller failed (%r); retrying", e)
                failing = True
                seq += 1  # a gap: the controller will ask for a resync
            await asyncio.sleep(self.options.report_interval_s)


def _is_held(engine: LLMEngine, request_id: str) -> bool:
    from pdserve.engine.sequence import Status

    req = engine.requests.get(request_id)
    return req is not None and req.status is Status.HELD


def _layout(engine: LLMEngine) -> KVLayout:
    kv = engine.kv_cache
    num_blocks, num_layers, _, block_size, heads, head_dim = kv.shape
    return KVLayout(
        model_id=engine.model_id,
        dtype=str(kv.dtype).removeprefix("torch."),
        block_size=block_size,
        num_layers=num_layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        num_blocks=num_blocks,
        block_bytes=kv[0].numel() * kv.element_size(),
    )
