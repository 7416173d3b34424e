"""`pdserve serve` (foreground, or `--detach` into a running cluster) and the commands that operate a running
deployment by name: status, scale, drain, shutdown; and `pdserve plan` (layout advice from the simulator)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from pdserve.cli_ray import call, connect

# a foreground serve whose deployment was shut down from elsewhere stops the Ray it started this long after
# the deployment's last actor went, so the `pdserve shutdown` driver leaves first (else it waits ~5 s to go)
DRIVER_GRACE_S = 1.0


def serve(config, detach: bool) -> int:
    return asyncio.run(_serve(config, detach))


async def _serve(config, detach: bool) -> int:
    import os

    if detach and not (config.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--detach needs a running Ray cluster to leave the service in: give --address auto")
    prometheus = None
    if config.autoscaling.enabled and not config.autoscaling.prometheus_url:
        if detach:
            raise ValueError(
                "--autoscale with --detach needs --prometheus-url (a local one would die with this command)"
            )
        config, prometheus = _local_prometheus(config)
    try:
        return await _run(config, detach)
    finally:
        if prometheus is not None:
            prometheus.stop()


def _local_prometheus(config):
    """Start a Prometheus scraping this deployment's frontends and controller; the config points at it."""
    from pdserve.autoscale.local_prometheus import LocalPrometheus, _free_port

    if not config.controller.metrics_port:  # Prometheus must know the port before the controller starts
        config = config.model_copy(
            update={"controller": config.controller.model_copy(update={"metrics_port": _free_port()})}
        )
    fe = config.frontend
    targets = [f"127.0.0.1:{fe.port + i}" for i in range(fe.frontends)] + [
        f"127.0.0.1:{config.controller.metrics_port}"
    ]
    prom = LocalPrometheus(targets, deployment=config.name).wait_ready()
    print(f"pdserve: autoscaling from a local Prometheus on {prom.url} (scraping {', '.join(targets)})", flush=True)
    auto = config.autoscaling.model_copy(update={"prometheus_url": prom.url})
    return config.model_copy(update={"autoscaling": auto}), prom


