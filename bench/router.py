"""Router cost: routing decisions in-process (every policy side by side) and through the Ray actor.

Workload: synthetic multi-turn chats with chained block hashes from pdserve.hashing (64 system prompts of
512-1024 tokens; each turn appends an answer and a user message; prompts 16-256 blocks). 64 simulated
workers (32 prefill + 32 decode) cache what is routed to them (LRU, `--worker-blocks` each) and report
load and KV events (BlockStored / BlockRemoved) every `--report-every` decisions, one worker at a time:
as a real worker reporting every 0.2 s would at ~2,000 decisions/s. A warm-up fills the index to
`--index-blocks` before anything is timed.

(a) in-process `Router.route()` latency per policy, `--repeat` runs each with the policies alternating
(medians reported), with its phases (`index.match_ends`, each pool's candidates and the policy's pick
over them) timed alone; `--batches 1,32` also times decisions back to back, as a route_batch call runs them;
(b) `GlobalScheduler` actor throughput (router_actor.py): sequential `route.remote`, 64 in flight,
`route_batch` via the API server's RouteBatcher. `--profile` prints a cProfile of in-process routing.
The workload and the simulated workers are in router_harness.py.

    python -m bench.router [--requests 20000] [--repeat 3] [--batches 1,32] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time

import numpy as np

from bench.common import print_table, write_json
from bench.router_actor import run_actor
from bench.router_harness import BS, GCPauses, SimWorkers, pct_us, workload
from pdserve.protocol import RouteRequest
from pdserve.router.policies import POLICIES
from pdserve.router.router import NoCapacity, Router, RouterConfig

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
    print(f"wrote {write_json('router', payload)}")


if __name__ == "__main__":
    main()
