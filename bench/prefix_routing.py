"""Prefix-aware routing on the real system: `pdserve serve` (4 prefill + 2 decode workers) once per routing
policy, the same multi-turn chat workload against each; prefix hit rate, TTFT, E2E, throughput and the
router's own counters from /metrics, side by side with ratios to round_robin.

Workload: `--groups` system prompts of `--system-tokens` tokens; `--conversations` chats spread over the
groups, `--turns` turns each; turn k's prompt = turn k-1's prompt + its answer (the token ids the server
returned) + a new user message of `--user-tokens` tokens. `--concurrency` chat clients each take the next
chat and run its turns in order (turn k+1 only after turn k finished), so chats interleave at the workers.

KV sizing (`--num-kv-blocks`, per worker, block size 16): with affinity a prefill worker needs one group's
system prompt (32 blocks), the histories of the chats it serves (up to ~80 blocks each, about 2 active at a
time with 8 clients) and its prompts in flight: about 350 blocks. Without affinity every worker needs every
system prompt and every active history (4 x 32 + 8 x 80, plus in flight: ~900). 512 holds the first and not
the second. The same number sizes the decode workers, which run up to 8 sequences of ~85 blocks between
them: at 384 the router found both decode workers full now and then (a few 429s per run).

    python bench/prefix_routing.py                             # prefix_aware vs round_robin, demo model
    python bench/prefix_routing.py --policies all --model random
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import build_random_llama, print_table, write_json
from pdserve.live.server import Server
from pdserve.load.chats import Turn, run_chats
from pdserve.load.client import get_json
from pdserve.load.metrics import scrape_now
from pdserve.load.outcome import percentiles

POLICIES = ["round_robin", "prefix_aware", "least_loaded", "sglang_cache_aware", "dynamo_kv_cost"]
COUNTERS = (
    "pdserve_request_prompt_tokens_total",
    "pdserve_prompt_cached_tokens_total",
    "pdserve_prefix_cache_prompt_tokens_total",
    "pdserve_prefix_cache_hit_tokens_total",
    "pdserve_routing_decisions_total",
    "pdserve_disaggregation_decisions_total",
    "pdserve_router_decision_seconds_sum",
    "pdserve_router_decision_seconds_count",
    "pdserve_router_decision_seconds_bucket",
)


# ---- the server under test ------------------------------------------------------------------------------


def counters(server: Server, url: str) -> dict[tuple, float]:
    """Request counters from the frontend; routing, router and per-worker prefix-cache counters from the
    controller's own /metrics."""
    both = scrape_now(url) | scrape_now(server.controller_url)
    return {k: v for k, v in both.items() if k[0] in COUNTERS}


# ---- one policy, then all side by side ------------------------------------------------------------------


def summarize(turns: list[Turn], wall: float, before: dict, after: dict) -> dict:
    ok = [t for t in turns if not t.error]
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}

    def total(name, **labels):
        return sum(v for (n, ls), v in delta.items() if n == name and labels.items() <= dict(ls).items())

    def by(name, label):
        return {dict(ls)[label]: v for (n, ls), v in delta.items() if n == name}

    prompt, cached = sum(t.prompt_tokens for t in ok), sum(t.cached_tokens for t in ok)
    worker_prompt = by("pdserve_prefix_cache_prompt_tokens_total", "worker")
    worker_hit = by("pdserve_prefix_cache_hit_tokens_total", "worker")
    decisions = {f"{dict(ls)['reason']}": v for (n, ls), v in delta.items() if n == "pdserve_routing_decisions_total"}
    count = total("pdserve_router_decision_seconds_count")
    by_turn = {}
    for k in sorted({t.turn for t in ok}):
        ts = [t for t in ok if t.turn == k]
        by_turn[k] = sum(t.cached_tokens for t in ts) / max(1, sum(t.prompt_tokens for t in ts))
    return {
        "requests": len(turns),
        "ok": len(ok),
        "errors": sorted({t.error for t in turns if t.error})[:5],
        "retries_429": sum(t.retries for t in turns),
        "reasons_429": sorted({t.rejected_because for t in turns if t.rejected_because})[:3],
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "prompt_throughput": prompt / wall,
        "output_throughput": sum(t.output_tokens for t in ok) / wall,
        "hit_rate_usage": cached / max(1, prompt),
        "hit_rate_metrics": total("pdserve_prompt_cached_tokens_total")
        / max(1, total("pdserve_request_prompt_tokens_total")),
        "hit_rate_by_turn": by_turn,
        "reusable_share": sum(t.reusable_tokens for t in ok) / max(1, prompt),  # the best any routing can do
        "prompt_tokens_usage": prompt,
        "prompt_tokens_metrics": total("pdserve_request_prompt_tokens_total"),
        "per_worker": {
            w: {"prompt_tokens": p, "hit_rate": worker_hit.get(w, 0.0) / max(1, p)}
            for w, p in sorted(worker_prompt.items())
        },
        "routing_decisions": decisions,
        "disaggregation_decisions": by("pdserve_disaggregation_decisions_total", "decision"),
        "router_decision_mean_us": 1e6 * total("pdserve_router_decision_seconds_sum") / max(1, count),
        "ttft": percentiles([t.ttft for t in ok if t.ttft is not None]),
        "e2e": percentiles([t.e2e for t in ok]),
    }


