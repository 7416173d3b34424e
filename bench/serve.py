"""Serving benchmark: a load generator for the OpenAI HTTP API, and P/D vs colocated compared in one run.

Open loop (Poisson `--rate`, or a `--rates` sweep for goodput) or closed loop (`--concurrency`); lengths
from a synthetic mixture or a scaled-down trace (Mooncake, Azure code). Per request: TTFT, inter-token
latency (chunk gaps, spread over the tokens a chunk carries), TPOT, end-to-end latency, status.
Without `--url` it starts `pdserve serve` itself on a free port and stops it afterwards; `--compare` does
that twice, A = 1 prefill + 1 decode (NIXL) and B = 2 colocated workers, with the same seeded workload,
and prints both side by side with B/A ratios. The model is a random-weight Llama (bench/common.py).

    python bench/serve.py --compare                        # interference mix at 3 and 5 req/s
    python bench/serve.py --trace mooncake --rate 2 --num-requests 150
    python bench/serve.py --url http://127.0.0.1:8000 --model demo --rates 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import serve_autoscale, serve_faults
from bench.common import build_random_llama, print_table, write_json
from bench.serve_runs import Req, run_load, scrape_all, server_side, set_arrivals, summarize, workload
from pdserve.live.server import Server
from pdserve.load.client import get_json

LAYOUTS = {
    "pd": ["--prefill-workers", "1", "--decode-workers", "1", "--transport", "nixl"],
    "colocated": ["--prefill-workers", "0", "--decode-workers", "0", "--colocated-workers", "2"],
    "pd2": ["--prefill-workers", "2", "--decode-workers", "2", "--transport", "nixl"],  # --kill: a survivor per role
}
INTERFERENCE_MIX = "0.85:128:128,0.15:1024:128"  # short prompts decoding, 8x longer prompts cutting in
COMPARE_RATES = "3,5"  # req/s: both layouts busy, neither overloaded, on 2 cores with the random bench model
NOTE_SHARED_CPU = (
    "Both layouts run 2 worker processes (1 torch thread each) on the same 2 CPU cores, sharing them with "
    "the API server, Ray and this load generator; P/D cannot add hardware here, it only separates prefill "
    "steps from decode steps (and pays a KV transfer). Compare the ITL/TPOT tail (decode interference) "
    "with TTFT; absolute numbers drift with machine load."
)


# ---- one benchmark, a comparison, reports ------------------------------------------------------------


def model_args(args) -> tuple[list[str], int]:
    """`pdserve serve` arguments for the model, and its vocab size (for valid token-id prompts)."""
    if args.model == "demo":
        return [], args.vocab or 260
    path = build_random_llama(Path(args.model_dir)) if args.model == "random" else Path(args.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    return ["--model", str(path)], args.vocab or vocab


def bench(url: str, args, vocab: int, controller: str | None = None) -> list[dict]:
    """The workload at each rate (or once, closed loop / trace timing) against the server at `url`
    (`controller`: its controller's metrics URL)."""
    models = get_json(f"{url}/v1/models")["data"][0]
    model, max_len = models["id"], models.get("max_model_len") or 4096
    if args.warmup:
        warm = workload(args, vocab, max_len, "warmup")[0][: args.warmup]
        asyncio.run(run_load(url, model, [Req(r.prompt, 8) for r in warm], 1, args.timeout))
    runs = []
    for i, rate in enumerate(args.rates or [None]):
        reqs, times = workload(args, vocab, max_len, str(i))
        scale = set_arrivals(reqs, None if args.concurrency else rate, times, args)
        before = scrape_all(url, controller)
        with _niceness(args.client_nice):
            results, duration, lags = asyncio.run(run_load(url, model, reqs, args.concurrency, args.timeout))
        summary = summarize(results, duration, lags, args)
        summary["server"] = server_side(before, scrape_all(url, controller))
        summary.update(rate=rate, concurrency=args.concurrency, trace_time_scale=scale)
        print(f"  {_label(rate, args)}: {summary['ok']}/{summary['requests']} ok in {duration:.1f} s", flush=True)
        keep = ("output_tokens", "status", "ttft", "e2e", "send_lag")
        per_request = [
            {
                "input_len": len(q.prompt),
                "max_tokens": q.max_tokens,
                **{k: getattr(r, k) for k in keep},
                "tpot": r.tpot,
                "max_itl": max(r.itl, default=None),
                "arrival": q.arrival,
            }
            for r, q in zip(results, reqs)
        ]
        runs.append({"summary": summary, "requests": per_request})
    return runs


@contextlib.contextmanager
def _niceness(nice: int):
    """Run the load generator at a higher priority than the server, so that a CPU-starved client does not
    add its own stalls to the latencies it measures (needs root for nice < 0; skipped otherwise)."""
    old = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        print(f"  (cannot set client niceness {nice}; measuring at {old})", flush=True)
    try:
        yield
    finally:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, old)


