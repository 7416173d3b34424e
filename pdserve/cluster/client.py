"""ClusterClient: the API server's side of the P/D request flow over Ray (a `EngineClient`).

route (GlobalScheduler) -> prefill worker computes the prompt and returns the first token plus a KV handoff
-> the first token goes to the client at once -> the decode worker pulls the KV and continues; its tokens
reach this process through one long-poll per worker (batched per step), never through the scheduler.
Whatever way a request ends early (client gone, error), it is aborted on every worker it touched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

import ray

from pdserve.engine_client import Overloaded, ServiceUnavailable, WorkerFailed
from pdserve.hashing import block_hashes, root_hash
from pdserve.model_info import ModelInfo
from pdserve.protocol import EngineRequest, Route, RouteRequest, SamplingParams, TokenDelta
from pdserve.scheduler.router import NoCapacity

log = logging.getLogger(__name__)


class RouteBatcher:
    """Routing calls to the scheduler actor, batched: requests that arrive while a call is in flight go
    together in the next one, so a burst costs a few actor calls, and a lone request no added delay."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._queue: list[tuple[RouteRequest, asyncio.Future]] = []
        self._busy = False

    async def route(self, req: RouteRequest):
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((req, fut))
        if not self._busy:
            self._busy = True
            asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self.scheduler.route_batch.remote([r for r, _ in batch])
                except Exception as e:  # handed to each waiting request
                    results = [e] * len(batch)
                for (_, fut), result in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(result, BaseException) and not isinstance(result, NoCapacity):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self._busy = False