def run_policy(policy: str, served: list[str], args, log_dir: Path) -> dict:
    server_args = [
        *served,
        "--routing",
        policy,
        "--prefill-workers",
        str(args.prefill),
        "--decode-workers",
        str(args.decode),
        "--num-kv-blocks",
        str(args.num_kv_blocks),
        *args.server_args.split(),
    ]
    server = Server(policy, server_args, log_dir)
    t0 = time.perf_counter()
    try:
        url = server.start()
        ready_s = time.perf_counter() - t0
        model = get_json(f"{url}/v1/models")["data"][0]["id"]
        warm = argparse.Namespace(
            **{
                **vars(args),
                "conversations": 2 * (args.prefill + args.decode),
                "turns": 1,
                "groups": 2 * (args.prefill + args.decode),
                "seed": args.seed + 1000,
                "system_tokens": 64,
                "answer_tokens": 4,
            }
        )
        asyncio.run(run_chats(url, model, warm))  # unrelated prompts: every worker runs its first steps
        time.sleep(1.0)  # the workers' load reports and KV events of the warm-up reach the router
        before = counters(server, url)
        turns, wall, digest = asyncio.run(run_chats(url, model, args))
        time.sleep(0.5)
        summary = summarize(turns, wall, before, counters(server, url))
    finally:
        stop = server.stop()
    print(
        f"[{policy}] ready in {ready_s:.0f} s, {summary['ok']}/{summary['requests']} ok in {wall:.0f} s, "
        f"hit rate {summary['hit_rate_usage']:.3f}; stopped in {stop['stop_s']:.1f} s, "
        f"strays {stop['strays'] or 'none'}",
        flush=True,
    )
    keep = ("conversation", "turn", "prompt_tokens", "cached_tokens", "reusable_tokens", "output_tokens", "ttft", "e2e")
    keep += ("retries",)
    return {
        "server_cmd": server.cmd,
        "log": str(server.log),
        "ready_s": ready_s,
        "stop": stop,
        "prompt_digest": digest,
        "summary": summary,
        "turns": [{k: v for k, v in asdict(t).items() if k in keep} for t in turns],
    }


