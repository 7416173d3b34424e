"""Replay the Mooncake trace through every routing policy side by side, per calibration and cluster; sweep
the arrival rate for goodput; print tables and write bench/results/sim_<calibration>_<cluster>.json.

    python -m bench.sim.run                       # cpu and h100; 4P+4D and 8 colocated; 6 policies; 3 seeds
    python -m bench.sim.run --calibrations h100 --clusters pd --rates 1 --limit 1000 --seeds 1
    python -m bench.sim.run --policies "prefix_aware,pa_queue:decode_queue_weight=0.5;uncached_weight=2.0"
    python -m bench.sim.run --clusters pd --disagg "local_prefill_step_tokens=1000000000"  # routing.disagg

A policy is a name from pdserve's registry or bench/sim/variants.py (`pa_queue` reweighs prefix_aware's queue terms),
optionally with `:key=value` options separated by ';'. Rates multiply the trace's own arrival rate
(3.9 req/s over 1,022 s); the seeds move the workers' report phases.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pdserve.config import DisaggConfig
from pdserve.sim.cluster import ClusterConfig, Simulation
from pdserve.sim.metrics import SLO, goodput, summarize
from pdserve.sim.model import CALIBRATIONS, load_model
from pdserve.sim.trace import load_mooncake, mean_rate
from pdserve.sim.variants import make_variant

RESULTS = Path(__file__).resolve().parents[1] / "results"
POLICIES = ("round_robin", "least_loaded", "prefix_aware", "sglang_cache_aware", "dynamo_kv_cost")


@dataclass(frozen=True)
class Setup:
    """How one calibration replays the trace: block size (tokens per trace block), output scale, SLOs,
    the rate multipliers swept for goodput and the one the main table shows."""

    block_size: int
    output_scale: float
    slo: SLO
    rates: tuple[float, ...]
    main_rate: float
    note: str


SETUPS = {
    "h100": Setup(
        512,
        1.0,
        SLO(ttft_s=5.0, tpot_s=0.1),
        (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5),
        1.0,
        "real trace lengths; TTFT SLO 5 s: 0.7% of prompts need more than 5 s of prefill on an idle H100 "
        "(11% need more than 2 s)",
    ),
    "cpu": Setup(
        32,
        1.0,
        SLO(ttft_s=1.0, tpot_s=0.1),
        (4.0, 5.0, 6.0, 6.5, 7.0, 8.0, 9.0, 10.0),
        6.0,
        "prompts scaled 1/16 (512-token trace blocks -> 32 tokens), outputs unscaled; TTFT SLO 1 s: 0.7% of "
        "prompts need more than 1 s of prefill on an idle worker",
    ),
}
CLUSTERS = {
    "pd": ClusterConfig(num_prefill=4, num_decode=4),
    "pd62": ClusterConfig(num_prefill=6, num_decode=2),
    "pd26": ClusterConfig(num_prefill=2, num_decode=6),
    "colocated": ClusterConfig(num_prefill=0, num_decode=0, num_colocated=8),
}


def parse_options(opts: str) -> dict:
    options = {}
    for item in filter(None, opts.split(";")):
        key, _, value = item.partition("=")
        options[key] = float(value) if "." in value or "e" in value else int(value)
    return options


def parse_policy(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    return name, parse_options(opts)


def run_one(task: tuple) -> dict:
    calibration, cluster_name, spec, rate, seed, limit, report_interval, disagg = task
    setup, model = SETUPS[calibration], load_model(calibration)
    cluster = replace(
        CLUSTERS[cluster_name],
        block_size=setup.block_size,
        report_interval_s=report_interval,
        disagg=DisaggConfig(**parse_options(disagg)),
    )
    trace = load_mooncake(
        block_size=setup.block_size, time_scale=1 / rate, limit=limit, output_scale=setup.output_scale
    )
    name, options = parse_policy(spec)
    impl = make_variant(name, block_size=setup.block_size, **options)
    start = time.perf_counter()
    if impl is None:
        sim = Simulation(trace, model, cluster, name, options, seed=seed)
    else:  # the Router's own policy is unused beside the variant: its name only fills the config
        sim = Simulation(trace, model, cluster, "round_robin", policy_impl=impl, seed=seed)
    summary = summarize(sim.run(), sim.workers, setup.slo)
    summary.update(
        policy=spec,
        rate=rate,
        seed=seed,
        req_per_s=mean_rate(trace),
        wall_s=time.perf_counter() - start,
        decision_us=1e6 * sim.decision_s / max(1, summary["requests"] - summary["rejected"]),
    )
    return summary


COLUMNS = [
    ("policy", "{}"),
    ("hit_rate", "{:.3f}"),
    ("ttft_p50", "{:.2f}"),
    ("ttft_p99", "{:.2f}"),
    ("tpot_p50", "{:.3f}"),
    ("tpot_p99", "{:.3f}"),
    ("tpot_decode_p99", "{:.3f}"),
    ("handoff_p99", "{:.3f}"),
    ("slo_attainment", "{:.3f}"),
    ("goodput_req_s", "{:.2f}"),
    ("goodput_held_req_s", "{:.2f}"),
    ("prefill_imbalance", "{:.2f}"),
    ("decode_busy_imbalance", "{:.2f}"),
    ("local_prefill_frac", "{:.2f}"),
    ("rejected", "{:.1f}"),
    ("failed", "{:.1f}"),
]


def table(rows: list[dict], columns) -> str:
    cells = [[fmt.format(r[c]) if r.get(c) is not None else "-" for c, fmt in columns] for r in rows]
    heads = [c for c, _ in columns]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def average(runs: list[dict]) -> dict:
    """Seeds of one (policy, rate) point: numbers averaged, the rest (decision counts) from the first seed."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            values = [r[key] for r in runs if r.get(key) is not None]
            out[key] = sum(values) / len(values) if values else None
    reasons = sorted({k for r in runs for k in r["local_prefill_frac_by_reason"]})
    by_reason = {k: sum(r["local_prefill_frac_by_reason"].get(k, 0.0) for r in runs) / len(runs) for k in reasons}
    out["local_prefill_frac_by_reason"] = by_reason
    out["slo_attainment_seeds"] = [r["slo_attainment"] for r in runs]
    out["seeds"] = len(runs)
    return out


