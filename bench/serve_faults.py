"""bench/serve.py's fault mode (`--kill ROLE,...`): under a steady load, SIGKILL one process of each role in
turn (prefill, decode or colocated worker, HTTP frontend, controller) and measure the time until the deployment
is back at full strength and what became of the requests in flight at the kill. A no-kill control row first.

The deployment is watched through Ray (its controller's `status`), polled every `POLL_S`."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.common import print_table, write_json
from bench.serve_runs import Req, body, workload
from pdserve.live.server import Server
from pdserve.load import arrivals
from pdserve.load.client import Client, get_json
from pdserve.load.metrics import scrape_now
from pdserve.load.outcome import Outcome

KILLABLE = ("prefill", "decode", "colocated", "frontend", "controller")
POLL_S = 0.1
VICTIM_WAIT_S = 5.0
BACKOFF_S = 0.1  # a closed-loop client waits this long after an error (no hot loop of refusals)
NOTE = (
    "recovered_s: SIGKILL until every role's ready workers == its target, every frontend ready and the victim "
    "replaced (controller status, polled every 0.1 s); on_victim: running + waiting on the killed worker by its "
    "last report (the busiest of its role is killed); detected_s: until the status first showed the victim gone. "
    "in_flight: requests sent before the kill and not finished at it; short: 200s with fewer tokens than asked "
    "(ignore_eos, so a complete answer has max_tokens). Errors by kind: HTTP status, sse (an error event), eof "
    "(no [DONE]), no_response (no connection or no response headers), dropped (connection lost mid-stream). "
    "window: the kill to the recovery, at least --settle s; started_*: requests sent in it; ok/s: successful "
    "completions per second in it, and that over the no-kill control's (a window of --settle s with no kill)."
)


def add_args(ap) -> None:
    g = ap.add_argument_group("fault mode")
    g.add_argument("--kill", help=f"SIGKILL one process of each, in turn: comma-separated of {', '.join(KILLABLE)}")
    g.add_argument("--kill-warmup", type=float, default=10.0, help="seconds of load before the control row")
    g.add_argument("--settle", type=float, default=5.0, help="seconds of load after a recovery (and the control)")
    g.add_argument("--recovery-timeout", type=float, default=300.0, help="seconds; the run stops past it")
    g.add_argument("--ray-address", default="auto", help="with --url: the deployment's Ray cluster")
    g.add_argument("--deployment", default="pdserve", help="with --url: the deployment's name")


@dataclass
class Sent:
    start: float
    req: Req
    end: float | None = None
    result: Outcome | None = None


class Load:
    """Closed loop (`concurrency` clients) or Poisson arrivals at `rate`, until `stop` is set."""

    def __init__(self, url: str, model: str, reqs, concurrency: int | None, rate: float, timeout: float) -> None:
        self.url, self.model, self.reqs, self.timeout = url, model, reqs, timeout
        self.concurrency, self.rate = concurrency, rate
        self.sent: list[Sent] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with Client(self.url, timeout_s=self.timeout) as client:
            if self.concurrency:

                async def slot(_: int) -> None:
                    if not (await self._one(client)).ok:
                        await asyncio.sleep(BACKOFF_S)

                await arrivals.closed_loop(self.concurrency, slot, stop=self.stop)
            else:
                times = arrivals.poisson(self.rate, seed=1)
                await arrivals.open_loop(times, lambda i, lag: self._one(client, lag), stop=self.stop)

    async def _one(self, client: Client, lag: float = 0.0) -> Outcome:
        s = Sent(time.perf_counter(), next(self.reqs))
        self.sent.append(s)
        s.result = await client.send(body(self.model, s.req), send_lag=lag, tag=s.req)
        s.end = time.perf_counter()
        return s.result


def _requests(args, vocab: int, max_len: int):
    for k in itertools.count():  # fresh token contents each pass: no prefix-cache hits across passes
        yield from workload(args, vocab, max_len, f"faults/{k}")[0]


# ---- the deployment's state ----------------------------------------------------------------------------


async def status(controller, timeout: float = 5.0) -> dict | None:
    """The controller's status, or None while it does not answer (e.g. restarting)."""
    try:
        return await asyncio.wait_for(asyncio.ensure_future(controller.status.remote()), timeout)
    except Exception:
        return None


def pick_victim(st: dict, role: str) -> tuple[str, int, int | None]:
    """(id, pid, its requests by its last report): the controller, frontend 0 (the one under load), or the
    busiest ready worker of `role`."""
    if role == "controller":
        return "controller", st["controller"]["pid"], None
    if role == "frontend":
        f = min((f for f in st["frontends"] if f["state"] == "ready"), key=lambda f: f["index"])
        return f"frontend-{f['index']}", f["pid"], None
    workers = [w for w in st["workers"] if w["role"] == role and w["state"] == "ready"]
    if not workers:
        raise SystemExit(f"--kill {role}: the deployment has no ready {role} worker (targets {st['targets']})")
    w = max(workers, key=lambda w: (w["running"] + w["waiting"], w["worker_id"]))
    return w["worker_id"], w["pid"], w["running"] + w["waiting"]


