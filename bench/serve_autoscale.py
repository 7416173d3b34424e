"""bench/serve.py's autoscaling mode (`--autoscale`): a deployment started with `pdserve serve --autoscale`
(its own local Prometheus) gets a load ramp, phase by phase (`--ramp SECONDS:CONCURRENCY,...`, the last phase
lasting until the pools are back at their minimum), and the run records the scale-out and scale-in timeline:
each decision, when the worker it asked for was ready and when it served its first request, and what became
of every request (lost: any that did not complete). On 2 shared cores this shows the mechanics (how long each
step takes, that nothing is lost), not capacity.

The deployment is watched through Ray (its controller's `status` and `autoscaler_decisions`), every `POLL_S`."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import print_table, write_json
from bench.serve_faults import Load, _requests, status
from pdserve.live.server import Server
from pdserve.load.client import get_json

POLL_S = 0.25
DEFAULT_RAMP = "20:1,60:8,0:0"
NOTE = (
    "2 shared CPU cores run the load generator, Prometheus, the controller and every worker: this shows the "
    "mechanics (decision -> worker ready -> first request served; drains; nothing lost), not capacity. "
    "t_*: seconds since the run's first request. to_ready_s / to_serving_s: from the decision to the new "
    "worker's first ready status / first served request (its requests_total > 0), polled every 0.25 s."
)
# Demo-model scale: one CPU decode worker carries a few tens of tokens/s; windows short enough for a run of
# minutes (the defaults are for GPUs and minutes-long windows). Any of these can be overridden by --server-args.
AUTOSCALE_ARGS = [
    "--autoscale", "--autoscaling.interval-s", "2", "--autoscaling.decode-tokens-per-worker", "120",
    "--autoscaling.min-prefill", "1", "--autoscaling.max-prefill", "2", "--autoscaling.min-decode", "1",
    "--autoscaling.max-decode", "3", "--autoscaling.scale-in-window-s", "30", "--autoscaling.cooldown-s", "5",
    "--autoscaling.ttft-slo-s", "30", "--autoscaling.tpot-slo-s", "2",
]  # fmt: skip


def add_args(ap) -> None:
    g = ap.add_argument_group("autoscaling mode")
    g.add_argument("--autoscale", action="store_true", help="ramp the load on an autoscaled deployment")
    g.add_argument("--ramp", default=DEFAULT_RAMP, help="SECONDS:CONCURRENCY,... (last: until back at min)")
    g.add_argument("--back-timeout", type=float, default=300.0, help="seconds the last phase waits for min")


def parse_ramp(spec: str) -> list[tuple[float, int]]:
    phases = []
    for part in spec.split(","):
        seconds, _, conc = part.partition(":")
        phases.append((float(seconds), int(conc)))
    if not phases or any(s < 0 or c < 0 for s, c in phases):
        raise SystemExit(f"--ramp {spec!r}: SECONDS:CONCURRENCY pairs, both >= 0")
    return phases


class Watch:
    """Polls the controller: ready/starting/draining workers per role over time, each worker's first ready
    and first served request, and the autoscaler's decisions."""

    def __init__(self, controller) -> None:
        self.controller, self.samples, self.first_ready, self.first_served = controller, [], {}, {}
        self.stop = asyncio.Event()

    async def run(self, t0: float) -> None:
        while not self.stop.is_set():
            st = await status(self.controller)
            now = time.perf_counter() - t0
            if st is not None:
                count = Counter((w["role"], w["state"]) for w in st["workers"])
                self.samples.append({"t": now, **{f"{r}_{s}": n for (r, s), n in count.items()}})
                for w in st["workers"]:
                    if w["state"] == "ready":
                        self.first_ready.setdefault(w["worker_id"], (now, w["role"]))
                        if w.get("requests_total"):
                            self.first_served.setdefault(w["worker_id"], now)
            await asyncio.sleep(POLL_S)

    def ready(self, role: str) -> int:
        return self.samples[-1].get(f"{role}_ready", 0) if self.samples else 0

    def busy(self) -> bool:
        last = self.samples[-1] if self.samples else {}
        return any(v for k, v in last.items() if k.endswith(("_starting", "_draining")))