def describe(args, vocab: int) -> dict:
    keys = ("trace", "mix", "input_len", "output_len", "len_spread", "num_requests", "seed", "concurrency")
    keys += ("client_nice",)
    extra = ("block_scale", "time_scale", "max_output_len") if args.trace else ()
    return {**{k: getattr(args, k) for k in keys + extra}, "rates": args.rates, "model": args.model, "vocab": vocab}


def _source(server_src: str | None) -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")), "server_src": server_src}


def goodput(runs: list[dict]) -> float | None:
    """DistServe: the highest swept rate at which >= 90% of requests meet both SLOs."""
    good = [r["summary"]["rate"] for r in runs if r["summary"]["rate"] and r["summary"]["slo_attainment"] >= 0.9]
    return max(good, default=None)


PERCENTILES = {
    "ttft": ("p50", "p90", "p99"),
    "itl": ("p50", "p90", "p99", "p99.9"),
    "max_itl": ("p50", "p90", "p99"),
    "tpot": ("p50", "p90", "p99"),
    "e2e": ("p50", "p90", "p99"),
}


def metric_rows(s: dict) -> list[tuple[str, float | int | None]]:
    rows = [("ok / requests", f"{s['ok']}/{s['requests']}"), ("req/s", s["request_throughput"])]
    rows += [("output tok/s", s["output_throughput"])]
    for m, ps in PERCENTILES.items():
        rows += [(f"{m} {p} (ms)", None if s[m][p] is None else 1000 * s[m][p]) for p in ps]
    rows += [("SLO attainment", s["slo_attainment"]), ("  ttft ok", s["ttft_attainment"])]
    rows += [("  tpot ok", s["tpot_attainment"]), ("tokens/chunk", s["tokens_per_chunk"])]
    rows += [(f"client loop lag {p} (ms)", 1000 * (s["client_loop_lag"][p] or 0)) for p in ("p99", "max")]
    srv = s.get("server") or {}
    for p in ("p99", "p99.9"):
        if srv.get("itl", {}).get(f"{p}_le") is not None:
            rows.append((f"server itl {p} <= (ms)", 1000 * srv["itl"][f"{p}_le"]))
    for name in ("ttft_queue", "ttft_prefill", "kv_transfer"):
        if srv.get(name, {}).get("mean") is not None:
            rows.append((f"server {name} mean (ms)", 1000 * srv[name]["mean"]))
    if srv.get("decisions"):
        rows.append(("server prefill split", " ".join(f"{k}={v:g}" for k, v in sorted(srv["decisions"].items()))))
    return rows


def _label(rate: float | None, args) -> str:
    if args.concurrency:
        return f"concurrency {args.concurrency}"
    if args.trace:
        return f"{args.trace} trace" + (f" rescaled to {rate} req/s" if rate else f" at {args.time_scale}x speed")
    return f"Poisson {rate} req/s"


