"""One run of bench/serve.py: its workload (pdserve.load.bodies: synthetic mixtures, Mooncake and Azure traces
scaled for this machine), its arrivals and load (pdserve.load), and the run's summary, client side (SLO
attainment) and from /metrics."""

from __future__ import annotations

import asyncio
import time

from pdserve.load import arrivals, bodies
from pdserve.load.bodies import Req
from pdserve.load.client import Client, completion_body
from pdserve.load.metrics import scrape_now
from pdserve.load.outcome import Outcome, percentiles
from pdserve.load.outcome import summarize as summarize_outcomes

__all__ = ["Req", "run_load", "scrape_all", "server_side", "set_arrivals", "summarize", "workload"]


def workload(args, vocab: int, max_len: int, salt: str) -> tuple[list[Req], list[float] | None]:
    """Requests (and a trace's arrival times). Lengths depend on the seed only; token contents also on
    `salt`, so each run of a sweep misses the prefix cache that the runs before it filled."""
    if args.trace == "mooncake":
        return bodies.mooncake(args.num_requests, vocab, max_len, block_scale=args.block_scale, salt=salt,
                               max_output=args.max_output_len)  # fmt: skip
    if args.trace == "azure":
        return bodies.azure(args.num_requests, vocab, max_len, block_scale=args.block_scale, seed=args.seed,
                            salt=salt, max_output=args.max_output_len)  # fmt: skip
    mix = args.mix or f"1:{args.input_len}:{args.output_len}"
    return bodies.synthetic(args.num_requests, mix, vocab, max_len, seed=args.seed, salt=salt,
                            spread=args.len_spread), None  # fmt: skip


def set_arrivals(reqs: list[Req], rate: float | None, trace_times: list[float] | None, args) -> float | None:
    """Poisson at `rate`; a trace keeps its own gaps, compressed by `--time-scale` or rescaled to `rate`.
    Returns the time scale applied to a trace (None for Poisson)."""
    if trace_times is not None:
        scale = args.time_scale if rate is None else arrivals.scale_to_rate(trace_times, rate)
        for r, t in zip(reqs, arrivals.replay(trace_times, scale)):
            r.arrival = t
        return scale
    times = arrivals.poisson(rate, args.seed + 1) if rate else (0.0 for _ in reqs)
    for r, t in zip(reqs, times):
        r.arrival = t
    return None


def body(model: str, req: Req) -> dict:
    # return_token_ids: exact tokens per chunk (vLLM's extra); without it a chunk counts once
    return completion_body(model, req.prompt, req.max_tokens, stream=True, return_token_ids=True,
                           stream_options={"include_usage": True})  # fmt: skip


async def run_load(url: str, model: str, reqs: list[Req], concurrency: int | None, timeout: float):
    """Send `reqs`; returns their outcomes (in order), the run's duration and the client's event-loop lags."""
    lags: list[float] = []
    monitor = asyncio.create_task(_loop_lag(lags))
    async with Client(url, timeout_s=timeout) as client:
        start = time.perf_counter()
        if concurrency:  # closed loop: each slot sends its next request when the previous one ends
            results: list[Outcome] = [None] * len(reqs)
            todo = arrivals.from_list(reqs)

            async def step(_: int) -> bool:
                if (item := todo()) is None:
                    return False
                i, r = item
                results[i] = await client.send(body(model, r), tag=r)
                return True

            await arrivals.closed_loop(concurrency, step)
        else:

            async def fire(i: int, lag: float) -> Outcome:
                return await client.send(body(model, reqs[i]), send_lag=lag, tag=reqs[i])

            results = await arrivals.open_loop([r.arrival for r in reqs], fire)
        duration = time.perf_counter() - start
    monitor.cancel()
    return results, duration, lags


async def _loop_lag(out: list[float], period: float = 0.01) -> None:
    """How late this process wakes up: a stalled client inflates the latencies it measures."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period)
        out.append(time.perf_counter() - t - period)


def summarize(results: list[Outcome], duration: float, lags: list[float], args) -> dict:
    """pdserve.load's summary, with the SLO attainments and the client's event-loop lag."""
    s = summarize_outcomes(results, duration)
    meets = [r.ok and r.ttft <= args.slo_ttft and (r.tpot is None or r.tpot <= args.slo_tpot) for r in results]
    s.pop("by_kind")
    return s | {
        "slo_attainment": sum(meets) / len(results),
        "ttft_attainment": sum(r.ok and r.ttft <= args.slo_ttft for r in results) / len(results),
        "tpot_attainment": sum(r.ok and (r.tpot or 0) <= args.slo_tpot for r in results) / len(results),
        "client_loop_lag": percentiles(lags),
    }


# ---- the server's own view (/metrics), diffed around a run -------------------------------------------

HISTOGRAMS = {
    "ttft": "pdserve_time_to_first_token_seconds",
    "ttft_queue": "pdserve_ttft_queue_seconds",
    "ttft_prefill": "pdserve_ttft_prefill_seconds",
    "kv_transfer": "pdserve_kv_transfer_seconds",
    "itl": "pdserve_inter_token_latency_seconds",
}


def scrape_all(*urls: str | None) -> dict[tuple, float]:
    """The counters of the frontend and the controller (routing decisions), or nothing from one that does
    not answer (the run still reports its client side)."""
    return scrape_now(*urls)


def server_side(before: dict, after: dict) -> dict:
    """Means and bucket-bound p99s of the server's latency histograms over one run, KV bytes moved and
    where prompts were prefilled (a sanity check that A really disaggregated)."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict = {"kv_transfer_bytes": delta.get(("pdserve_kv_transfer_bytes_total", ()), 0.0)}
    for key, name in HISTOGRAMS.items():
        count = delta.get((f"{name}_count", ()), 0.0)
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in delta.items() if k[0] == f"{name}_bucket")
        mean = delta.get((f"{name}_sum", ()), 0.0) / count if count else None
        out[key] = {"count": count, "mean": mean, "buckets": buckets}
        for q in (0.99, 0.999):  # the bucket bound at or above the quantile
            out[key][f"p{100 * q:g}_le"] = next((le for le, c in buckets if count and c >= q * count), None)
    out["decisions"] = {
        dict(k[1])["decision"]: v for k, v in delta.items() if k[0] == "pdserve_disaggregation_decisions_total" and v
    }
    return out