async def drive(url: str, controller, args, vocab: int) -> dict:
    info = get_json(f"{url}/v1/models")["data"][0]
    reqs = _requests(args, vocab, info.get("max_model_len") or 4096)
    watch, t0 = Watch(controller), time.perf_counter()
    initial = {w["worker_id"] for w in (await status(controller))["workers"]}
    watcher = asyncio.create_task(watch.run(t0))
    phases, loads, marks = parse_ramp(args.ramp), [], []
    base = await controller.autoscaler_decisions.remote()
    for i, (seconds, conc) in enumerate(phases):
        marks.append({"phase": i, "concurrency": conc, "t_start": time.perf_counter() - t0})
        load = None
        if conc:
            load = Load(url, info["id"], reqs, conc, 0.0, args.timeout)
            loads.append(load)
            task = asyncio.create_task(load.run())
        last = i == len(phases) - 1
        deadline = time.perf_counter() + (args.back_timeout if last and not seconds else seconds)
        while time.perf_counter() < deadline:
            await asyncio.sleep(1.0)
            if last and not seconds and at_min(watch, args) and not watch.busy():
                break
        if load is not None:
            load.stop.set()
            await task
        marks[-1]["t_end"] = time.perf_counter() - t0
    watch.stop.set()
    await watcher
    decisions = [d for d in await controller.autoscaler_decisions.remote() if d not in base]
    t_wall0 = time.time() - (time.perf_counter() - t0)
    events = timeline(decisions, t_wall0, watch, initial)
    for mark in marks:  # what the autoscaler saw in each phase (Prometheus' rates lag the load by their window)
        seen = [d["signals"].get("decode_tokens_per_s") for d in decisions
                if "signals" in d and mark["t_start"] <= d["time"] - t_wall0 < mark["t_end"]]  # fmt: skip
        seen = [v for v in seen if v is not None]
        mark["decode_tok_s_max"] = max(seen) if seen else None
    sent = [s for load in loads for s in load.sent]
    lost = [s for s in sent if not s.result.ok or s.result.output_tokens < s.result.max_tokens]
    return {"phases": marks, "events": events, "samples": watch.samples, "requests": len(sent),
            "requests_ok": len(sent) - len(lost), "lost": len(lost),
            "lost_samples": sorted({s.result.error[:160] for s in lost})[:4],
            "back_at_min": at_min(watch, args)}  # fmt: skip


def at_min(watch: Watch, args) -> bool:
    return watch.ready("decode") <= args.min_decode and watch.ready("prefill") <= args.min_prefill


def timeline(decisions: list[dict], t_wall0: float, watch: Watch, initial: set[str]) -> list[dict]:
    """Every action the autoscaler took, with when the worker it added became ready and served."""
    new = sorted((t, wid, role) for wid, (t, role) in watch.first_ready.items() if wid not in initial)
    rows = []
    for d in decisions:
        if d["action"] == "hold":
            continue
        t = d["time"] - t_wall0
        row = {"t_decision": t, "action": d["action"], "reason": d["reason"],
               "targets": " ".join(f"{r[0]}{n}" for r, n in d["targets"].items() if n)}  # fmt: skip
        if d["action"] in ("scale_out", "flip"):
            added = next(((tr, wid) for tr, wid, _ in new if tr >= t), None)
            if added is not None:
                new = [x for x in new if x[1] != added[1]]
                row.update(worker=added[1], to_ready_s=added[0] - t)
                if added[1] in watch.first_served:
                    row["to_serving_s"] = watch.first_served[added[1]] - t
        rows.append(row)
    return rows


def run(args, server_args: list[str], vocab: int, meta: dict) -> None:
    server_args = AUTOSCALE_ARGS + server_args
    flags = dict(zip(server_args, server_args[1:]))
    args.min_decode = int(flags.get("--autoscaling.min-decode", 1))
    args.min_prefill = int(flags.get("--autoscaling.min-prefill", 0))
    log_dir = Path(tempfile.mkdtemp(prefix="pdserve-bench-autoscale-"))
    server = Server("autoscale", server_args, log_dir, args.server_src)
    print(f"[autoscale] starting: {' '.join(server_args)}", flush=True)
    started = time.perf_counter()
    url = server.start()
    address = server.ray_address()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    try:
        ray.init(address=address, namespace="pdserve", log_to_driver=False, logging_level="ERROR")
        controller = ray.get_actor("pdserve.controller", namespace="pdserve")
        result = asyncio.run(drive(url, controller, args, vocab))
    finally:
        ray.shutdown()
        stop = server.stop()
    print("\n== load phases")
    print_table(result["phases"], ["phase", "concurrency", "t_start", "t_end", "decode_tok_s_max"])
    print("\n== autoscaler actions")
    print_table(result["events"], ["t_decision", "action", "reason", "targets", "worker", "to_ready_s", "to_serving_s"])
    print(f"\nrequests {result['requests']}, ok {result['requests_ok']}, lost {result['lost']} "
          f"{result['lost_samples'] or ''}; back at min: {result['back_at_min']}")  # fmt: skip
    print(f"note: {NOTE}")
    payload = {**meta, "ramp": args.ramp, "notes": [NOTE], "server_cmd": server.cmd, "log": str(server.log),
               "stop": stop, **result, "wall_s": time.perf_counter() - started}  # fmt: skip
    print(f"wrote {write_json(args.out or 'serve-autoscale', payload)}")
