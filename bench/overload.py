"""Overload: a deployment's sustainable request rate (closed loop), then `--factor` times that rate as open-loop
arrivals for `--seconds`: what it answers (200, 429 with Retry-After, 503, anything else), the latency of what
it accepted against the SLO, its queues over the burst, and how soon after the burst it serves normally.

    python -m bench.overload                      # starts `pdserve serve` (1 colocated worker, demo model)
    python -m bench.overload --url http://127.0.0.1:8000 --seconds 60 --factor 10
    python -m bench.overload --src /tmp/old       # serve another source tree (a worktree of an older commit)

The server it starts is sampled every 0.2 s through its controller's /metrics (each worker's running and
waiting requests, as its last load report gave them): the largest against `engine.max_num_seqs` and
`routing.max_waiting_per_worker`.

Admission is what the config allows: `routing.max_waiting_per_worker` queued requests per worker (beyond
`engine.max_num_seqs` running) and `frontend.max_pending` per frontend; size the first to the SLO (waiting
<= SLO x a worker's request rate) and the latency of accepted requests stays bounded."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import print_table, write_json
from pdserve.live.server import Server
from pdserve.load import arrivals
from pdserve.load.client import Client
from pdserve.load.metrics import Sampler
from pdserve.load.outcome import Outcome

MAX_RUNNING, MAX_WAITING = 16, 4  # the server this starts: one colocated worker, admission sized to the SLO
BODY = {"model": "pdserve-demo", "prompt": "overload " * 8, "max_tokens": 16, "temperature": 0, "ignore_eos": True}


@dataclass
class Answer:
    """What the overload tables count of one request (an `Outcome`, reduced)."""

    t_send: float  # seconds since the burst began
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency_s: float
    retry_after: str | None = None
    error: str = ""  # "" for any answer with a status (the status says it), "short answer", or the failure


def answer(o: Outcome, body: dict, t0: float) -> Answer:
    if o.kind == "ok":
        error = "" if o.output_tokens == body["max_tokens"] else "short answer"
    else:
        error = "" if o.kind == "http" else f"{o.kind}: {o.error}"[:200]
    return Answer(o.t_send - t0, o.status, o.e2e, o.retry_after, error)


async def closed_loop(url: str, body: dict, concurrency: int, seconds: float) -> tuple[float, int]:
    """(completed requests per second, requests refused) with `concurrency` clients, each sending its next
    request when the last is answered (after a refusal, after its Retry-After)."""
    done, refused = 0, 0

    async with Client(url, limit=concurrency, timeout_s=120) as http:

        async def step(_: int) -> None:
            nonlocal done, refused
            out = answer(await http.send(body), body, 0.0)
            done += out.status == 200 and not out.error
            if out.status in (429, 503):
                refused += 1
                await asyncio.sleep(float(out.retry_after or 1))

        start = time.perf_counter()
        await arrivals.closed_loop(concurrency, step, seconds=seconds)
    return done / (time.perf_counter() - start), refused


async def open_loop(url: str, body: dict, rate: float, seconds: float, timeout: float, probe=None) -> list[Answer]:
    """Requests sent every 1/`rate` s for `seconds`, whatever became of the earlier ones; `probe(t)` (the
    deployment's queues, say) is awaited every second meanwhile."""
    async with Client(url, timeout_s=timeout) as http:
        t0, probes = time.perf_counter(), []

        async def fire(i: int, lag: float) -> Answer:
            if probe is not None and time.perf_counter() - t0 >= len(probes):
                probes.append(asyncio.ensure_future(probe(time.perf_counter() - t0)))
            return answer(await http.send(body, send_lag=lag), body, t0)

        answers = await arrivals.open_loop(arrivals.uniform(rate, int(rate * seconds)), fire)
        await asyncio.gather(*probes)
        return answers


async def recovery(url: str, body: dict, slo_s: float, timeout_s: float = 60.0) -> float | None:
    """Seconds from now until a request is answered 200 within the SLO (None: not within `timeout_s`)."""
    start = time.perf_counter()
    async with Client(url, timeout_s=120) as http:
        while time.perf_counter() - start < timeout_s:
            out = answer(await http.send(body), body, start)
            if out.status == 200 and not out.error and out.latency_s <= slo_s:
                return time.perf_counter() - start
            await asyncio.sleep(0.2)
    return None


def summarize(outcomes: list[Answer], slo_s: float) -> dict:
    accepted = sorted(o.latency_s for o in outcomes if o.status == 200 and not o.error)
    refused = [o for o in outcomes if o.status in (429, 503)]

    def pct(q: float) -> float | None:
        return accepted[min(len(accepted) - 1, int(q * len(accepted)))] if accepted else None

    return {
        "sent": len(outcomes),
        "accepted": len(accepted),
        "refused_429": sum(o.status == 429 for o in refused),
        "refused_503": sum(o.status == 503 for o in refused),
        "refused_without_retry_after": sum(o.status == 429 and not o.retry_after for o in refused),
        "other": sum(o.status not in (200, 429, 503) or bool(o.error) for o in outcomes),
        "other_samples": sorted({f"{o.status} {o.error}" for o in outcomes if o.status not in (200, 429, 503)})[:4],
        "accepted_p50_s": pct(0.5),
        "accepted_p99_s": pct(0.99),
        "accepted_max_s": accepted[-1] if accepted else None,
        "accepted_within_slo": sum(v <= slo_s for v in accepted) / len(accepted) if accepted else None,
    }


def queue_sampler(metrics_url: str, interval_s: float, samples: list[tuple[float, int, int]]) -> Sampler:
    """Appends (t, most running, most waiting) over the workers every `interval_s`, from the controller's
    /metrics, while it runs (`async with`)."""
    names = {"pdserve_worker_running_requests": 1, "pdserve_worker_waiting_requests": 2}

    def on_sample(t: float, metrics: dict) -> None:
        row = [t, 0, 0]
        for (name, _), value in metrics.items():
            if name in names:
                row[names[name]] = max(row[names[name]], int(value))
        samples.append(tuple(row))

    return Sampler(metrics_url, interval_s, on_sample)


async def run(url: str, args, probe=None, metrics_url: str | None = None) -> dict:
    sustainable, refused = await closed_loop(url, BODY, args.concurrency, args.measure_s)
    rate = args.factor * sustainable
    print(f"sustainable {sustainable:.1f} req/s (closed loop, {args.concurrency} clients); burst {rate:.1f} req/s "
          f"for {args.seconds:.0f} s", flush=True)  # fmt: skip
    samples: list[tuple[float, int, int]] = []
    if metrics_url:
        async with queue_sampler(metrics_url, 0.2, samples):
            outcomes = await open_loop(url, BODY, rate, args.seconds, args.timeout, probe)
    else:
        outcomes = await open_loop(url, BODY, rate, args.seconds, args.timeout, probe)
    back = await recovery(url, BODY, args.slo)
    measured = {"sustainable_req_s": sustainable, "refused_while_measuring": refused, "burst_req_s": rate}
    queues = {}
    if samples:
        queues = {"queue_samples": len(samples), "max_running": max(r for _, r, _ in samples),
                  "max_waiting": max(w for _, _, w in samples)}  # fmt: skip
    return {
        **measured, "recovered_s": back, **summarize(outcomes, args.slo), **queues,
        "outcomes": [asdict(o) for o in outcomes], "queue_trace": samples,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--factor", type=float, default=10.0, help="burst rate over the sustainable rate")
    ap.add_argument("--seconds", type=float, default=60.0, help="burst length")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients measuring the sustainable rate")
    ap.add_argument("--measure-s", type=float, default=15.0)
    ap.add_argument("--slo", type=float, default=5.0, help="end-to-end latency SLO of a 16-token request, seconds")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", default="overload")
    ap.add_argument("--src", default=None, help="the pdserve source tree to serve (default: the installed one)")
    args = ap.parse_args()
    server = None
    if args.url is None:
        flags = ["--prefill-workers", "0", "--decode-workers", "0", "--colocated-workers", "1", "--engine.max-num-seqs",
                 str(MAX_RUNNING), "--routing.max-waiting-per-worker", str(MAX_WAITING)]  # fmt: skip
        server = Server("overload", flags, Path(tempfile.mkdtemp(prefix="pdserve-bench-overload-")), src=args.src)
        args.url = server.start()
    try:
        result = asyncio.run(run(args.url, args, metrics_url=server.controller_url if server else None))
    finally:
        if server is not None:
            server.stop()
    if "max_waiting" in result:
        print(f"largest sampled queue: {result['max_waiting']} waiting (bound {MAX_WAITING}), {result['max_running']} "
              f"running (bound {MAX_RUNNING}), over {result['queue_samples']} samples")  # fmt: skip
    rows = [{k: v for k, v in result.items() if k not in ("outcomes", "other_samples", "queue_trace")}]
    print_table(rows, list(rows[0]))
    print(f"other answers: {json.dumps(result['other_samples'])}")
    print(f"wrote {write_json(args.out, {'args': vars(args), **result})}")


if __name__ == "__main__":
    main()
