"""Chaos benchmark: 2 prefill + 2 decode workers behind two HTTP frontends (the demo model, in-process Ray)
under a steady checked load, with one fault per round: SIGKILL a worker, a frontend or the controller; SIGSTOP
a worker past its heartbeat timeout; SIGSTOP a frontend or the controller, left stopped until it is found hung
(no answer to pings) and replaced or restarted; a failed KV transfer; clients leaving mid-stream; a scale-in and an
operator migration, each racing a SIGKILL. After each round the invariants: no request lost (a wrong text or a
hang), every error clean (an OpenAI error object, or a dropped connection to the frontend that was killed),
back at full strength within a bound, and no KV block held once the load is drained.

    python bench/chaos.py                                   # 30 min, a fault every 20 s
    python -m bench.chaos --duration 120 --interval 15 --faults kill_worker,hang_worker --seed 3

The rounds are bench/chaos_rounds.py's, the faults pdserve.live.faults', the load pdserve.load's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import ray

from bench.chaos_rounds import Chaos, Settings
from bench.common import print_table, write_json
from bench.oracle import PROMPTS, offline
from pdserve.config import ServeConfig
from pdserve.live.faults import FAULTS
from pdserve.live.inprocess import running
from pdserve.live.ports import free_ports
from pdserve.load.outcome import percentiles

ADMIN_KEY = "chaos-admin-key"
# faults after which the deployment is short of a worker, a frontend or its controller for a while
WEAKENING = ("kill_worker", "kill_frontend", "kill_controller", "hang_worker", "hang_frontend", "hang_controller",
             "scale_in", "migrate")  # fmt: skip
ROUND_COLUMNS = [
    "round", "fault", "victim", "fired", "requests", "served", "errors", "lost", "unclean", "left", "retries",
    "slowest_s", "recovered_s", "round_s", "leaked_blocks", "ok",
]  # fmt: skip
NOTE = (
    "fired: the fault took effect (a transfer failed and was retried, the smaller size was reached, the "
    "migration was asked before the stream ended); requests: completions finished in the round (load + the "
    "fault's own); served: exactly the offline text; errors: clean errors (OpenAI error object over HTTP or "
    "SSE, or the connection to a killed frontend); lost: a wrong text or no end within the deadline; unclean: "
    "any other ending (a stream cut without [DONE], an error without an error object, a connection error on a "
    "live frontend); left: streams the client closed on purpose; retries: the frontends' request retries in "
    "the round (reset when a frontend restarts); slowest_s: the round's slowest completion, however it ended; "
    "recovered_s: from the fault to ready workers == targets and every frontend ready; leaked_blocks: KV "
    "blocks still referenced on ready workers once the load was drained."
)


def chaos_config(name: str, port: int, worker_timeout_s: float = 3.0, **sections) -> ServeConfig:
    """2 prefill + 2 decode workers on the demo model behind two HTTP frontends (port, port + 1), with an
    admin key for /admin/migrate and short heartbeat and ping timeouts so hangs are found quickly."""
    sections.setdefault("controller", {"metrics_port": 0})
    return ServeConfig(
        name=name, engine={"num_kv_blocks": 256}, pools={"prefill": 2, "decode": 2},
        frontend={"frontends": 2, "port": port, "host": "127.0.0.1", "admin_keys": [ADMIN_KEY]},
        failure={"worker_timeout_s": worker_timeout_s, "frontend_timeout_s": 3.0, "controller_timeout_s": 8.0},
        **sections,
    )  # fmt: skip


def plan(kinds: list[str], rng: random.Random) -> Iterator[str]:
    """Every kind once in a shuffled order, again and again."""
    while True:
        order = list(kinds)
        rng.shuffle(order)
        yield from order


async def run(
    kinds: Iterable[str], settings: Settings, *, seed: int = 0, duration_s: float = float("inf"),
    worker_timeout_s: float = 3.0, max_tokens: int = 32, long_max_tokens: int = 160,
    on_round: Callable[[dict], None] = print,
) -> dict:  # fmt: skip
    """Deploy (in the Ray this process joined), run a round per kind until `duration_s`, shut down."""
    port = free_ports(2)
    config = chaos_config(
        f"chaos{uuid.uuid4().hex[:8]}", port, worker_timeout_s,
        # every prompt not wholly cached on its decode worker goes through a prefill worker and a KV handoff
        # (by default a decode worker prefills a cached prompt's short tail itself: no handoff to break)
        routing={"disagg": {"local_prefill_max_tokens": 0}},
    )  # fmt: skip
    urls = [f"http://127.0.0.1:{port + i}" for i in range(config.frontend.frontends)]
    rounds: list[dict] = []
    started = time.monotonic()
    # the offline run's answers while the deployment starts (an engine of its own: undisturbed)
    answers = asyncio.ensure_future(asyncio.to_thread(offline, PROMPTS, max_tokens, long_max_tokens))
    async with running(config, timeout_s=300) as live:
        deploy_s = time.monotonic() - started
        cases, long_case = await answers
        chaos, chaos_started = Chaos(live.dep, urls, cases, long_case, settings, seed), time.monotonic()
        for number, kind in enumerate(kinds, 1):
            if time.monotonic() - chaos_started > duration_s:
                break
            record = await chaos.round(number, kind)
            record["ok"] = not record["violations"]
            rounds.append(record)
            on_round(record)
    return {"rounds": rounds, "summary": summarize(rounds), "deploy_s": deploy_s, "wall_s": time.monotonic() - started}


def summarize(rounds: list[dict]) -> dict:
    errors: Counter = Counter()
    for r in rounds:
        errors.update(r["error_kinds"])
    recover = [r["recovered_s"] for r in rounds if r["fault"] in WEAKENING and r["recovered_s"] is not None]
    pct = percentiles(recover)
    return {
        "rounds": len(rounds),
        "rounds_failed": sum(bool(r["violations"]) for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
        "served": sum(r["served"] for r in rounds),
        "faults": dict(Counter(r["fault"] for r in rounds)),
        "lost": sum(r["lost"] for r in rounds),
        "unclean": sum(r["unclean"] for r in rounds),
        "errors": dict(errors),
        "left": sum(r["left"] for r in rounds),
        "leaked_blocks": sum(r["leaked_blocks"] for r in rounds),
        "leak_reports": sum(len(r["leaks"]) for r in rounds),  # blocks, or requests a frontend still counts
        "not_recovered": sum(r["recovered_s"] is None for r in rounds),
        "recover_p50_s": pct["p50"],
        "recover_p99_s": pct["p99"],
    }


def print_round(record: dict) -> None:
    line = ", ".join(f"{c}={record[c]:.1f}" if isinstance(record[c], float) else f"{c}={record[c]}"
                     for c in ROUND_COLUMNS)  # fmt: skip
    print(line + "".join(f"\n    VIOLATION {v}" for v in record["violations"]), flush=True)


def report(result: dict) -> None:
    print("\nper round")
    print_table(result["rounds"], ROUND_COLUMNS)
    s = result["summary"]
    rows = [{"metric": k, "value": v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())}
            for k, v in s.items()]  # fmt: skip
    print("\nsummary")
    print_table(rows, ["metric", "value"])
    print(f"\ndeployed in {result['deploy_s']:.1f} s, {result['wall_s']:.1f} s in all\n{NOTE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--duration",
        type=float,
        default=1800.0,
        help="seconds of chaos once deployed (no round starts after)",
    )
    ap.add_argument("--interval", type=float, default=20.0, help="seconds between faults (a round's load)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    ap.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    ap.add_argument("--worker-timeout", type=float, default=3.0, help="failure.worker_timeout_s (hang detection)")
    ap.add_argument("--deadline", type=float, default=60.0, help="a request not ended by then is lost (hung)")
    ap.add_argument("--recover-timeout", type=float, default=120.0, help="seconds to be back at full strength")
    ap.add_argument("--cpus", type=int, default=8, help="logical CPUs of the local Ray (one per worker actor)")
    args = ap.parse_args()
    kinds = [k for k in args.faults.split(",") if k]
    if unknown := set(kinds) - set(FAULTS):
        ap.error(f"--faults: unknown {sorted(unknown)}; known: {', '.join(FAULTS)}")
    settings = Settings(
        interval_s=args.interval, deadline_s=args.deadline, recover_s=args.recover_timeout,
        concurrency=args.concurrency, hang_s=args.worker_timeout + 2.0,
    )  # fmt: skip
    ray.init(num_cpus=args.cpus, include_dashboard=False, namespace="pdserve-bench-chaos")
    try:
        result = asyncio.run(
            run(plan(kinds, random.Random(args.seed)), settings, seed=args.seed, duration_s=args.duration,
                worker_timeout_s=args.worker_timeout, on_round=print_round)
        )  # fmt: skip
    finally:
        ray.shutdown()
    report(result)
    result["args"] = vars(args)
    result["note"] = NOTE
    print(f"\nwrote {write_json('chaos', result)}")
    raise SystemExit(1 if result["summary"]["rounds_failed"] else 0)


if __name__ == "__main__":
    main()
