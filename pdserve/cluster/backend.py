"""ClusterBackend: the API server's side of the P/D request flow over Ray (a `GenerateBackend`).

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

from pdserve.api.backend import BackendUnavailable, Overloaded
from pdserve.model_info import ModelInfo
from pdserve.protocol import EngineRequest, Route, RouteRequest, SamplingParams, TokenDelta
from pdserve.scheduler.router import NoCapacity

log = logging.getLogger(__name__)


class WorkerFailed(Exception):
    """A worker serving the request died or failed mid-request."""


class ClusterBackend:
    def __init__(self, info: ModelInfo, scheduler, workers: dict[str, tuple[str, object]], metrics=None) -> None:
        self.info = info
        self.scheduler = scheduler
        self.workers = workers  # worker id -> (role, actor handle)
        self.metrics = metrics
        self._queues: dict[str, asyncio.Queue] = {}
        self._owner: dict[str, str] = {}  # request id -> worker whose outbox streams it
        self._dead: set[str] = set()
        self._pollers: list[asyncio.Task] = []
        self._health_ids = itertools.count()
        self._closed = False

    def start(self) -> None:
        for worker_id, (role, handle) in self.workers.items():
            if role in ("decode", "mixed"):
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

    def _worker_died(self, worker_id: str, error: Exception) -> None:
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
        rr = RouteRequest(
            request_id=req.request_id, num_prompt_tokens=len(req.prompt_token_ids), max_tokens=req.params.max_tokens
        )
        route = await self.scheduler.route.remote(rr)
        if isinstance(route, NoCapacity):
            if route.unavailable:
                raise BackendUnavailable(str(route))
            raise Overloaded(str(route), retry_after=route.retry_after)
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
            if route.prefill_worker is None:
                await decode.generate.remote(req)
            else:
                prefill = self._handle(route.prefill_worker)
                result = await prefill.prefill.remote(req, route.decode_worker, decode)
                self._observe_prefill(result)
                finished = result.delta.finished
                yield result.delta
                if finished:
                    return
                started = await decode.decode.remote(result.handoff, prefill)
                self._observe_transfer(started)
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        except ray.exceptions.RayActorError as e:
            raise WorkerFailed(f"a worker serving {request_id} died: {e}") from None
        finally:
            self._queues.pop(request_id, None)
            self._owner.pop(request_id, None)
            if not finished:
                for worker_id in touched:
                    if worker_id not in self._dead:
                        self.workers[worker_id][1].abort.remote([request_id])

    def _observe_prefill(self, result) -> None:
        if self.metrics is not None:
            self.metrics.ttft_queue.observe(result.queue_s)
            self.metrics.ttft_prefill.observe(result.prefill_s)

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
            raise BackendUnavailable(f"data path unhealthy: {e!r}") from None

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