def gone(st: dict, victim: str, pid: int) -> bool:
    """The status no longer shows the victim alive."""
    if victim == "controller":
        return st["controller"]["pid"] != pid
    if victim.startswith("frontend-"):
        f = [f for f in st["frontends"] if f"frontend-{f['index']}" == victim]
        return not f or f[0]["pid"] != pid or f[0]["state"] != "ready"
    return all(w["state"] == "dead" for w in st["workers"] if w["worker_id"] == victim)


def full_strength(st: dict, frontends: int) -> bool:
    ready = Counter(w["role"] for w in st["workers"] if w["state"] == "ready")
    fronts = [f for f in st["frontends"] if f["state"] == "ready"]
    return all(ready[r] == n for r, n in st["targets"].items()) and len(fronts) == frontends


COUNTERS = {"pdserve_request_retries_total": "retries", "pdserve_worker_deaths_total": "deaths"}


def counters(url: str, metrics_url: str | None) -> Counter:
    """The frontend's retries by cause, the controller's worker deaths by role and cause ({} while down)."""
    out: Counter = Counter()
    for u in (url, metrics_url):
        for (name, labels), v in scrape_now(u).items():
            if name in COUNTERS:
                out[":".join([COUNTERS[name], *(v for _, v in labels)])] += v
    return out


# ---- one kill -----------------------------------------------------------------------------------------


async def kill_one(role: str, controller, url: str, metrics_url: str | None, args) -> dict:
    """SIGKILL one process of `role` (a worker with requests on it: waits up to VICTIM_WAIT_S for one) and
    wait until the deployment is back at full strength."""
    deadline = time.perf_counter() + VICTIM_WAIT_S
    while (st := await status(controller)) is None or (
        pick_victim(st, role)[2] == 0 and time.perf_counter() < deadline
    ):
        await asyncio.sleep(POLL_S)
    victim, pid, load = pick_victim(st, role)
    frontends, before = len(st["frontends"]), counters(url, metrics_url)
    if not Path(f"/proc/{pid}").exists():
        raise SystemExit(f"--kill {role}: pid {pid} of {victim} is not on this machine")
    t0, detected = time.perf_counter(), None
    os.kill(pid, signal.SIGKILL)
    print(f"  killed {victim} (pid {pid})", flush=True)
    while True:
        await asyncio.sleep(POLL_S)
        st = await status(controller)  # a call to a restarting controller waits for the restart
        now = time.perf_counter()  # when the answer came, not when it was asked
        if now - t0 > args.recovery_timeout:
            raise SystemExit(f"--kill {role}: not back at full strength {args.recovery_timeout:.0f} s after the kill")
        if st is None:
            continue
        if detected is None and gone(st, victim, pid):
            detected = now
        if detected is not None and full_strength(st, frontends):
            break
    print(f"  back at full strength after {now - t0:.1f} s", flush=True)
    await asyncio.sleep(args.settle)
    after = counters(url, metrics_url)  # a restarted process counts from 0 again
    delta = {k: v - before[k] if v >= before[k] else v for k, v in after.items()}
    row = {"kill": role, "victim": victim, "pid": pid, "on_victim": load, "t_kill": t0, "t_recovered": now}
    row.update(detected_s=detected - t0, recovered_s=now - t0, counters={k: v for k, v in delta.items() if v})
    return row


def outcome(row: dict, sent: list[Sent], min_window: float) -> dict:
    """What became of the requests in flight at the kill, and of those sent before the recovery."""
    t0 = row["t_kill"]
    t1 = max(row["t_recovered"], t0 + min_window)
    inflight = [s for s in sent if s.start <= t0 and (s.end is None or s.end > t0)]
    during = [s for s in sent if t0 < s.start <= t1]
    ok = [s for s in inflight if s.result.ok]
    done_ok = [s for s in sent if s.result.ok and t0 < s.end <= t1]

    def errors(group):
        kinds = Counter(s.result.error_kind or "other" for s in group if not s.result.ok)
        return " ".join(f"{k}={n}" for k, n in sorted(kinds.items())) or "-"

    return {
        "in_flight": len(inflight),
        "in_flight_ok": len(ok),
        "ok_share": len(ok) / len(inflight) if inflight else None,
        "short": sum(s.result.output_tokens < s.req.max_tokens for s in ok),
        "errors": errors(inflight),
        "started": len(during),
        "started_ok": sum(s.result.ok for s in during),
        "started_errors": errors(during),
        "window_s": t1 - t0,
        "ok_per_s": len(done_ok) / (t1 - t0),
        "in_flight_e2e_max_s": max((s.result.e2e for s in ok), default=None),
        "error_samples": sorted({s.result.error[:160] for s in inflight + during if not s.result.ok})[:4],
    }