async def _run(config, detach: bool) -> int:
    from pdserve.controller.deploy import deploy

    dep = await deploy(config, serve_http=True)
    status = await dep.status()
    _announce(config, status, detach)
    if detach:
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    signalled, gone = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(dep.wait_gone())
    elsewhere = None  # None: stopped here (a signal or an error); True: shut down elsewhere; False: died
    try:
        await asyncio.wait({signalled, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done():
            elsewhere = gone.result()
    finally:
        signalled.cancel()
        gone.cancel()
        if elsewhere is None:
            print("pdserve: shutting down", file=sys.stderr, flush=True)
            await dep.shutdown()
    if elsewhere is None:
        return 0
    if elsewhere:
        print(f"pdserve: deployment {config.name} was shut down from elsewhere; exiting", file=sys.stderr, flush=True)
        await asyncio.sleep(DRIVER_GRACE_S)
    else:
        print(f"pdserve: the controller of deployment {config.name} died; stopping what is left", file=sys.stderr)
    await dep.shutdown()  # what is left (nothing, after a `pdserve shutdown`), and the Ray this process started
    return 0 if elsewhere else 1


def _announce(config, status: dict, detach: bool) -> None:
    fe = config.frontend
    urls = [f["url"] for f in status["frontends"]]
    name = fe.served_model_name or _model_name(config)
    pools = config.pools
    workers = f"{pools.prefill} prefill + {pools.decode} decode"
    if pools.colocated:
        workers += f" + {pools.colocated} colocated"
    where = ", ".join(f"{u}/v1" for u in urls)
    print(
        f"pdserve ready on {where} (deployment {config.name}; model {name}; {workers} workers; "
        f"transport {config.kv.transport}; routing {config.routing.policy})",
        flush=True,
    )
    auth = " -H 'Authorization: Bearer $KEY'" if fe.api_key or fe.api_keys or fe.api_keys_file else ""
    print(
        f"try: curl -s http://127.0.0.1:{fe.port}/v1/completions -H 'Content-Type: application/json'{auth}"
        f' -d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\'',
        flush=True,
    )
    if detach:
        print(f"detached: 'pdserve status --name {config.name}' lists it, 'pdserve shutdown --name {config.name}' "
              "stops it", flush=True)  # fmt: skip


def _model_name(config) -> str:
    from pdserve.model_info import DEMO_MODEL_ID, load_model_info

    return DEMO_MODEL_ID if config.engine.model is None else load_model_info(config.engine.model).model_id


# ---- operating a running deployment ------------------------------------------------------------------------


def _controller(args: argparse.Namespace):
    return connect(args.address, args.name)


def status(args: argparse.Namespace) -> int:
    st = call(_controller(args).status.remote(), timeout_s=60)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    now = time.time()
    print(f"deployment {st['name']}: targets {st['targets']}; controller pid {st['controller']['pid']}, "
          f"metrics port {st['controller']['metrics_port']}")  # fmt: skip
    print(f"{'WORKER':<16}{'ROLE':<11}{'STATE':<10}{'NODE':<14}{'PID':>8}{'RUN':>5}{'WAIT':>6}{'KV':>7}{'UP':>8}")
    for w in sorted(st["workers"], key=lambda w: (w["role"], w["worker_id"])):
        print(f"{w['worker_id']:<16}{w['role']:<11}{w['state']:<10}{w['node_id'][:12]:<14}{w['pid']:>8}"
              f"{w['running']:>5}{w['waiting']:>6}{w['kv_usage']:>7.1%}{now - w['started_at']:>7.0f}s")  # fmt: skip
    for f in st["frontends"]:
        print(f"frontend {f['index']}: {f['url']} ({f['state']})")
    return 0


def scale(args: argparse.Namespace) -> int:
    sizes = {"prefill": args.prefill, "decode": args.decode, "colocated": args.colocated}
    if all(v is None for v in sizes.values()):
        raise ValueError("give at least one of --prefill, --decode, --colocated")
    targets = call(_controller(args).scale.remote(**sizes), timeout_s=60)
    print(f"targets now {targets}; workers start or drain in the background ('pdserve status' follows them)")
    return 0


def drain(args: argparse.Namespace) -> int:
    call(_controller(args).drain.remote(args.worker_id), timeout_s=None)
    print(f"worker {args.worker_id} drained and stopped; its pool's target shrank by one")
    return 0


def migrate(args: argparse.Namespace) -> int:
    import msgspec

    # not running anywhere (KeyError) or a bad target (ValueError): one line, exit 2
    records = call(_controller(args).migrate.remote(args.request_id, args.to), timeout_s=300)
    failed = 0
    for r in records:
        stages = "+".join(str(n) for n in r.blocks_per_stage)
        error = f"; {r.error}" if r.error else ""
        print(f"{r.request_id}: {r.source} -> {r.target or '?'} {r.outcome}; blocks copied per stage {stages or '-'}, "
              f"pause {r.pause_s * 1e3:.1f} ms, total {r.total_s * 1e3:.0f} ms{error}")  # fmt: skip
        failed += r.outcome != "migrated"
    if args.json:
        print(json.dumps(msgspec.to_builtins(records), indent=2))
    return 1 if failed else 0


def shutdown(args: argparse.Namespace) -> int:
    import ray

    from pdserve.controller.deploy import deployment_actor_names, shutdown_deployment

    asyncio.run(shutdown_deployment(_controller(args), args.name))
    deadline = time.time() + 30
    while (left := deployment_actor_names(args.name)) and time.time() < deadline:
        time.sleep(0.2)
    ray.shutdown()  # at once: a foreground `pdserve serve` stops its Ray soon after the last actor goes
    if left:
        print(f"pdserve: still listed after shutdown: {left}", file=sys.stderr)
        return 1
    print(f"deployment {args.name} shut down; no named actor of it is left")
    return 0


def plan(args: argparse.Namespace) -> int:
    from pdserve.sim.plan_cli import run  # the simulator loads only for this command

    return run(args)


def add_parsers(sub) -> None:
    def common(p):
        p.add_argument("--name", default="pdserve", help="deployment name (default pdserve)")
        p.add_argument("--address", default=None, help="Ray cluster address (default: auto)")

    p = sub.add_parser("status", help="workers and frontends of a running deployment")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)
    p = sub.add_parser("scale", help="set pool sizes of a running deployment")
    common(p)
    for role in ("prefill", "decode", "colocated"):
        p.add_argument(f"--{role}", type=int, default=None, metavar="N")
    p.set_defaults(func=scale)
    p = sub.add_parser("drain", help="drain and remove one worker (its pool shrinks by one)")
    common(p)
    p.add_argument("worker_id")
    p.set_defaults(func=drain)
    p = sub.add_parser("migrate", help="move a running request to another worker, live (multi-stage KV copy)")
    common(p)
    p.add_argument("request_id", help="the id the API returned (cmpl-..., chatcmpl-...)")
    p.add_argument("--to", default=None, metavar="WORKER", help="target worker id (default: the least loaded)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=migrate)
    p = sub.add_parser("shutdown", help="stop every actor of a running deployment")
    common(p)
    p.set_defaults(func=shutdown)
    add_plan_parser(sub)


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="layout advice: replay a trace through the simulator for every P/D split of N GPUs",
        description="Replays the trace (Mooncake JSONL or Azure CSV) for every layout of --gpus workers (xPyD, all "
        "colocated, colocated + P/D mixes); prints SLO attainment, goodput and latency per layout, the best one "
        "and the P:D ratio bounds for autoscaling.",
    )  # fmt: skip
    p.add_argument(
        "--trace", required=True, help="Mooncake JSONL (timestamp ms, input/output_length, hash_ids) or Azure CSV"
    )
    p.add_argument("--gpus", type=int, required=True, help="workers to lay out, one GPU each")
    p.add_argument("--slo-ttft", type=float, required=True, metavar="S", help="time-to-first-token SLO, seconds")
    p.add_argument("--slo-tpot", type=float, required=True, metavar="S", help="time-per-output-token SLO, seconds")
    p.add_argument("--target", type=float, default=0.9, help="share of requests that must meet both (default 0.9)")
    p.add_argument("--calibration", default="h100", help="latency model: h100, cpu or a calibration JSON file")
    p.add_argument("--rate-scale", type=float, default=1.0, metavar="X", help="attainment at X times the trace's rate")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N requests of the trace")
    p.add_argument("--block-size", type=int, default=512, help="KV block tokens (Mooncake: < 512 scales prompts down)")
    p.add_argument("--policy", default="prefix_aware", help="routing policy (default prefix_aware)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="processes searching layouts in parallel (default 2)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.set_defaults(func=plan)
