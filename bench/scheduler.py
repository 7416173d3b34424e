"""Global scheduler cost: routing decisions in-process (every policy side by side) and through the Ray actor.

Workload: synthetic multi-turn chats with chained block hashes from pdserve.hashing (64 system prompts of
512-1024 tokens; each turn appends an answer and a user message; prompts 16-256 blocks). 64 simulated
workers (32 prefill + 32 decode) cache what is routed to them (LRU, `--worker-blocks` each) and report
load and KV events (BlockStored / BlockRemoved) every `--report-every` decisions, one worker at a time:
as a real worker reporting every 0.2 s would at ~2,000 decisions/s. A warm-up fills the index to
`--index-blocks` before anything is timed.

(a) in-process `Router.route()` latency per policy, with its phases (`index.match_ends`, each pool's
candidates and the policy's pick over them) timed alone;
(b) `GlobalScheduler` actor throughput: sequential `route.remote`, 64 in flight, `route_batch` via the API
server's RouteBatcher. `--profile` prints a cProfile of in-process routing.

    python bench/scheduler.py [--requests 20000] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import random
import time
from collections import OrderedDict, deque

import numpy as np
from common import print_table, write_json

from pdserve.hashing import block_hashes, root_hash
from pdserve.protocol import BlockRemoved, BlockStored, KVEventBatch, RouteRequest, WorkerStats
from pdserve.scheduler.policies import POLICIES
from pdserve.scheduler.router import NoCapacity, Router, RouterConfig

BS = 16
MAX_BLOCKS = 256


# ---- workload -------------------------------------------------------------------------------------------


def workload(n: int, seed: int, conversations: int = 1000, vocab: int = 32000) -> list[RouteRequest]:
    """`n` requests: 75% the next turn of an open chat, 20% a new chat on a (Zipf-popular) system prompt,
    5% a one-off prompt. A chat state is (block hashes, tail tokens not filling a block)."""
    rng = random.Random(seed)
    root = root_hash("bench-scheduler")

    def extend(state, n_tokens):
        hashes, tail = state
        tokens = tail + [rng.randrange(4, vocab) for _ in range(n_tokens)]
        new = block_hashes(tokens, BS, hashes[-1] if hashes else root)
        return hashes + new, tokens[len(new) * BS :]

    systems = [extend(([], []), rng.randint(512, 1024)) for _ in range(64)]
    weights = [1 / (i + 1) for i in range(len(systems))]
    chats: list[tuple[list[int], list[int]]] = []
    reqs = []
    for i in range(n):
        u = rng.random()
        if u < 0.05:
            state = extend(([], []), rng.randint(16, MAX_BLOCKS) * BS)
        elif u < 0.25 or len(chats) < conversations // 4:
            state = extend(rng.choices(systems, weights)[0], rng.randint(32, 512))
            if len(chats) < conversations:
                chats.append(state)
            else:
                chats[rng.randrange(len(chats))] = state
        else:
            j = rng.randrange(len(chats))
            state = extend(chats[j], rng.randint(64, 512) + rng.randint(32, 256))  # answer + user message
            if len(state[0]) > MAX_BLOCKS:  # too long: the chat ends, a new one starts on its system prompt
                state = extend(rng.choices(systems, weights)[0], rng.randint(32, 512))
            chats[j] = state
        hashes, tail = state
        reqs.append(
            RouteRequest(
                request_id=f"r{i}", num_prompt_tokens=len(hashes) * BS + len(tail), max_tokens=256, block_hashes=hashes
            )
        )
    return reqs


# ---- simulated workers ----------------------------------------------------------------------------------


class SimWorkers:
    """The workers' half of the protocol: each caches the blocks of the requests placed on it (LRU,
    prefix-first, so a chain is evicted from its tail) and reports load plus its new KV events."""

    def __init__(self, prefill: int, decode: int, capacity: int, seed: int = 0) -> None:
        self.roles = {f"p{i:02d}": "prefill" for i in range(prefill)} | {f"d{i:02d}": "decode" for i in range(decode)}
        self.capacity = capacity
        self.cache = {w: OrderedDict() for w in self.roles}
        self.events: dict[str, list] = {w: [] for w in self.roles}
        self.seq = dict.fromkeys(self.roles, 1)  # seq 1 asked for the resync done in `handshake`
        self.order = list(self.roles)
        self.next = 0
        self.rng = random.Random(seed)

    def handshake(self, report, resync) -> None:
        for w in self.roles:
            if not report(self.stats(w), KVEventBatch(worker_id=w, epoch="e", seq=1, events=[])):
                resync(w, "e", 1, [])

    def place(self, req: RouteRequest, route) -> None:
        if isinstance(route, NoCapacity):
            return
        self._store(route.prefill_worker or route.decode_worker, req.block_hashes)
        if route.prefill_worker:
            self._store(route.decode_worker, req.block_hashes)  # the decode worker caches the import too

    def _store(self, w: str, hashes: list[int]) -> None:
        cache = self.cache[w]
        new = [h for h in hashes if h not in cache]
        for h in reversed(hashes):  # the prefix ends up most recently used
            cache[h] = None
            cache.move_to_end(h)
        if new:
            self.events[w].append(BlockStored(block_hashes=new, parent_hash=None))
        if len(cache) > self.capacity:
            gone = [cache.popitem(last=False)[0] for _ in range(len(cache) - self.capacity)]
            self.events[w].append(BlockRemoved(block_hashes=gone))

    def stats(self, w: str) -> WorkerStats:
        running, waiting = self.rng.randint(0, 16), self.rng.randint(0, 4)
        total = 4 * self.capacity
        return WorkerStats(
            worker_id=w,
            role=self.roles[w],
            num_running=running,
            num_waiting=waiting,
            num_held=0,
            num_free_blocks=total - len(self.cache[w]) - 128 * running,
            num_blocks=total,
            kv_usage=(len(self.cache[w]) + 128 * running) / total,
            num_prefill_tokens_queued=waiting * 1024 if self.roles[w] == "prefill" else 0,
            time=time.time(),
        )

    def next_report(self) -> tuple[WorkerStats, KVEventBatch]:
        w = self.order[self.next % len(self.order)]
        self.next += 1
        self.seq[w] += 1
        batch = KVEventBatch(worker_id=w, epoch="e", seq=self.seq[w], events=self.events[w])
        self.events[w] = []
        return self.stats(w), batch


class GCPauses:
    """Full (generation 2) collections while active, and how long each paused the process."""

    def __init__(self) -> None:
        self.pauses, self._start, self.active = [], 0.0, False

    def __call__(self, phase, info) -> None:
        if not self.active or info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._start)

    def __enter__(self):
        self.pauses, self.active = [], True
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        return {"count": len(self.pauses), "max_ms": 1000 * max(self.pauses, default=0.0)}


def pct_us(ns) -> dict:
    p50, p90, p99, p999 = np.percentile(np.asarray(ns) / 1000, [50, 90, 99, 99.9]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "p99.9": p999, "mean": float(np.mean(ns)) / 1000}


# ---- (a) in process -------------------------------------------------------------------------------------


def run_inprocess(policy: str, warm, timed, args, batch: int = 1, profile: bool = False) -> dict:
    router = Router(RouterConfig(policy=policy, block_size=BS, max_index_blocks=args.index_blocks))
    sim = SimWorkers(args.prefill, args.decode, args.worker_blocks)
    for w, role in sim.roles.items():
        router.register(w, role)
    sim.handshake(router.report, router.resync)

    def report() -> int:
        t0 = time.perf_counter_ns()
        if not router.report(*sim.next_report()):
            raise RuntimeError("event stream out of order")
        return time.perf_counter_ns() - t0

    for i, req in enumerate(warm):
        sim.place(req, _route(router, req))
        if i % args.report_every == 0:
            report()
    gc.collect()
    lat, report_ns, cached, prompt, rejected, disagg = [], [], 0, 0, 0, 0
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    with GCPauses() as pauses:
        for first in range(0, len(timed), batch):  # `batch` decisions back to back, as route_batch runs them
            chunk, routes = timed[first : first + batch], []
            for req in chunk:
                t0 = time.perf_counter_ns()
                routes.append(_route(router, req))
                lat.append(time.perf_counter_ns() - t0)
            for i, (req, route) in enumerate(zip(chunk, routes), first):
                sim.place(req, route)
                if isinstance(route, NoCapacity):
                    rejected += 1
                else:
                    cached, prompt = cached + route.predicted_cached_tokens, prompt + req.num_prompt_tokens
                    disagg += route.prefill_worker is not None
                if i % args.report_every == 0:
                    report_ns.append(report())
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return {
        "policy": policy,
        "batch": batch,
        "route_us": pct_us(lat),
        "report_us": pct_us(report_ns),
        "gc_gen2": pauses.summary(),
        **_breakdown(router, timed[: args.breakdown]),
        "index_blocks": len(router.index),
        "predicted_entries": len(router.index._predicted),
        "rejected": rejected,
        "predicted_hit_rate": cached / max(1, prompt),
        "disaggregated_share": disagg / max(1, len(timed) - rejected),
        "decisions": {f"{a}/{b}": n for (a, b), n in sorted(router.decisions.items())},
    }


def _route(router, req):
    try:
        return router.route(req)
    except NoCapacity as e:
        return e


def _breakdown(router: Router, reqs: list[RouteRequest]) -> dict:
    """The phases of route() timed alone on the final state (the views and index do not change here):
    `index.match_ends`, then per pool the candidates the Router scores and the policy's pick over them.
    `scored` is how many candidates that was (a ranked policy scores a few; the others every worker)."""
    match_ns, cand_ns, pick_ns = [], {"prefill": [], "decode": []}, {"prefill": [], "decode": []}
    scored = {"prefill": [], "decode": []}
    for req in reqs:
        t0 = time.perf_counter_ns()
        ends = router.index.match_ends(req.block_hashes)
        match_ns.append(time.perf_counter_ns() - t0)
        most = req.num_prompt_tokens - 1
        for pool in pick_ns:
            t0 = time.perf_counter_ns()
            cands = router.pools[pool].candidates(lambda w: True, ends, lambda b, most=most: min(b * BS, most))
            t1 = time.perf_counter_ns()
            router.policy.pick([c for c, _ in cands], req, pool)
            pick_ns[pool].append(time.perf_counter_ns() - t1)
            cand_ns[pool].append(t1 - t0)
            scored[pool].append(len(cands))
    return {
        "match_us": pct_us(match_ns),
        "candidates_us": {p: pct_us(ns) for p, ns in cand_ns.items()},
        "pick_us": {p: pct_us(ns) for p, ns in pick_ns.items()},
        "scored_mean": {p: float(np.mean(n)) for p, n in scored.items()},
    }


# ---- (b) through the actor ------------------------------------------------------------------------------


def run_actor(warm, timed, args) -> dict:
    import ray

    from pdserve.cluster.backend import RouteBatcher
    from pdserve.scheduler.router import GlobalScheduler

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sched = GlobalScheduler.remote(
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


# ---- report ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="timed in-process decisions per policy")
    ap.add_argument("--warmup", type=int, default=12000, help="untimed decisions that fill the index first")
    ap.add_argument("--index-blocks", type=int, default=100_000, help="RouterConfig.max_index_blocks")
    ap.add_argument("--worker-blocks", type=int, default=4096, help="blocks each simulated worker caches")
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--report-every", type=int, default=6, help="one worker's report per this many decisions")
    ap.add_argument("--breakdown", type=int, default=5000, help="requests for the match/pick-alone timings")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--actor-policy", default="prefix_aware")
    ap.add_argument("--actor-requests", type=int, default=4000, help="decisions per actor mode")
    ap.add_argument("--tasks", type=int, default=256, help="concurrent asyncio clients of the RouteBatcher")
    ap.add_argument("--batches", default="1", help="in-process: decisions routed back to back (e.g. 1,32)")
    ap.add_argument("--repeat", type=int, default=3, help="in-process runs per policy; the table shows medians")
    ap.add_argument("--no-actor", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process run of --actor-policy")
    ap.add_argument("--quick", action="store_true", help="small run for a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.warmup, args.actor_requests, args.breakdown, args.repeat = 2000, 3000, 500, 500, 1
    started, load0 = time.perf_counter(), os.getloadavg()
    t0 = time.perf_counter()
    reqs = workload(args.warmup + max(args.requests, 3 * args.actor_requests), args.seed)
    warm, timed = reqs[: args.warmup], reqs[args.warmup :]
    gc.collect()
    gc.freeze()  # the workload is the harness's: later collections should not scan (and charge routing for) it
    blocks = [len(r.block_hashes) for r in timed]
    print(
        f"workload: {len(reqs)} requests in {time.perf_counter() - t0:.1f} s; timed prompts {min(blocks)}-"
        f"{max(blocks)} blocks (mean {np.mean(blocks):.0f}); load average {load0[0]:.2f}",
        flush=True,
    )

    runs: dict[str, list[dict]] = {}
    batches = [int(b) for b in args.batches.split(",")]
    for rep in range(args.repeat):  # the policies alternate, so slow spells of this noisy machine hit each alike
        for policy in args.policies.split(","):
            for batch in batches:
                t0 = time.perf_counter()
                profile = args.profile and policy == args.actor_policy and batch == batches[0] and rep == 0
                r = run_inprocess(policy, warm, timed[: args.requests], args, batch, profile)
                runs.setdefault(f"{policy}/{batch}", []).append(r)
                print(f"  {policy} batch {batch}: {time.perf_counter() - t0:.1f} s, p99 {r['route_us']['p99']:.1f} us")
    results = {}
    for key, rs in runs.items():  # per statistic, the median over the repetitions
        results[key] = {
            **rs[0],
            "route_us": {q: float(np.median([r["route_us"][q] for r in rs])) for q in rs[0]["route_us"]},
        }
        results[key]["route_p99_runs"] = [r["route_us"]["p99"] for r in rs]
    base = results.get(f"prefix_aware/{batches[0]}") or next(iter(results.values()))
    print(
        f"\n== (a) in-process Router.route(), {args.prefill}P + {args.decode}D workers, "
        f"{args.requests} decisions, microseconds, median of {args.repeat} runs (goal p99 < 100).\n"
        "batch 1: each decision followed by the simulated workers' bookkeeping; batch N: N decisions back to "
        "back, as a route_batch call runs them"
    )
    rows = []
    for r in results.values():
        rows.append(
            {
                "policy": r["policy"],
                "batch": r["batch"],
                "route p50": r["route_us"]["p50"],
                "p90": r["route_us"]["p90"],
                "p99": r["route_us"]["p99"],
                "p99.9": r["route_us"]["p99.9"],
                "p99 runs": " ".join(f"{x:.0f}" for x in r["route_p99_runs"]),
                "p99 / base": r["route_us"]["p99"] / base["route_us"]["p99"],
                "match p50": r["match_us"]["p50"],
                "match p99": r["match_us"]["p99"],
                "cands+pick P p50": r["candidates_us"]["prefill"]["p50"] + r["pick_us"]["prefill"]["p50"],
                "cands+pick D p50": r["candidates_us"]["decode"]["p50"] + r["pick_us"]["decode"]["p50"],
                "scored P": r["scored_mean"]["prefill"],
                "scored D": r["scored_mean"]["decode"],
                "report p50": r["report_us"]["p50"],
                "report p99": r["report_us"]["p99"],
                "gc2 n": r["gc_gen2"]["count"],
                "gc2 max ms": r["gc_gen2"]["max_ms"],
                "index": r["index_blocks"],
                "rejected": r["rejected"],
                "pred. hit": r["predicted_hit_rate"],
                "disagg": r["disaggregated_share"],
            }
        )
    print_table(rows, list(rows[0]))
    actor = None
    if not args.no_actor:
        t0 = time.perf_counter()
        actor = run_actor(warm, timed, args)
        print(
            f"\n== (b) GlobalScheduler actor ({args.actor_policy}), {args.actor_requests} decisions per mode, "
            f"index {actor['index_blocks']} blocks; {time.perf_counter() - t0:.1f} s (goal >= 2000/s)"
        )
        seq = actor["modes"]["sequential"]["decisions_per_s"]
        rows = [
            {
                "mode": m,
                "decisions/s": r["decisions_per_s"],
                "x sequential": r["decisions_per_s"] / seq,
                "actor calls": r["actor_calls"],
                "client p50 us": r["client_latency_us"]["p50"],
                "client p99 us": r["client_latency_us"]["p99"],
                "in route()": r["route_share"],
            }
            for m, r in actor["modes"].items()
        ]
        print_table(rows, list(rows[0]))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average start {load0[0]:.2f}, end {os.getloadavg()[0]:.2f}")
    payload = {
        "args": vars(args),
        "inprocess": results,
        "inprocess_runs": runs,
        "actor": actor,
        "wall_s": wall,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    print(f"wrote {write_json('scheduler', payload)}")


if __name__ == "__main__":
    main()
