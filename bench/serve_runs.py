"""bench/serve.py's load: request records, the workloads (synthetic mixtures, Mooncake and Azure traces scaled
for this machine), arrivals, the HTTP load generator and the per-run summary (client side and /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
from common import percentiles, scrape

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the start of the run


@dataclass
class Result:
    input_len: int
    max_tokens: int
    status: int = 0
    error: str = ""
    error_kind: str = ""  # HTTP status, sse (error event), eof (no [DONE]), no_response, dropped (mid-stream)
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    chunks: int = 0
    send_lag: float = 0.0  # how late the client sent it (client overload shows here)
    itl: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.ttft is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# ---- workloads ----------------------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(4, vocab - 4) for _ in range(n)]  # skip the ids where models put special tokens


def workload(args, vocab: int, max_len: int, salt: str) -> tuple[list[Req], list[float] | None]:
    """Requests (and a trace's arrival times). Lengths depend on the seed only; token contents also on
    `salt`, so each run of a sweep misses the prefix cache that the runs before it filled."""
    if args.trace == "mooncake":
        return mooncake(args, vocab, max_len, salt)
    if args.trace == "azure":
        return azure(args, vocab, max_len, salt)
    return synthetic(args, vocab, max_len, salt), None


def synthetic(args, vocab: int, max_len: int, salt: str) -> list[Req]:
    mix = args.mix or f"1:{args.input_len}:{args.output_len}"
    parts = [tuple(float(x) for x in p.split(":")) for p in mix.split(",")]
    weights = [w for w, _, _ in parts]
    rng, tokens = random.Random(args.seed), random.Random(f"{args.seed}/{salt}")

    def spread(n: float) -> int:
        return max(1, round(n * rng.uniform(1 - args.len_spread, 1 + args.len_spread)))

    reqs = []
    for _ in range(args.num_requests):
        _, i, o = rng.choices(parts, weights)[0]
        out = min(spread(o), max_len - 1)
        reqs.append(Req(_tokens(tokens, min(spread(i), max_len - out), vocab), out))
    return reqs


def mooncake(args, vocab: int, max_len: int, salt: str) -> tuple[list[Req], list[float]]:
    """Hash ids -> fixed random blocks of `block_scale` tokens (seeded by the id): prefix sharing survives."""
    reqs, times, blocks = [], [], {}
    with open(TRACES / "mooncake_synthetic_trace.jsonl") as f:
        for line in f:
            if len(reqs) == args.num_requests:
                break
            row = json.loads(line)
            out = _cap_output(row["output_length"], args, max_len)
            n = min(math.ceil(row["input_length"] * args.block_scale / 512), max_len - out)
            prompt = []
            for h in row["hash_ids"]:
                if h not in blocks:
                    blocks[h] = _tokens(random.Random(f"{h}/{salt}"), args.block_scale, vocab)
                prompt += blocks[h]
            reqs.append(Req(prompt[:n], out))
            times.append(row["timestamp"] / 1000)
    return reqs, times


def azure(args, vocab: int, max_len: int, salt: str) -> tuple[list[Req], list[float]]:
    reqs, times = [], []
    with open(TRACES / "azure_llm_code_2023.csv") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i == args.num_requests:
                break
            out = _cap_output(int(row["GeneratedTokens"]), args, max_len)
            n = min(max(1, math.ceil(int(row["ContextTokens"]) * args.block_scale / 512)), max_len - out)
            reqs.append(Req(_tokens(random.Random(f"{args.seed}/{salt}/{i}"), n, vocab), out))
            stamp, frac = row["TIMESTAMP"].split(".")
            times.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + frac))
    return reqs, [t - times[0] for t in times]


def _cap_output(n: int, args, max_len: int) -> int:
    return max(1, min(n, args.max_output_len or n, max_len // 2))


def set_arrivals(reqs: list[Req], rate: float | None, trace_times: list[float] | None, args) -> float | None:
    """Poisson at `rate`; a trace keeps its own gaps, compressed by `--time-scale` or rescaled to `rate`.
    Returns the time scale applied to a trace (None for Poisson)."""
    if trace_times is not None:
        span = trace_times[-1] - trace_times[0]
        scale = args.time_scale if rate is None or span == 0 else span / (len(reqs) - 1) * rate
        for r, t in zip(reqs, trace_times):
            r.arrival = (t - trace_times[0]) / scale
        return scale
    rng, t = random.Random(args.seed + 1), 0.0
    for r in reqs:
        t += rng.expovariate(rate) if rate else 0.0
        r.arrival = t
    return None


# ---- load generation ----------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, model: str, req: Req, lag: float) -> Result:
    res = Result(len(req.prompt), req.max_tokens, send_lag=lag)
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # exact tokens per chunk (vLLM's extra); without it a chunk counts once
    }
    start, last, usage = time.perf_counter(), None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error, res.error_kind = (await r.aread()).decode(errors="replace")[:200], str(r.status_code)
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                now, chunk = time.perf_counter(), json.loads(line[6:])
                if "error" in chunk:
                    res.error, res.error_kind = str(chunk["error"])[:200], "sse"
                    break
                usage = chunk.get("usage") or usage
                n = sum(len(c.get("token_ids") or []) or bool(c.get("text")) for c in chunk.get("choices") or [])
                if not n:
                    continue
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl += [(now - last) / n] * n
                last, res.chunks, res.output_tokens = now, res.chunks + 1, res.output_tokens + n
            else:
                res.error, res.error_kind = res.error or "stream ended without [DONE]", res.error_kind or "eof"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error, res.error_kind = repr(e)[:200], "dropped" if res.status else "no_response"
    res.e2e = time.perf_counter() - start
    if usage:
        res.output_tokens = usage["completion_tokens"]
    return res


async def run_load(url: str, model: str, reqs: list[Req], concurrency: int | None, timeout: float):
    """Send `reqs`; returns their results (in order), the run's duration and the client's event-loop lags."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    lags: list[float] = []
    monitor = asyncio.create_task(_loop_lag(lags))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        if concurrency:  # closed loop: each slot sends its next request when the previous one ends
            results: list[Result] = [None] * len(reqs)
            todo = iter(enumerate(reqs))

            async def slot():
                for i, r in todo:
                    results[i] = await send(client, model, r, 0.0)

            await asyncio.gather(*(slot() for _ in range(concurrency)))
        else:
            tasks = []
            for r in reqs:
                delay = start + r.arrival - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lag = time.perf_counter() - start - r.arrival
                tasks.append(asyncio.create_task(send(client, model, r, lag)))
            results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    monitor.cancel()
    return results, duration, lags


async def _loop_lag(out: list[float], period: float = 0.01) -> None:
    """How late this process wakes up: a stalled client inflates the latencies it measures."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period)
        out.append(time.perf_counter() - t - period)


def summarize(results: list[Result], duration: float, lags: list[float], args) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    meets = [r.ok and r.ttft <= args.slo_ttft and (r.tpot is None or r.tpot <= args.slo_tpot) for r in results]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({f"{r.status} {r.error}"[:120] for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": tokens / duration,
        "ttft": percentiles([r.ttft for r in ok]),
        "itl": percentiles([g for r in ok for g in r.itl]),
        "max_itl": percentiles([max(r.itl) for r in ok if r.itl]),  # each request's worst stall
        "tpot": percentiles(tpots),
        "e2e": percentiles([r.e2e for r in ok]),
        "slo_attainment": sum(meets) / len(results),
        "ttft_attainment": sum(r.ok and r.ttft <= args.slo_ttft for r in results) / len(results),
        "tpot_attainment": sum(r.ok and (r.tpot or 0) <= args.slo_tpot for r in results) / len(results),
        "tokens_per_chunk": tokens / max(1, sum(r.chunks for r in ok)),
        "max_send_lag_s": max(r.send_lag for r in results),
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
    out = {}
    for url in filter(None, urls):
        with contextlib.suppress(httpx.HTTPError):
            out |= scrape(url)
    return out


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
