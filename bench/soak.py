"""Soak: a steady closed-loop load with cancellations against a P/D deployment (the demo model, in-process Ray)
for `--duration` seconds, sampling every process's RSS and every worker's held KV blocks; per series the
least-squares slope after the warm-up and whether it is within noise. Table, bench/results/soak.json and a PNG.

    python bench/soak.py                                        # 30 min, 1 prefill + 1 decode worker
    python bench/soak.py --prefill 2 --decode 2 --frontends 2   # 2P2D
    python -m bench.soak --duration 90 --sample-s 5 --warmup-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import ray

from bench.chaos import ADMIN_KEY
from bench.chaos_rounds import BACKOFF_S, Chaos, Settings, held_blocks
from bench.common import print_table, write_json
from bench.oracle import PROMPTS, diagnose, offline
from bench.soak_plot import plot
from pdserve.config import NAMESPACE, ServeConfig, worker_actor_name
from pdserve.live.faults import MODEL
from pdserve.live.inprocess import running
from pdserve.live.ports import free_ports
from pdserve.load.client import completion_body
from pdserve.load.oracle import Case, verdict
from pdserve.load.outcome import Outcome, percentiles
from pdserve.load.steady import Planned, Steady

MAX_TOKENS = (4, 16, 64)  # a cancelled stream asks for the longest and leaves after 1-4 chunks
WORDS = "prefill decode block cache lease evict token stream serve route worker batch".split()
OUTCOMES = {"ok": "completed", "left": "cancelled", "error": "errors", "unclean": "unclean", "wrong": "wrong",
            "hung": "hung"}  # fmt: skip
NOISE_PCT = 5.0  # a drift over the fitted window below this share of the mean is within noise
NOTE = (
    "held blocks: KV blocks referenced by a request (running, waiting for its KV, under a prefill lease, staged "
    "for an import) = WorkerStats.num_blocks - num_free_blocks, from each worker's stats(); blocks holding "
    "prefix-cached KV nobody references are free (evictable) and not counted; kv_usage in the controller's "
    "status is the same number over num_blocks. index_blocks: block hashes in the controller's global prefix "
    "index (bounded by the workers' cache capacity unless the index misses evictions). slope: least squares "
    "over the samples after the warm-up, per hour, with its 95% confidence interval (samples are "
    "autocorrelated, so the interval is optimistic); flat: the interval includes 0 or the fitted drift over the "
    f"window is under {NOISE_PCT:.0f}% of the mean. completed: the exact offline text; wrong: another text; "
    "hung: no end within the deadline; unclean: an error without an OpenAI error object or a cut stream."
)


def prompts(seed: int, variants: int = 16) -> list[str]:
    """Each chaos prompt as a shared prefix, bare and with suffixes of 1-240 characters (1 token per byte)."""
    rng, out = random.Random(seed), []
    for prefix in PROMPTS:
        out.append(prefix)
        for _ in range(variants - 1):
            suffix = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))[:240]
            out.append(f"{prefix} {suffix}")
    return out


def expected(texts: list[str]) -> dict[int, list[Case]]:
    """max_tokens -> the cases with the offline engine's answers (an engine of this process's own)."""
    return {m: offline(texts, m, 1)[0] for m in MAX_TOKENS}


class Load:
    """`concurrency` closed-loop clients over the frontends (pdserve.load.steady), counting how each request
    ended by the oracle's verdict."""

    def __init__(self, urls: list[str], cases: dict[int, list[Case]], args) -> None:
        self.urls, self.cases, self.args = urls, cases, args
        self.counts: Counter = Counter()
        self.latencies: list[float] = []  # completed since the last sample
        self.failures: list[str] = []  # the first few non-clean endings
        self.wrong: list[tuple[Case, str]] = []  # the first few wrong answers, for diagnose()
        seeds = random.Random(args.seed).sample(range(1 << 30), args.concurrency)
        self.rngs = [random.Random(s) for s in seeds]
        self.steady = Steady(urls, args.concurrency, self._plan, deadline_s=args.deadline, backoff_s=BACKOFF_S,
                             on_outcome=self._count)  # fmt: skip

    def _plan(self, i: int, k: int) -> Planned:
        rng = self.rngs[i]
        stream = rng.random() < 0.5
        leave = rng.randint(1, 4) if stream and rng.random() < self.args.cancel_share else None
        case = rng.choice(self.cases[MAX_TOKENS[-1] if leave else rng.choice(MAX_TOKENS)])
        return Planned(completion_body(MODEL, case.prompt, case.max_tokens, stream=stream), case, leave)

    def _count(self, out: Outcome) -> None:
        v = verdict(out, out.tag)
        self.counts[OUTCOMES[v]] += 1
        if v == "ok":
            self.latencies.append(out.e2e)
        elif v != "left":
            if v == "wrong" and len(self.wrong) < 20:
                self.wrong.append((out.tag, out.text))
            if v != "error" and len(self.failures) < 10:
                self.failures.append(f"{v} {out.kind} {out.error}"[:300])

    def start(self) -> None:
        self.steady.start()

    async def stop(self, grace_s: float) -> None:
        """No new request; those in flight get `grace_s` to end, then are cancelled (and not counted)."""
        await self.steady.stop(grace_s)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Sampler:
    """Every process's RSS and every live worker's held blocks, one dict per call."""

    def __init__(self, chaos: Chaos, load: Load, name: str) -> None:
        self.chaos, self.load, self.name, self.handles = chaos, load, name, {}
        self.samples: list[dict] = []

    async def take(self, t: float, window_s: float, drained: bool = False) -> dict:
        st = await self.chaos.status(10)
        pids = {"driver": os.getpid()}
        workers = [w for w in st["workers"] if w["state"] != "dead" and w["pid"]] if st else []
        if st is not None:
            pids["controller"] = st["controller"]["pid"]
            pids.update({f"frontend-{f['index']}": f["pid"] for f in st["frontends"] if f["pid"]})
            pids.update({w["worker_id"]: w["pid"] for w in workers})
        held = {}
        for w in workers:
            try:
                s = await asyncio.wait_for(asyncio.ensure_future(self._handle(w["worker_id"]).stats.remote()), 10)
                held[w["worker_id"]] = s.num_blocks - s.num_free_blocks
            except Exception:  # gone meanwhile: no value this time
                self.handles.pop(w["worker_id"], None)
        lat, self.load.latencies = self.load.latencies, []
        sample = {
            "t": t, "pids": pids, "rss_mb": {k: rss_mb(p) for k, p in pids.items()}, "held_blocks": held,
            "kv_usage": {w["worker_id"]: w["kv_usage"] for w in workers},
            "index_blocks": st["index_blocks"] if st else None, "counts": dict(self.load.counts),
            "completed_per_s": len(lat) / window_s if window_s > 0 else None, "latency_p50_s": percentiles(lat)["p50"],
            "drained": drained,
        }  # fmt: skip
        self.samples.append(sample)
        return sample

    def _handle(self, worker_id: str):
        if worker_id not in self.handles:
            self.handles[worker_id] = ray.get_actor(worker_actor_name(self.name, worker_id), namespace=NAMESPACE)
        return self.handles[worker_id]