ROWS = [
    ("hit rate (usage)", lambda s: s["hit_rate_usage"]),
    ("hit rate (/metrics)", lambda s: s["hit_rate_metrics"]),
    ("  of reusable", lambda s: s["hit_rate_usage"] / max(1e-9, s["reusable_share"])),
    ("TTFT p50 (ms)", lambda s: 1000 * s["ttft"]["p50"]),
    ("TTFT p90 (ms)", lambda s: 1000 * s["ttft"]["p90"]),
    ("E2E p50 (ms)", lambda s: 1000 * s["e2e"]["p50"]),
    ("E2E p90 (ms)", lambda s: 1000 * s["e2e"]["p90"]),
    ("req/s", lambda s: s["request_throughput"]),
    ("prompt tok/s", lambda s: s["prompt_throughput"]),
    ("output tok/s", lambda s: s["output_throughput"]),
    ("router decision mean (us)", lambda s: s["router_decision_mean_us"]),
    ("disaggregated share", lambda s: s["disaggregation_decisions"].get("disaggregated", 0) / max(1, s["ok"])),
    ("429 retries", lambda s: s["retries_429"]),
    ("ok / requests", lambda s: f"{s['ok']}/{s['requests']}"),
]


def report(results: dict[str, dict]) -> dict:
    names = list(results)
    base = "round_robin" if "round_robin" in names else names[0]
    ratios, rows = {}, []
    for metric, get in ROWS:
        row = {"metric": metric, **{n: get(results[n]["summary"]) for n in names}}
        for n in names:
            if n != base and isinstance(row[n], float) and isinstance(row[base], float) and row[base]:
                row[f"{n}/{base}"] = ratios.setdefault(n, {})[metric] = row[n] / row[base]
        rows.append(row)
    print_table(rows, ["metric", *names, *[f"{n}/{base}" for n in names if n != base]])
    for n in names:
        s = results[n]["summary"]
        per = ", ".join(f"{w} {v['prompt_tokens']:.0f} tok @ {v['hit_rate']:.2f}" for w, v in s["per_worker"].items())
        turns = ", ".join(f"{k}: {v:.2f}" for k, v in s["hit_rate_by_turn"].items())
        print(
            f"\n{n}: hit rate by turn {turns}\n  prompt tokens and hit rate by worker: {per}"
            f"\n  routing {s['routing_decisions']}; placement {s['disaggregation_decisions']}"
        )
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="round_robin,prefix_aware", help="comma-separated, or 'all'")
    ap.add_argument("--model", default="demo", help="'demo' (embedded), 'random' (bench Llama) or an HF dir")
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "pdserve-bench" / "llama"))
    ap.add_argument("--prefill", type=int, default=4)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--num-kv-blocks", type=int, default=512, help="per worker (see the sizing note above)")
    ap.add_argument("--server-args", default="", help="extra `pdserve serve` arguments, one string")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--user-tokens", type=lambda s: tuple(map(int, s.split(","))), default=(64, 128), help="lo,hi")
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8, help="chat clients")
    ap.add_argument("--think-s", type=float, default=0.0, help="mean think time between turns (exponential)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="prefix_routing")
    args = ap.parse_args()
    policies = POLICIES if args.policies == "all" else args.policies.split(",")
    if args.model == "demo":
        served = []
    else:
        path = build_random_llama(Path(args.model_dir)) if args.model == "random" else Path(args.model)
        served = ["--model", str(path)]
    started, load0 = time.perf_counter(), os.getloadavg()
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-bench-prefix-"))
    results = {p: run_policy(p, served, args, log_dir) for p in policies}
    digests = {p: r["prompt_digest"] for p, r in results.items()}
    print(
        f"\n== {args.prefill}P + {args.decode}D, {args.conversations} chats x {args.turns} turns, {args.groups} "
        f"groups x {args.system_tokens}-token system prompts, {args.concurrency} clients, "
        f"--num-kv-blocks {args.num_kv_blocks}; same prompts everywhere: {len(set(digests.values())) == 1}"
    )
    ratios = report(results)
    first = next(iter(results.values()))["summary"]
    system = args.system_tokens * first["ok"] / max(1, first["prompt_tokens_usage"])
    print(
        f"\nreusable (block-aligned prefix sent before): {first['reusable_share']:.3f} of prompt tokens; the "
        f"shared system prompts alone: {system:.3f} (a worker that keeps every system prompt hits at least that)"
    )
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; load average start {load0[0]:.2f}, end {os.getloadavg()[0]:.2f}")
    payload = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "policies": results,
        "ratios": ratios,
        "prompt_digests": digests,
        "wall_s": wall,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