def report(configs: dict[str, dict], args) -> dict:
    """Print each rate's metrics, configs side by side with B/A ratios; returns the ratios."""
    names, ratios = list(configs), {}
    for i, rate in enumerate(args.rates or [None]):
        print(f"\n== {_label(rate, args)}; SLO ttft <= {args.slo_ttft} s, tpot <= {args.slo_tpot} s")
        per = [dict(metric_rows(configs[n]["runs"][i]["summary"])) for n in names]
        rows = []
        for metric in dict.fromkeys(m for p in per for m in p):  # the union, in order
            row = {"metric": metric, **{n: p.get(metric) for n, p in zip(names, per)}}
            a, b = row[names[0]], row[names[-1]]
            if len(names) == 2 and isinstance(a, float) and isinstance(b, float) and a:
                row["B/A"] = ratios.setdefault(str(rate), {})[metric] = b / a
            rows.append(row)
        print_table(rows, ["metric", *names] + (["B/A"] if len(names) == 2 else []))
    for n in names:
        runs = configs[n]["runs"]
        att = ", ".join(f"{r['summary']['rate']}: {r['summary']['slo_attainment']:.0%}" for r in runs)
        if args.rates:
            print(f"{n}: goodput {goodput(runs)} req/s (SLO attainment by rate: {att})")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="benchmark a running server (default: start one, see --layout)")
    ap.add_argument("--controller-metrics", help="with --url: its controller's metrics URL (routing counters)")
    ap.add_argument("--compare", action="store_true", help="A = 1P1D (NIXL) vs B = 2 colocated, same workload")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), help="server started without --url (pd; pd2 with --kill)")
    ap.add_argument("--model", default="random", help="'demo' (embedded), 'random' (bench Llama) or an HF dir")
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "pdserve-bench" / "llama"))
    ap.add_argument("--server-args", default="", help="extra `pdserve serve` arguments, one string")
    ap.add_argument("--server-src", help="run the server from this source tree (e.g. a `git archive` snapshot)")
    ap.add_argument("--vocab", type=int, help="prompt token ids are drawn below this (default: the model's)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--rate", type=float, help="Poisson arrivals, req/s (with a trace: rescale it to this)")
    ap.add_argument("--rates", help="comma-separated rates: a sweep, for goodput")
    ap.add_argument("--concurrency", type=int, help="closed loop with this many requests in flight")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--len-spread", type=float, default=0.25, help="lengths uniform in +-this fraction")
    ap.add_argument("--mix", help="weight:input:output,... e.g. 0.85:128:128,0.15:1024:128")
    ap.add_argument("--trace", choices=["mooncake", "azure"])
    ap.add_argument("--block-scale", type=int, default=16, help="tokens per 512-token trace block")
    ap.add_argument("--time-scale", type=float, default=1.0, help="trace arrivals run this many times faster")
    ap.add_argument("--max-output-len", type=int, help="cap trace output lengths")
    # defaults ~3x a lone request of the random bench model on this CPU (1024-token prefill ~0.18 s, decode ~8 ms)
    ap.add_argument("--slo-ttft", type=float, default=0.5, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.025, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="requests before measuring (8 output tokens each)")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--client-nice", type=int, default=-5, help="load generator's niceness while measuring")
    ap.add_argument("--out", help="result name under bench/results/ (default: serve[-compare|-TRACE|-faults])")
    serve_faults.add_args(ap)
    serve_autoscale.add_args(ap)
    args = ap.parse_args()
    args.layout = args.layout or ("pd2" if args.kill else "pd")
    if args.kill and (args.compare or args.trace or (args.rates and "," in args.rates)):
        ap.error("--kill runs one layout under one steady synthetic load: no --compare, --trace or --rates")
    if args.compare and not (args.mix or args.trace):
        args.mix = INTERFERENCE_MIX
        args.rates = args.rates or (None if args.rate or args.concurrency else COMPARE_RATES)
    if args.rates:
        args.rates = [float(r) for r in args.rates.split(",")]
    elif args.rate:
        args.rates = [args.rate]
    elif not (args.concurrency or args.trace):
        args.rates = [2.0]
    served, vocab = model_args(args)
    if args.autoscale:
        meta = {"command": shlex.join(sys.argv), "source": _source(args.server_src), "workload": describe(args, vocab)}
        return serve_autoscale.run(args, served + LAYOUTS[args.layout] + shlex.split(args.server_args), vocab, meta)
    if args.kill:
        meta = {"command": shlex.join(sys.argv), "source": _source(args.server_src), "workload": describe(args, vocab)}
        return serve_faults.run(args, served + LAYOUTS[args.layout] + shlex.split(args.server_args), vocab, meta)
    started, configs = time.perf_counter(), {}
    if args.url:
        configs["server"] = {"url": args.url, "runs": bench(args.url, args, vocab, args.controller_metrics)}
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="pdserve-bench-serve-"))
        for layout in ["pd", "colocated"] if args.compare else [args.layout]:
            name = {"pd": "A_1P1D", "colocated": "B_2colocated"}[layout] if args.compare else layout
            server = Server(layout, served + LAYOUTS[layout] + shlex.split(args.server_args), log_dir, args.server_src)
            load = os.getloadavg()
            print(f"[{name}] starting (load average {load[0]:.2f}): {' '.join(server.args)}", flush=True)
            t0 = time.perf_counter()
            try:
                url = server.start()
                ready_s = time.perf_counter() - t0
                runs = bench(url, args, vocab, server.controller_url)
            finally:
                stop = server.stop()
            print(f"[{name}] ready in {ready_s:.1f} s; stopped in {stop['stop_s']:.1f} s; strays {stop['strays']}")
            configs[name] = {"server_cmd": server.cmd, "ready_s": ready_s, "stop": stop, "runs": runs}
            configs[name].update(log=str(server.log), loadavg_start=load, loadavg_end=os.getloadavg())
    wall = time.perf_counter() - started
    out = args.out or ("serve-compare" if args.compare else f"serve-{args.trace or 'synthetic'}")
    payload = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "source": _source(args.server_src),
        "workload": describe(args, vocab),
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "notes": [NOTE_SHARED_CPU, "ITL: gaps between streamed chunks, spread evenly over the tokens a chunk carries."],
        "configs": configs,
        "goodput_req_s": {n: goodput(c["runs"]) for n, c in configs.items()} if args.rates else None,
        "wall_s": wall,
        "loadavg_end": os.getloadavg(),
    }
    write_json(out, payload)  # before the report, so that a report bug loses no run
    payload["ratios_b_over_a"] = report(configs, args)
    if args.compare:
        print(f"\nnote: {NOTE_SHARED_CPU}")
    print(f"\nwall time {wall:.0f} s; load average {os.getloadavg()[0]:.2f}")
    print(f"wrote {write_json(out, payload)}")


if __name__ == "__main__":
    main()
