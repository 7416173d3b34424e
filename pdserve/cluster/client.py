"""ClusterClient: a frontend's side of the P/D request flow over Ray (an `EngineClient`). Stateless: the
controller routes and owns membership; this follows it (`Membership`) and streams tokens.

route (controller) -> prefill worker computes the prompt and returns the first token plus a KV handoff
-> the first token goes to the client at once -> the decode worker pulls the KV and continues; its tokens
reach this process through one long-poll per worker (batched per step), never through the controller.
A worker that dies is retried around (up to `failure.max_request_retries`): before the first token the
request is routed again; mid-stream it continues on another worker by recomputing the prompt plus the
tokens already sent, so the client sees no gap and no repeat. Whatever way a request ends early (client
gone, error), it is aborted on every worker it touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import msgspec
import ray

from pdserve.cluster.membership import Membership, last_line
from pdserve.cluster.routing import RouteBatcher
from pdserve.cluster.stream import StreamGap, TokenStream
from pdserve.config import DECODE_CAPABLE, PREFILL_CAPABLE, ServeConfig
from pdserve.engine_client import Overloaded, ServiceUnavailable, WorkerDraining, WorkerFailed
from pdserve.hashing import block_hashes, root_hash
from pdserve.model_info import ModelInfo, load_model_info
from pdserve.protocol import EngineRequest, PrefillResult, Refused, Route, RouteRequest, SamplingParams, TokenDelta
from pdserve.router.router import NoCapacity

log = logging.getLogger(__name__)


async def connect_client(config: ServeConfig, metrics=None, timeout_s: float = 60.0) -> ClusterClient:
    """A started client of the deployment `config.name` (its controller found by name)."""
    from pdserve.config import NAMESPACE, controller_actor_name

    controller = ray.get_actor(controller_actor_name(config.name), namespace=NAMESPACE)
    info = load_model_info(config.engine.model, config.engine.max_model_len)
    client = ClusterClient(info, controller, config, metrics)
    await client.start(timeout_s)
    return client


class ClusterClient:
    def __init__(self, info: ModelInfo, controller, config: ServeConfig, metrics=None) -> None:
        self.info = info
        self.controller = controller
        self.router = RouteBatcher(controller, config.failure.controller_timeout_s)
        self.block_size = config.engine.block_size
        self.max_retries = config.failure.max_request_retries
        self.admission_retries = config.routing.admission_retries
        self.stream_gap_timeout_s = config.frontend.stream_gap_timeout_s
        self.metrics = metrics
        self._root = root_hash(info.model_id)
        self.members = Membership(controller, self._deliver, self._worker_left, config.failure.controller_timeout_s)
        self._queues: dict[str, asyncio.Queue] = {}  # attempt id -> its stream's queue
        self._owner: dict[str, str] = {}  # attempt id -> worker whose outbox streams it
        self._touched: dict[str, set[str]] = {}  # attempt id -> every worker it ran on (aborted there at the end)

    async def start(self, timeout_s: float = 60.0) -> None:
        await self.members.start(timeout_s)

    @property
    def workers(self) -> dict[str, tuple[str, object]]:
        return self.members.workers

    # ---- streams and deaths -----------------------------------------------------------------------------
    def _deliver(self, worker_id: str, deltas: list[TokenDelta]) -> None:
        for d in deltas:
            q = self._queues.get(d.request_id)
            if q is None:
                continue
            if d.moved_to is not None:  # migrated: its tokens come from there now (and its death is ours)
                self._owner[d.request_id] = d.moved_to
                self._touched.setdefault(d.request_id, set()).add(d.moved_to)
                continue
            q.put_nowait(d)

    def _worker_left(self, worker_id: str, reason: str) -> None:
        for rid, owner in list(self._owner.items()):
            if owner == worker_id and rid in self._queues:
                self._queues[rid].put_nowait(WorkerFailed(f"worker {worker_id} {reason}"))

    async def _call(self, worker_id: str, ref):
        """Await a call on a worker; its death (or its broken engine, which ends it) marks it dead here and
        at the controller, and reaches the request as `WorkerFailed` (retried, or a 503; never a 500)."""
        try:
            return await ref
        except (ray.exceptions.RayActorError, WorkerFailed) as e:
            await self.members.worker_died(worker_id, e)
            raise WorkerFailed(f"worker {worker_id} failed: {last_line(e)}") from None

    # ---- requests -------------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> AsyncIterator[TokenDelta]:
        arrival = time.time()
        sent: list[int] = []
        first: TokenDelta | None = None
        stream = TokenStream()  # drops what the client already has, fails on a gap (then retried)
        for attempt in range(self.max_retries + 1):
            if sent and len(sent) >= params.max_tokens:  # died right after its last token
                n = len(prompt_token_ids)
                yield TokenDelta(request_id=request_id, new_token_ids=[], text="", finished=True,
                                 finish_reason="length", num_prompt_tokens=n)  # fmt: skip
                return
            base = len(sent)  # a continuation's own token indices start after what was sent
            try:
                async for d in self._attempt(request_id, attempt, prompt_token_ids, params, sent, arrival, cache_salt):
                    d = stream.accept(d, base)
                    if d is None:
                        continue
                    if first is None:
                        first = d
                    elif attempt:  # a continuation: report the original prompt, not prompt + sent tokens
                        d.num_prompt_tokens, d.num_cached_tokens = first.num_prompt_tokens, first.num_cached_tokens
                    sent += d.new_token_ids
                    yield d
                    if d.finished:
                        return
                return
            except (WorkerFailed, WorkerDraining) as e:  # died, or refused while leaving: route again
                if attempt == self.max_retries:
                    raise
                cause = "before_first_token" if not sent else "mid_stream"
                log.warning("request %s: %s; retrying (%s, attempt %d)", request_id, e, cause, attempt + 1)
                if self.metrics is not None:
                    self.metrics.request_retries.labels(cause).inc()

    async def _attempt(self, request_id, attempt, prompt, params, sent, arrival, salt) -> AsyncIterator[TokenDelta]:
        rid = request_id if attempt == 0 else f"{request_id}.retry{attempt}"
        if sent:  # continue after the tokens the client has: recompute them as part of the prompt
            prompt = prompt + sent
            params = msgspec.structs.replace(params, max_tokens=params.max_tokens - len(sent))
        req = EngineRequest(
            request_id=rid, prompt_token_ids=prompt, params=params, arrival_time=arrival,
            reply_to=self.members.consumer, cache_salt=salt,
        )  # fmt: skip
        expected = 0  # the next token index this attempt's stream must deliver
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        touched = self._touched[rid] = set()  # workers that may hold something of it (aborted there at the end)
        finished = False
        try:
            route, result = await self._admit(req, touched)
            if result is not None:  # prefilled on a prefill worker: the first token, then the KV handoff
                decode, prefill = self.members.handle(route.decode_worker), self.members.handle(route.prefill_worker)
                self._observe_prefill(result, arrival)
                finished = result.delta.finished
                result.delta.request_id = request_id
                yield result.delta
                expected = 1
                if finished:
                    decode.abort.remote([rid])  # the slot it reserved: nothing will arrive there
                    return
                try:
                    started = await self._call(
                        route.decode_worker, decode.decode.remote(result.handoff, prefill, self.members.consumer)
                    )
                except ray.exceptions.RayTaskError as e:  # the pull failed (e.g. the prefill worker died)
                    raise WorkerFailed(f"the KV handoff of {rid} failed: {last_line(e)}") from None
                if isinstance(started, Refused):  # its reserved slot was gone: continue elsewhere
                    raise WorkerDraining(f"worker {started.worker_id} refused the KV handoff of {rid} (full)")
                self._observe_transfer(started)
            async for item in _in_order(queue, expected, self.stream_gap_timeout_s):
                finished = item.finished
                item.request_id = request_id
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            self._owner.pop(rid, None)
            self._touched.pop(rid, None)
            if not finished:
                for worker_id in touched:
                    handle = self.members.live_handle(worker_id)
                    if handle is not None:
                        handle.abort.remote([rid])

    async def _admit(self, req: EngineRequest, touched: set[str]) -> tuple[Route, PrefillResult | None]:
        """Route `req` and have it admitted: started on a colocated or decode worker (None), or prefilled on
        a prefill worker after its decode worker reserved a slot for it (the first token and the handoff).
        Each worker is the authority on its own queue: one at its bound answers `Refused` (nothing started
        there) and the router is asked again without it, `routing.admission_retries` times at most; then
        the request is `Overloaded` (429). The router's estimate only steers."""
        rid, exclude = req.request_id, []
        for _ in range(self.admission_retries + 1):
            route = await self._route(req, exclude)
            decode = self.members.handle(route.decode_worker)
            self._owner[rid] = route.decode_worker
            touched.add(route.decode_worker)
            if route.prefill_worker is None:
                refused = await self._call(route.decode_worker, decode.generate.remote(req))
                if refused is None:
                    return route, None
            else:
                refused = await self._call(route.decode_worker, decode.reserve.remote(req))
                if refused is None:
                    prefill = self.members.handle(route.prefill_worker)
                    touched.add(route.prefill_worker)
                    ref = prefill.prefill.remote(req, route.decode_worker, decode)
                    result = await self._call(route.prefill_worker, ref)
                    if not isinstance(result, Refused):
                        return route, result
                    refused = result
                    decode.abort.remote([rid])  # give back the slot it reserved
                    touched.discard(route.decode_worker)
            touched.discard(refused.worker_id)
            exclude.append(refused.worker_id)
            if self.metrics is not None:
                self.metrics.admission_refusals.inc()
        raise Overloaded(
            f"workers {', '.join(exclude)} refused the request at their admission bounds "
            f"(engine.max_num_seqs running + routing.max_waiting_per_worker queued)",
            retry_after=1.0,
        )

    async def _route(self, req: EngineRequest, exclude: list[str] = ()) -> Route:
        root = self._root if req.cache_salt is None else root_hash(self.info.model_id, req.cache_salt)
        hashes = block_hashes(req.prompt_token_ids, self.block_size, root)  # as the engines hash them
        rr = RouteRequest(
            request_id=req.request_id,
            num_prompt_tokens=len(req.prompt_token_ids),
            max_tokens=req.params.max_tokens,
            block_hashes=hashes,
            exclude=list(exclude),
        )
        try:
            route = await self.router.route(rr)
        except ray.exceptions.RayActorError as e:
            raise ServiceUnavailable(f"the controller is unreachable: {last_line(e)}") from None
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"the controller did not route within {self.router.timeout_s:.0f} s") from None
        if isinstance(route, NoCapacity):
            if route.unavailable:
                raise ServiceUnavailable(str(route))
            raise Overloaded(str(route), retry_after=route.retry_after)
        return route

    def _observe_prefill(self, result, arrival: float) -> None:
        if self.metrics is not None:
            # queue: from this frontend's arrival to the prefill's start, routing and transport included
            waited = max(0.0, time.time() - arrival - result.prefill_s)
            self.metrics.ttft_queue.observe(waited)
            self.metrics.ttft_prefill.observe(result.prefill_s)

    def _observe_transfer(self, started) -> None:
        if self.metrics is not None:
            self.metrics.kv_transfer_seconds.observe(started.kv_transfer_s)
            self.metrics.kv_transfer_bytes.inc(started.num_bytes)

    async def migrate(self, request_id: str, target_worker: str | None) -> list[dict]:
        try:
            records = await self.controller.migrate.remote(request_id, target_worker)
        except ray.exceptions.RayTaskError as e:  # a KeyError / ValueError raised in the controller
            cause = getattr(e, "cause", None)
            if isinstance(cause, (KeyError, ValueError)):
                raise type(cause)(*cause.args) from None
            raise
        except ray.exceptions.RayActorError as e:
            raise ServiceUnavailable(f"the controller is unreachable: {last_line(e)}") from None
        return [msgspec.to_builtins(r) for r in records]

    # ---- probes ---------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Liveness: this process runs and reaches its controller (no data-path probe)."""
        if not await self.members.controller_reachable():
            raise ServiceUnavailable("the controller is unreachable")

    async def check_ready(self) -> None:
        """Readiness: a prefill-capable and a decode-capable worker are ready (from membership; no calls)."""
        roles = self.members.ready_roles
        if not (roles.intersection(PREFILL_CAPABLE) and roles.intersection(DECODE_CAPABLE)):
            raise ServiceUnavailable(f"no ready prefill-capable and decode-capable workers (ready: {sorted(roles)})")

    async def stats(self) -> dict:
        """Per-worker series come from the controller's own /metrics; a frontend's scrape makes no calls."""
        return {}

    async def shutdown(self) -> None:
        await self.members.stop()


async def _in_order(queue: asyncio.Queue, expected: int, gap_timeout_s: float) -> AsyncIterator[TokenDelta]:
    """The queue's deltas in token order. After a migration the new source's first tokens may arrive before
    the old source's last ones (two pollers): later deltas wait for the gap to fill, up to `gap_timeout_s`
    (`frontend.stream_gap_timeout_s`); then the missing token is lost and the attempt fails."""
    pending: dict[int, TokenDelta] = {}
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), gap_timeout_s if pending else None)
        except asyncio.TimeoutError:
            raise StreamGap(f"token {expected} never came (later ones did: {sorted(pending)[:4]})") from None
        if isinstance(item, Exception):
            raise item
        if item.index > expected:
            pending[item.index] = item
            continue
        while item is not None:
            expected = max(expected, item.index + len(item.new_token_ids))
            yield item
            if item.finished:
                return
            item = pending.pop(expected, None)