def t_quantile(df: int) -> float:
    """Student's t 97.5% quantile (Cornish-Fisher expansion; within 1% for df >= 3)."""
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2) + (
        3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)  # fmt: skip


def trend(ts: list[float], ys: list[float]) -> dict:
    """Least-squares slope per hour with its 95% interval, drift over the window, and the verdict."""
    if len(ts) < 5:
        return {"slope_h": None, "ci95_h": None, "drift_pct": None, "verdict": f"n/a ({len(ts)} samples)"}
    t, y = np.asarray(ts) / 3600, np.asarray(ys, dtype=float)
    tm, ym = float(t.mean()), float(y.mean())
    sxx = float(((t - tm) ** 2).sum())
    slope = float(((t - tm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * tm)
    resid = y - intercept - slope * t
    half = t_quantile(len(ts) - 2) * float(np.sqrt((resid**2).sum() / (len(ts) - 2) / sxx))
    drift_pct = 100 * slope * float(t[-1] - t[0]) / ym if ym else 0.0
    flat = abs(slope) <= half or abs(drift_pct) < NOISE_PCT
    verdict = "flat" if flat else ("GROWS" if slope > 0 else "shrinks")
    return {"slope_h": slope, "intercept": intercept, "ci95_h": half, "drift_pct": drift_pct, "verdict": verdict}


def series_rows(samples: list[dict], field: str, key: str, warmup_s: float) -> list[dict]:
    names = list(dict.fromkeys(n for s in samples for n in s[field]))
    rows = []
    for name in names:
        pts = [(s["t"], s[field][name]) for s in samples if s[field].get(name) is not None]
        ys = [y for _, y in pts]
        after = [(t, y) for t, y in pts if t >= warmup_s]
        fit = trend([t for t, _ in after], [y for _, y in after])
        pids = list(dict.fromkeys(s["pids"][name] for s in samples if name in s.get("pids", {})))
        rows.append({key: name, "pid": ",".join(map(str, pids)), "first": ys[0], "last": ys[-1], "max": max(ys),
                     "mean": float(np.mean(ys)), "restarts": max(0, len(pids) - 1), **fit})  # fmt: skip
    return rows


async def run(args, result: dict) -> None:
    """Deploy (in the Ray this process joined), load and sample for `args.duration`, drain, check, shut down;
    fills `result` as it goes, so an interrupted run still reports what it saw."""
    port = free_ports(args.frontends)
    config = ServeConfig(
        name=f"soak{uuid.uuid4().hex[:8]}", engine={"num_kv_blocks": args.kv_blocks},
        pools={"prefill": args.prefill, "decode": args.decode}, controller={"metrics_port": 0},
        frontend={"frontends": args.frontends, "port": port, "host": "127.0.0.1", "admin_keys": [ADMIN_KEY]},
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{port + i}" for i in range(args.frontends)]
    started = time.monotonic()
    answers = asyncio.ensure_future(asyncio.to_thread(expected, prompts(args.seed)))
    load = None
    try:
        async with running(config, timeout_s=300) as live:
            result["deploy_s"] = time.monotonic() - started
            cases = await answers
            chaos = Chaos(live.dep, urls, cases[MAX_TOKENS[0]], cases[MAX_TOKENS[0]][0], Settings(leak_s=30),
                          args.seed)  # fmt: skip
            load = Load(urls, cases, args)
            try:
                await _soak(args, result, chaos, load, Sampler(chaos, load, config.name))
            finally:
                await load.stop(0.0)
                result["failures"] = load.failures
    finally:
        if load is not None and load.wrong:
            result["wrong_diagnosis"] = await asyncio.to_thread(diagnose, load.wrong)
        result["wall_s"] = time.monotonic() - started


async def _soak(args, result: dict, chaos: Chaos, load: Load, sampler: Sampler) -> None:
    result["samples"], result["load_counts"] = sampler.samples, load.counts
    t0 = time.monotonic()
    await sampler.take(0.0, 0.0)  # idle, before the load
    load.start()
    for k in range(1, int(args.duration // args.sample_s) + 1):
        await asyncio.sleep(max(0.0, t0 + k * args.sample_s - time.monotonic()))
        s = await sampler.take(time.monotonic() - t0, args.sample_s)
        rss = ", ".join(f"{name} {mb:.0f}" for name, mb in s["rss_mb"].items() if mb is not None)
        print(f"t={s['t']:.0f}s {s['counts']} held blocks {s['held_blocks']} RSS MB: {rss}", flush=True)
    await load.stop(args.deadline)
    leaks = await chaos.leaks()  # nothing held once idle (polled up to 30 s)
    result["leaks"], result["leaked_blocks"] = leaks, sum(held_blocks(r) for r in leaks)
    await sampler.take(time.monotonic() - t0, args.sample_s, drained=True)


def report(result: dict, args) -> None:
    samples = result.get("samples", [])
    if not samples:
        print("no samples")
        return
    load = [s for s in samples if not s["drained"]]
    columns = ["first", "last", "max", "mean", "slope_h", "ci95_h", "drift_pct", "verdict", "restarts"]
    result["rss"] = series_rows(load, "rss_mb", "process", args.warmup_s)
    result["held"] = series_rows(load, "held_blocks", "worker", args.warmup_s)
    index = [{"t": s["t"], "index_blocks": {"controller index": s["index_blocks"]}} for s in load]
    result["held"] += series_rows(index, "index_blocks", "worker", args.warmup_s)
    print(f"\nRSS (MB; slope in MB/hour after {args.warmup_s:.0f} s of warm-up)")
    print_table(result["rss"], ["process", "pid", *columns])
    print(f"\nheld KV blocks (of {args.kv_blocks} per worker; slope in blocks/hour), controller prefix index")
    print_table(result["held"], ["worker", *columns])
    counts = Counter(result.get("load_counts", {}))
    n = sum(counts.values())
    span = load[-1]["t"] or 1.0
    row = {**{c: counts[c] for c in OUTCOMES.values()}, "requests": n, "req_per_s": n / span}
    print(f"\nrequests over {span:.0f} s")
    print_table([row], list(row))
    result["requests"] = row
    drained = samples[-1]["held_blocks"] if samples[-1]["drained"] else "not reached (interrupted)"
    print(f"\nheld blocks once drained: {drained}; leak reports: {result.get('leaks', 'none taken')}")
    for f in result.get("failures", []):
        print(f"  failure: {f}")
    for d in result.get("wrong_diagnosis", []):
        print(f"  wrong answer: {d}")
    print(f"deployed in {result.get('deploy_s', 0):.1f} s, {result.get('wall_s', 0):.1f} s in all\n{NOTE}")


def problems(result: dict) -> list[str]:
    """What fails the soak: a series that grows, a lost or unclean request, a block held once drained."""
    out = [f"{r.get('process') or r['worker']} grows {r['slope_h']:.1f}/h" for r in result.get("rss", []) +
           result.get("held", []) if r["verdict"] == "GROWS"]  # fmt: skip
    out += [f"{n} {c}" for c in ("hung", "unclean") if (n := result.get("requests", {}).get(c))]
    # a wrong answer fails the soak unless diagnose() found the served token the offline runner-up by a
    # float32 rounding's width (greedy decoding is not batch-invariant); each one is printed either way
    ties = sum(d["near_tie"] for d in result.get("wrong_diagnosis", []))
    if (n := result.get("requests", {}).get("wrong", 0)) > ties:
        out.append(f"{n - ties} wrong (not near-ties)")
    return out + ([f"{result['leaked_blocks']} blocks held once drained"] if result.get("leaked_blocks") else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load once deployed")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are left out of the slopes")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    ap.add_argument("--cancel-share", type=float, default=0.2, help="share of streams closed after 1-4 chunks")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument("--frontends", type=int, default=1, help="HTTP frontends (clients spread over them)")
    ap.add_argument("--kv-blocks", type=int, default=256, help="engine.num_kv_blocks")
    ap.add_argument("--deadline", type=float, default=60.0, help="a request not ended by then is hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray (one per actor)")
    ap.add_argument("--out", default="soak", help="bench/results/OUT.json and OUT.png")
    args = ap.parse_args()
    result: dict = {"args": vars(args), "note": NOTE}
    ray.init(num_cpus=args.cpus, include_dashboard=False, namespace="pdserve-bench-soak")
    try:
        asyncio.run(_main(args, result))
    except (KeyboardInterrupt, asyncio.CancelledError):
        result["interrupted"] = True
        print("\ninterrupted: the deployment was shut down; reporting what was sampled")
    finally:
        ray.shutdown()
    result["load_counts"] = dict(result.get("load_counts", {}))
    report(result, args)
    print(f"\nwrote {write_json(args.out, result)}")
    png = Path(__file__).parent / "results" / f"{args.out}.png"
    if result.get("samples") and plot(result, png):
        print(f"wrote {png}")
    failed = problems(result)
    print(f"FAIL: {'; '.join(failed)}" if failed else "PASS: nothing grows, nothing lost, nothing held")
    raise SystemExit(1 if failed else 0)


async def _main(args, result: dict) -> None:
    """run(), cancelled (its `finally` shutting the deployment down) on SIGTERM as on Ctrl-C."""
    task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await run(args, result)


if __name__ == "__main__":
    main()