# ---- the run ------------------------------------------------------------------------------------------


async def drive(url: str, metrics_url: str | None, controller, roles: list[str], args, vocab: int) -> dict:
    info = get_json(f"{url}/v1/models")["data"][0]
    reqs = _requests(args, vocab, info.get("max_model_len") or 4096)
    rate = None if args.concurrency else (args.rates or [2.0])[0]
    load = Load(url, info["id"], reqs, args.concurrency, rate, args.timeout)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(args.kill_warmup)
    t0 = time.perf_counter()
    await asyncio.sleep(args.settle)
    control = {"kill": "none", "t_kill": t0, "t_recovered": t0 + args.settle, "counters": {}}
    rows, status_before = [control], await status(controller)
    for role in roles:
        rows.append(await kill_one(role, controller, url, metrics_url, args))
    load.stop.set()
    await task
    base = None
    for row in rows:
        row.update(outcome(row, load.sent, args.settle))
        base = base or row["ok_per_s"]
        row["ok_per_s_vs_none"] = row["ok_per_s"] / base if base and row["ok_per_s"] is not None else None
    t_start = load.sent[0].start
    requests = [{"start": s.start - t_start, "end": s.end - t_start, "status": s.result.status,
                 "error": s.result.error[:120], "output_tokens": s.result.output_tokens,
                 "max_tokens": s.req.max_tokens, "ttft": s.result.ttft} for s in load.sent]  # fmt: skip
    for row in rows:  # times relative to the first request
        row["t_kill"], row["t_recovered"] = row["t_kill"] - t_start, row["t_recovered"] - t_start
    return {"rows": rows, "status_before": status_before, "status_after": await status(controller),
            "requests": requests}  # fmt: skip


COLUMNS = """kill victim pid on_victim detected_s recovered_s in_flight in_flight_ok ok_share short errors window_s
started started_ok started_errors ok_per_s ok_per_s_vs_none retries""".split()


def run(args, server_args: list[str], vocab: int, meta: dict) -> None:
    """Start the server (unless --url), run the kills, print the table and write bench/results/OUT.json."""
    roles = args.kill.split(",")
    if bad := [r for r in roles if r not in KILLABLE]:
        raise SystemExit(f"--kill: unknown role(s) {bad}; choose from {KILLABLE}")
    server, started = None, time.perf_counter()
    if args.url:
        url, metrics_url, address, name = args.url, args.controller_metrics, args.ray_address, args.deployment
    else:
        server = Server("faults", server_args, Path(tempfile.mkdtemp(prefix="pdserve-bench-faults-")), args.server_src)
        print(f"[faults] starting: {' '.join(server_args)}", flush=True)
        url = server.start()
        metrics_url, address, name = server.controller_url, server.ray_address(), "pdserve"
        if address is None:
            server.stop()
            raise SystemExit(f"no Ray cluster found in the server's session (log {server.log})")
    if server:  # its local Ray enabled token auth by default (RAY_AUTH_MODE unset, inherited from here); Ray
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # turns it on for a driver only with address "auto"
    import ray  # after RAY_AUTH_MODE: Ray reads it once

    try:
        ray.init(address=address, namespace="pdserve", log_to_driver=False, logging_level="ERROR")
        controller = ray.get_actor(f"{name}.controller", namespace="pdserve")
        result = asyncio.run(drive(url, metrics_url, controller, roles, args, vocab))
    finally:
        ray.shutdown()
        stop = server.stop() if server else {}
    for row in result["rows"]:
        retries = sorted((k.split(":", 1)[1], v) for k, v in row["counters"].items() if k.startswith("retries:"))
        row["retries"] = " ".join(f"{k}={v:g}" for k, v in retries) or "-"
    print(f"\n== kills under load ({_load_label(args)}); {args.settle:.0f} s settle after each recovery")
    print_table(result["rows"], COLUMNS)
    for row in result["rows"][1:]:
        deaths = {k[7:]: v for k, v in row["counters"].items() if k.startswith("deaths:")}
        print(f"{row['kill']}: worker deaths (role:cause) {deaths or '-'}; errors seen {row['error_samples'] or '-'}")
    print(f"\nnote: {NOTE}")
    faults = {k: getattr(args, k) for k in ("kill", "kill_warmup", "settle", "layout", "concurrency")}
    payload = {**meta, "faults": faults, "notes": [NOTE], "server_cmd": server.cmd if server else None,
               "log": str(server.log) if server else None, "stop": stop, **result,
               "wall_s": time.perf_counter() - started}  # fmt: skip
    print(f"wrote {write_json(args.out or 'serve-faults', payload)}")


def _load_label(args) -> str:
    return f"closed loop, concurrency {args.concurrency}" if args.concurrency else f"Poisson {args.rates[0]} req/s"