def report(calibration: str, cluster: str, policies: list[str], rates: list[float], runs: list[dict], args) -> dict:
    setup = SETUPS[calibration]
    main_rate = setup.main_rate if setup.main_rate in rates else rates[len(rates) // 2]
    points = [average([r for r in runs if r["policy"] == p and r["rate"] == x]) for p in policies for x in rates]
    rows = []
    for spec in policies:
        mine = [r for r in points if r["policy"] == spec]
        main = next(r for r in mine if r["rate"] == main_rate)
        best = goodput([(r["rate"], r["slo_attainment"]) for r in mine], setup.slo.target)
        held = goodput([(r["rate"], r["slo_attainment_first_token_held"]) for r in mine], setup.slo.target)
        per_rate = main["req_per_s"] / main["rate"]
        rows.append(
            {**main, "goodput_rate": best, "goodput_req_s": best * per_rate, "goodput_held_req_s": held * per_rate}
        )
    print(f"\n== {calibration} / {cluster}: rate x{main_rate} ({rows[0]['req_per_s']:.2f} req/s), {args.seeds} seeds")
    print(f"   {setup.note}")
    print(f"   SLO: TTFT <= {setup.slo.ttft_s} s and TPOT <= {setup.slo.tpot_s} s for >= {setup.slo.target:.0%}")
    print(table(rows, COLUMNS))
    print("   tpot_decode_p99: TPOT from the decode start; handoff: first token -> decode start (P/D only);")
    print("   goodput_held: had the first token been held until the decode start (handoff counted in TTFT)")
    reasons = sorted({k for r in rows for k in r["local_prefill_frac_by_reason"]})
    if reasons:
        print("local_prefill_frac by reason (share of routed requests):")
        by_reason = [{"policy": r["policy"], **r["local_prefill_frac_by_reason"]} for r in rows]
        print(table(by_reason, [("policy", "{}")] + [(k, "{:.3f}") for k in reasons]))
    sweep = [
        {"policy": s, **{f"x{r['rate']}": r["slo_attainment"] for r in points if r["policy"] == s}} for s in policies
    ]
    print("SLO attainment (mean over seeds) by rate multiplier:")
    print(table(sweep, [("policy", "{}")] + [(f"x{r}", "{:.3f}") for r in rates]))
    return {
        "calibration": calibration,
        "cluster": cluster,
        "cluster_config": asdict(
            replace(CLUSTERS[cluster], block_size=setup.block_size, disagg=DisaggConfig(**parse_options(args.disagg)))
        ),
        "setup": asdict(setup),
        "model": json.loads(CALIBRATIONS[calibration].read_text()),
        "main_rate": main_rate,
        "rates": rates,
        "seeds": args.seeds,
        "limit": args.limit,
        "report_interval_s": args.report_interval,
        "disagg": args.disagg,
        "summary": rows,
        "points": points,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrations", default="cpu,h100")
    ap.add_argument("--clusters", default="pd,colocated", help=f"any of {sorted(CLUSTERS)}")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; options after ':', ';'-separated")
    ap.add_argument("--rates", default=None, help="arrival-rate multipliers to sweep (default: per calibration)")
    ap.add_argument("--seeds", type=int, default=3, help="runs per point (report phases differ); averaged")
    ap.add_argument("--limit", type=int, default=None, help="only the first N trace requests")
    ap.add_argument("--report-interval", type=float, default=0.1, help="worker load reports, virtual seconds")
    ap.add_argument("--disagg", default="", help="routing.disagg overrides, e.g. 'local_prefill_step_tokens=2048'")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="sim", help="JSON name prefix under bench/results/")
    args = ap.parse_args()
    policies = args.policies.split(",")
    combos = [(c, k) for c in args.calibrations.split(",") for k in args.clusters.split(",")]
    rates = {c: [float(r) for r in args.rates.split(",")] if args.rates else list(SETUPS[c].rates) for c, _ in combos}
    tasks = [
        (c, k, p, r, seed, args.limit, args.report_interval, args.disagg)
        for c, k in combos
        for r in rates[c]
        for p in policies
        for seed in range(args.seeds)
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run_one, tasks, chunksize=4))
    wall = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    for c, k in combos:
        mine = [r for t, r in zip(tasks, runs) if t[:2] == (c, k)]
        payload = report(c, k, policies, rates[c], mine, args)
        payload["wall_s_total"] = wall
        path = RESULTS / f"{args.out}_{c}_{k}.json"
        path.write_text(json.dumps(payload, indent=2, default=lambda o: o.model_dump()) + "\n")
        print(f"wrote {path}")
    print(f"\n{len(tasks)} runs in {wall:.1f} s wall ({args.jobs} processes, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
