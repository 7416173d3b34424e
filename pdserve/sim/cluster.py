"""The simulated cluster: a discrete-event loop in virtual time around the real pdserve Router.

Requests are routed on arrival (`NoCapacity` -> rejected, as a 429); a prefill worker hands the KV to the
decode worker once that worker has reserved blocks (transfer = fixed overhead + bytes / bandwidth, pulling
only blocks the decode worker does not cache; transfers do not contend); an import that finds no blocks for
`reserve_timeout_s` fails, as pdserve's does. Every worker reports load and KV events each
`report_interval_s` (random phase), so the router sees what a real one sees, as stale as a real one.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from pdserve.protocol import RouteRequest
from pdserve.router.policies import DisaggConfig
from pdserve.router.router import NoCapacity, Router, RouterConfig
from pdserve.sim.clock import VirtualClock, virtual_clock
from pdserve.sim.model import LatencyModel
from pdserve.sim.trace import TraceRequest
from pdserve.sim.worker import SimRequest, SimWorker


@dataclass(frozen=True)
class ClusterConfig:
    num_prefill: int = 4
    num_decode: int = 4
    num_colocated: int = 0
    block_size: int = 512  # tokens per KV block, in engines and router alike (one trace block)
    report_interval_s: float = 0.1
    reserve_timeout_s: float = 10.0  # pdserve WorkerOptions.reserve_timeout_s
    max_waiting_per_worker: int = 64
    disagg: DisaggConfig = field(default_factory=DisaggConfig)

    def roles(self) -> list[tuple[str, str]]:
        return (
            [(f"prefill-{i}", "prefill") for i in range(self.num_prefill)]
            + [(f"decode-{i}", "decode") for i in range(self.num_decode)]
            + [(f"colocated-{i}", "colocated") for i in range(self.num_colocated)]
        )


class Simulation:
    def __init__(
        self,
        trace: list[TraceRequest],
        model: LatencyModel,
        cluster: ClusterConfig,
        policy: str,
        policy_options: dict | None = None,
        policy_impl=None,
        seed: int = 0,
    ) -> None:
        self.trace, self.model, self.cluster = trace, model, cluster
        self.router = Router(
            RouterConfig(
                policy=policy,
                policy_options=policy_options or {},
                block_size=cluster.block_size,
                max_waiting_per_worker=cluster.max_waiting_per_worker,
                disagg=cluster.disagg,
            ),
            policy=policy_impl,  # an experimental policy object in place of the named one
        )
        self.workers = {wid: SimWorker(wid, role, model, cluster.block_size, self) for wid, role in cluster.roles()}
        self.clock = VirtualClock()
        self.rng = random.Random(seed)
        self._heap: list = []
        self._ids = itertools.count()
        self.requests = [SimRequest(t) for t in trace]
        self.resolved = 0
        self.decision_s = 0.0

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._ids), fn, args))

    def run(self) -> list[SimRequest]:
        with virtual_clock(self.clock):
            self.start()
            self.advance()
        return self.requests

    def start(self) -> None:
        """Register the initial workers and schedule every arrival (inside `virtual_clock`)."""
        for wid, role in self.cluster.roles():
            self.router.register(wid, role)
            self.at(self.rng.uniform(0, self.cluster.report_interval_s), self._report, self.workers[wid])
        for req in self.requests:
            self.at(req.trace.arrival_s, self._arrive, req)

    def advance(self, until: float | None = None) -> None:
        """Run events until every request is resolved, or (with `until`) through virtual time `until`."""
        heap, clock, total = self._heap, self.clock, len(self.requests)
        while heap and (self.resolved < total if until is None else heap[0][0] <= until):
            t, _, fn, args = heapq.heappop(heap)
            clock.now = t
            fn(t, *args)
        if until is not None:
            clock.now = max(clock.now, until)

    # ---- request flow ----------------------------------------------------------------------------
    def _arrive(self, now: float, req: SimRequest) -> None:
        t = req.trace
        try:
            route = self.router.route(
                RouteRequest(
                    request_id=t.request_id,
                    num_prompt_tokens=t.num_prompt_tokens,
                    max_tokens=t.max_tokens,
                    block_hashes=list(t.block_hashes),
                )
            )
        except NoCapacity:
            req.outcome = "rejected"
            self.resolved += 1
            self.settled(req)
            return
        self.decision_s += route.decision_s
        req.decode_worker = route.decode_worker
        req.prefill_worker = route.prefill_worker or route.decode_worker
        req.reason, req.policy_reason = route.reason, route.policy_reason
        req.predicted_cached = route.predicted_cached_tokens
        self.workers[req.prefill_worker].add_prefill(req, now)

    def prefill_done(self, req: SimRequest, now: float) -> None:
        decode = self.workers[req.decode_worker]
        req.ready_s = now
        decode.imports.append(req)
        self.try_imports(decode, now)

    def try_imports(self, decode: SimWorker, now: float) -> None:
        """Reserve blocks for waiting imports (each retries on its own, as pdserve's do) and start pulls."""
        bs, waiting = self.cluster.block_size, []
        for req in decode.imports:
            hashes = req.trace.block_hashes
            hit = decode.cache.match(hashes)
            need = -(-(req.trace.num_prompt_tokens + req.trace.max_tokens) // bs)
            blocks = decode.cache.acquire(list(hashes[:hit]), need - hit) if need <= decode.cache.num_blocks else None
            if blocks is None:
                if now - req.ready_s >= self.cluster.reserve_timeout_s or need > decode.cache.num_blocks:
                    self._release_prefill(req, now)
                    self.fail(req, "import_timeout")
                else:
                    waiting.append(req)
                continue
            req.blocks = blocks
            decode.num_pulling += 1
            req.transfer_tokens = req.trace.num_prompt_tokens - hit * bs
            self.at(now + self.model.transfer_s(req.transfer_tokens), self._transferred, req, hit)
        decode.imports = waiting

    def _transferred(self, now: float, req: SimRequest, hit: int) -> None:
        decode = self.workers[req.decode_worker]
        decode.num_pulling -= 1
        decode.cache.store(req.blocks, list(req.trace.block_hashes[hit:]))
        self._release_prefill(req, now)
        req.remaining, req.context = req.trace.max_tokens - 1, req.trace.num_prompt_tokens + 1
        req.decode_start_s = now
        decode.add_decode(req, now)

    def _release_prefill(self, req: SimRequest, now: float) -> None:
        prefill = self.workers[req.prefill_worker]
        prefill.num_held -= 1
        prefill.cache.release(req.prefill_blocks)
        req.prefill_blocks = None
        prefill.kick(now)

    def finish(self, req: SimRequest, now: float) -> None:
        req.finish_s, req.outcome = now, "finished"
        self.resolved += 1
        self.settled(req)

    def fail(self, req: SimRequest, why: str) -> None:
        req.outcome = f"failed:{why}"
        self.resolved += 1
        self.settled(req)

    def first_token(self, req: SimRequest, now: float) -> None:
        """A request's first token is out (observers override this)."""

    def settled(self, req: SimRequest) -> None:
        """A request is resolved: finished, rejected or failed (observers override this)."""

    # ---- reports ---------------------------------------------------------------------------------
    def _report(self, now: float, w: SimWorker) -> None:
        if not self.router.report(w.stats(now), w.events()):
            w.seq += 1
            self.router.resync(w.worker_id, w.epoch, w.seq, w.cache.cached_hashes())
        if w.imports:
            self.try_imports(w, now)
        self.at(now + self.cluster.report_interval_s, self._report, w)
