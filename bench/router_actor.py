"""bench/router.py part (b): routing decisions through the `GlobalScheduler` Ray actor, one call per
decision, 64 calls in flight, and batched through the API server's RouteBatcher."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque

import numpy as np

from bench.router_harness import BS, SimWorkers, pct_us
from pdserve.protocol import KVEventBatch, Route, RouteRequest, WorkerStats
from pdserve.router.router import NoCapacity, Router, RouterConfig


class GlobalScheduler:
    """The Router alone in an actor (as the controller runs it, without the lifecycle), to time actor calls."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.router = Router(config)

    def register(self, workers: list[tuple[str, str]]) -> None:
        for worker_id, role in workers:
            self.router.register(worker_id, role)

    def remove(self, worker_id: str) -> None:
        self.router.remove(worker_id)

    def report(self, stats: WorkerStats, events: KVEventBatch | None = None) -> bool:
        return self.router.report(stats, events)

    def resync(self, worker_id: str, epoch: str, seq: int, hashes: list[int]) -> None:
        self.router.resync(worker_id, epoch, seq, hashes)

    def route(self, req: RouteRequest) -> Route | NoCapacity:
        """Returns the exception instead of raising it, so callers get it without a Ray error wrapper."""
        try:
            return self.router.route(req)
        except NoCapacity as e:
            return e

    def route_batch(self, reqs: list[RouteRequest]) -> list[Route | NoCapacity]:
        """Many decisions in one call (the API server batches requests that arrive together)."""
        return [self.route(r) for r in reqs]

    def snapshot(self) -> dict:
        return {
            "views": {k: vars(v) for k, v in self.router.views.items()},
            "decisions": {f"{a}/{b}": n for (a, b), n in self.router.decisions.items()},
            "index_blocks": len(self.router.index),
        }


# ---- (b) through the actor ------------------------------------------------------------------------------


def run_actor(warm, timed, args) -> dict:
    import ray

    from pdserve.cluster.routing import RouteBatcher

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sched = ray.remote(num_cpus=0)(GlobalScheduler).remote(
            RouterConfig(policy=args.actor_policy, block_size=BS, max_index_blocks=args.index_blocks)
        )
        sim = SimWorkers(args.prefill, args.decode, args.worker_blocks)
        ray.get(sched.register.remote(list(sim.roles.items())))
        sim.handshake(lambda s, b: ray.get(sched.report.remote(s, b)), lambda *a: ray.get(sched.resync.remote(*a)))
        reports, count, busy = [], [0], [0.0]

        def routed(req, route):
            sim.place(req, route)
            count[0] += 1
            busy[0] += getattr(route, "decision_s", 0.0)
            if count[0] % args.report_every == 0:
                reports.append(sched.report.remote(*sim.next_report()))  # fire and forget, checked below

        for start in range(0, len(warm), 256):
            chunk = warm[start : start + 256]
            for req, route in zip(chunk, ray.get(sched.route_batch.remote(chunk))):
                routed(req, route)
        ray.get(sched.snapshot.remote())
        n = args.actor_requests
        parts = [timed[k * n : (k + 1) * n] for k in range(3)]
        modes = {}

        def sequential(reqs):
            lat = []
            for req in reqs:
                t0 = time.perf_counter_ns()
                route = ray.get(sched.route.remote(req))
                lat.append(time.perf_counter_ns() - t0)
                routed(req, route)
            return lat, len(reqs)

        def in_flight(reqs, window=64):
            lat, queue = [], deque()

            def drain_one():  # an actor runs one caller's calls in order: the oldest finishes first
                r, t0, ref = queue.popleft()
                routed(r, ray.get(ref))
                lat.append(time.perf_counter_ns() - t0)

            for req in reqs:
                queue.append((req, time.perf_counter_ns(), sched.route.remote(req)))
                if len(queue) == window:
                    drain_one()
            while queue:
                drain_one()
            return lat, len(reqs)

        def batched(reqs):
            return asyncio.run(_batched(sched, RouteBatcher, reqs, routed, args.tasks))

        for name, fn, reqs in [
            ("sequential", sequential, parts[0]),
            ("64_in_flight", in_flight, parts[1]),
            (f"route_batch_{args.tasks}_tasks", batched, parts[2]),
        ]:
            gc.collect()
            t0, busy[0] = time.perf_counter(), 0.0
            lat, calls = fn(reqs)
            wall = time.perf_counter() - t0
            modes[name] = {
                "decisions": len(reqs),
                "actor_calls": calls,
                "wall_s": wall,
                "decisions_per_s": len(reqs) / wall,
                "route_share": busy[0] / wall,  # of the wall time, the actor spent this much inside Router.route
                "client_latency_us": pct_us(lat),
            }
        ok = ray.get(reports)
        assert all(ok), "a report was applied out of order"
        snap = ray.get(sched.snapshot.remote())
        return {
            "policy": args.actor_policy,
            "index_blocks": snap["index_blocks"],
            "reports": len(reports),
            "modes": modes,
        }
    finally:
        ray.shutdown()


async def _batched(sched, batcher_cls, reqs, routed, tasks):
    calls = []

    class Counting:  # counts the route_batch calls the batcher makes
        class route_batch:
            @staticmethod
            def remote(batch):
                calls.append(len(batch))
                return sched.route_batch.remote(batch)

    batcher = batcher_cls(Counting())
    todo, lat = iter(reqs), []

    async def client():
        for req in todo:
            t0 = time.perf_counter_ns()
            route = await batcher.route(req)
            lat.append(time.perf_counter_ns() - t0)
            routed(req, route)

    await asyncio.gather(*(client() for _ in range(tasks)))
    print(f"  route_batch: {len(calls)} calls, mean batch {np.mean(calls):.1f}, max {max(calls)}", flush=True)
    return lat, len(calls)