class ClusterClient:
    def __init__(
        self,
        info: ModelInfo,
        scheduler,
        workers: dict[str, tuple[str, object]],
        metrics=None,
        block_size: int = 16,
        policy: str = "",
    ) -> None:
        self.info = info
        self.scheduler = scheduler
        self.router = RouteBatcher(scheduler)
        self.block_size = block_size
        self.policy = policy
        self._root = root_hash(info.model_id)
        self.workers = workers  # worker id -> (role, actor handle)
        self.metrics = metrics
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, str] = {}  # request id -> worker whose outbox streams it
        self._dead: set[str] = set()
        self._pollers: list[asyncio.Task] = []
        self._health_ids = itertools.count()
        self._closed = False

    def start(self) -> None:
        # Every role is long-polled: the poll streams decode outputs and, for any role, is how a death is
        # seen at once (a pending call on a dead actor fails), so the scheduler drops the worker.
        for worker_id, (_, handle) in self.workers.items():
            self._pollers.append(asyncio.ensure_future(self._poll(worker_id, handle)))

    async def _poll(self, worker_id: str, handle) -> None:
        while not self._closed:
            try:
                deltas = await handle.poll_outputs.remote(1.0)
            except ray.exceptions.RayActorError as e:
                self._worker_died(worker_id, e)
                return
            except asyncio.CancelledError:
                return
            except Exception:  # keep streaming for the other requests
                log.exception("poll_outputs from %s failed", worker_id)
                await asyncio.sleep(0.1)
                continue
            for d in deltas:
                q = self._queues.get(d.request_id)
                if q is not None:
                    q.put_nowait(d)

    def _worker_died(self, worker_id: str, error: BaseException) -> None:
        if worker_id in self._dead:
            return
        log.error("worker %s died: %s", worker_id, error)
        self._dead.add(worker_id)
        self.scheduler.remove.remote(worker_id)
        for rid, owner in list(self._owner.items()):
            if owner == worker_id and rid in self._queues:
                self._queues[rid].put_nowait(WorkerFailed(f"worker {worker_id} died"))

    def _handle(self, worker_id: str):
        if worker_id in self._dead:
            raise WorkerFailed(f"worker {worker_id} is dead")
        return self.workers[worker_id][1]

    async def _route(self, req: EngineRequest) -> Route:
        hashes = block_hashes(req.prompt_token_ids, self.block_size, self._root)
        rr = RouteRequest(
            request_id=req.request_id,
            num_prompt_tokens=len(req.prompt_token_ids),
            max_tokens=req.params.max_tokens,
            block_hashes=hashes,
        )
        route = await self.router.route(rr)
        if isinstance(route, NoCapacity):
            if route.unavailable:
                raise ServiceUnavailable(str(route))
            raise Overloaded(str(route), retry_after=route.retry_after)
        if self.metrics is not None:
            self.metrics.routing_decisions.labels(self.policy, route.policy_reason).inc()
            self.metrics.disagg_decisions.labels(route.reason).inc()
            self.metrics.scheduler_decision_seconds.observe(route.decision_s)
        return route

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        req = EngineRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, params=params, arrival_time=time.time()
        )
        route = await self._route(req)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._owner[request_id] = route.decode_worker
        touched = [route.decode_worker] + ([route.prefill_worker] if route.prefill_worker else [])
        finished = False
        try:
            decode = self._handle(route.decode_worker)
            first = True
            if route.prefill_worker is None:
                await self._call(route.decode_worker, decode.generate.remote(req))
            else:
                prefill = self._handle(route.prefill_worker)
                result = await self._call(
                    route.prefill_worker, prefill.prefill.remote(req, route.decode_worker, decode)
                )
                self._observe_prefill(result)
                self._observe_prefix(route.prefill_worker, result.delta)
                first = False
                finished = result.delta.finished
                yield result.delta
                if finished:
                    return
                try:
                    started = await self._call(route.decode_worker, decode.decode.remote(result.handoff, prefill))
                except ray.exceptions.RayTaskError as e:  # the pull failed (e.g. the prefill worker died)
                    raise WorkerFailed(f"the KV handoff of {request_id} failed: {e}") from None
                self._observe_transfer(started)
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if first:
                    self._observe_prefix(route.decode_worker, item)
                    first = False
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self._owner.pop(request_id, None)
            if not finished:
                for worker_id in touched:
                    if worker_id not in self._dead:
                        self.workers[worker_id][1].abort.remote([request_id])

    async def _call(self, worker_id: str, ref):
        """Await a call on a worker; its death (or its broken engine, which ends it) marks it dead here and
        at the scheduler, and reaches the request as `WorkerFailed` (a 503, never a 500)."""
        try:
            return await ref
        except (ray.exceptions.RayActorError, WorkerFailed) as e:
            self._worker_died(worker_id, e)
            raise WorkerFailed(f"worker {worker_id} failed: {_first_line(e)}") from None

    def _observe_prefill(self, result) -> None:
        if self.metrics is not None:
            self.metrics.ttft_queue.observe(result.queue_s)
            self.metrics.ttft_prefill.observe(result.prefill_s)

    def _observe_prefix(self, worker_id: str, delta: TokenDelta) -> None:
        if self.metrics is not None:
            self.metrics.prefix_prompt_tokens.labels(worker_id).inc(delta.num_prompt_tokens)
            self.metrics.prefix_hit_tokens.labels(worker_id).inc(delta.num_cached_tokens)

    def _observe_transfer(self, started) -> None:
        if self.metrics is not None:
            self.metrics.ttft_kv_transfer.observe(started.kv_transfer_s)
            self.metrics.kv_transfer_seconds.observe(started.kv_transfer_s)
            self.metrics.kv_transfer_bytes.inc(started.num_bytes)

    async def check_health(self) -> None:
        """Every worker answers, and one greedy token goes through the whole data path."""
        live = {w: h for w, (_, h) in self.workers.items() if w not in self._dead}
        try:
            await asyncio.wait_for(asyncio.gather(*(h.health.remote() for h in live.values())), 10)
            rid = f"health-{next(self._health_ids)}"
            params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
            gen = self.generate(rid, [0] * 2, params)
            try:
                await asyncio.wait_for(gen.__anext__(), 10)
            finally:
                await gen.aclose()
        except (Exception, asyncio.TimeoutError) as e:
            raise ServiceUnavailable(f"data path unhealthy: {e!r}") from None

    async def stats(self) -> dict:
        """{"workers": [{worker, role, running, waiting, kv_usage, ...}]} for the live workers that answer."""
        live = {w: h for w, (_, h) in self.workers.items() if w not in self._dead}
        results = await asyncio.gather(*(h.stats.remote() for h in live.values()), return_exceptions=True)
        workers = [
            {
                "worker": s.worker_id,
                "role": s.role,
                "running": s.num_running,
                "waiting": s.num_waiting,
                "kv_usage": s.kv_usage,
                "held": s.num_held,
                "free_blocks": s.num_free_blocks,
            }
            for s in results
            if not isinstance(s, BaseException)
        ]
        return {"workers": workers}

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._pollers:
            t.cancel()
        live = [h for w, (_, h) in self.workers.items() if w not in self._dead]
        await asyncio.gather(*(h.shutdown.remote() for h in live), return_exceptions=True)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
