"""The `pdserve plan` command: reads a trace file (Mooncake JSONL or Azure CSV), checks the flags, runs the layout
search of plan.py, and prints the table, the recommendation and the P:D ratio bounds for the autoscaler."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pdserve.sim.metrics import SLO
from pdserve.sim.model import CALIBRATIONS, LatencyModel, load_model
from pdserve.sim.plan import LayoutResult, PlanOptions, plan
from pdserve.sim.trace import TraceRequest, load_mooncake, mean_rate
from pdserve.sim.workloads import load_azure, request

RATIO_BAND = 0.9  # P:D bounds: the xPyD splits within this fraction of the best disaggregated goodput


def trace_format(path: Path) -> str:
    """ "mooncake" or "azure", by extension (.jsonl/.json, .csv), else by the first line."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    with open(path) as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    if "TIMESTAMP" in first and "ContextTokens" in first:
        return "azure"
    raise ValueError(f"--trace: {path} is neither Mooncake JSONL nor an Azure CSV (TIMESTAMP,ContextTokens,...)")


def load_trace(path: Path, block_size: int, limit: int | None = None) -> list[TraceRequest]:
    """Requests in arrival order; Mooncake prompts scale by block_size / 512 (as its loader does)."""
    fmt = trace_format(path)
    try:
        if fmt == "mooncake":
            return load_mooncake(path, block_size=block_size, limit=limit)
        rows = load_azure(path)[:limit]
        return [request(i, t, prompt, output, block_size) for i, (t, prompt, output) in enumerate(rows)]
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"--trace: {path} is not a valid {fmt} trace ({type(e).__name__}: {e})") from None


def check(args: argparse.Namespace) -> None:
    """Flag values the parser cannot check; a ValueError names the flag (the CLI exits 2 with it)."""
    from pdserve.router.policies import POLICIES

    if not Path(args.trace).is_file():
        raise ValueError(f"--trace: no such file: {args.trace}")
    for flag, value, low in (("--gpus", args.gpus, 1), ("--jobs", args.jobs, 1), ("--block-size", args.block_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low} (got {value})")
    for flag, value in (
        ("--slo-ttft", args.slo_ttft),
        ("--slo-tpot", args.slo_tpot),
        ("--rate-scale", args.rate_scale),
    ):
        if not value > 0:
            raise ValueError(f"{flag} must be > 0 (got {value})")
    if not 0 < args.target <= 1:
        raise ValueError(f"--target must be in (0, 1] (got {args.target})")
    if args.limit is not None and args.limit < 2:
        raise ValueError(f"--limit must be >= 2 (got {args.limit})")
    if args.calibration not in CALIBRATIONS and not Path(args.calibration).is_file():
        raise ValueError(
            f"--calibration: unknown calibration {args.calibration!r}; "
            f"choose one of {', '.join(sorted(CALIBRATIONS))} or give a calibration JSON file"
        )
    if args.policy not in POLICIES:
        raise ValueError(f"--policy: unknown routing policy {args.policy!r}; choose one of {', '.join(POLICIES)}")


def pd_bounds(results: list[LayoutResult], band: float = RATIO_BAND) -> tuple[float, float] | None:
    """P:D ratios of the best disaggregated layout and of the xPyD splits within `band` of its goodput (`results`
    ranked, best first)."""
    disagg = [r for r in results if r.layout.disaggregated]
    if not disagg:
        return None
    best = disagg[0]  # `results` come ranked
    ratios = [best.layout.pd_ratio] + [
        r.layout.pd_ratio
        for r in disagg
        if not r.layout.colocated and r.goodput_per_gpu >= band * best.goodput_per_gpu and best.goodput_req_s > 0
    ]
    return min(ratios), max(ratios)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def calibration_line(calibration: str, model: LatencyModel) -> str:
    """Where the table's figures come from: the latency model, measured (command, machine) or derived (how)."""
    return f"figures from the simulator with calibration {calibration}, {model.provenance}"


def table(results: list[LayoutResult], rate_scale: float) -> str:
    heads = ["layout", "P:D", f"SLO@x{rate_scale:g}", "goodput req/s", "req/s/GPU", "TTFT p99 s", "TPOT p99 s"]
    heads.append("rejected")
    rows = []
    for i, r in enumerate(results):
        at_least = ">=" if r.capped else ""
        rows.append([
            ("* " if i == 0 else "  ") + r.layout.name,
            _num(r.layout.pd_ratio, ".2f"),
            f"{r.attainment:.3f}",
            at_least + f"{r.goodput_req_s:.2f}",
            at_least + f"{r.goodput_per_gpu:.3f}",
            _num(r.ttft_p99, ".2f"),
            _num(r.tpot_p99, ".3f"),
            str(r.rejected),
        ])  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def advice(results: list[LayoutResult], slo: SLO, rate_scale: float, max_scale: float) -> list[str]:
    """The recommendation, whether disaggregation pays, and the autoscaler's P:D bounds, as sentences."""
    best = results[0]
    if best.goodput_req_s == 0:
        return [
            f"No layout meets the SLOs for {slo.target:.0%} of requests even at x{rate_scale / max_scale:g} the "
            "trace's rate: loosen the SLOs or add GPUs."
        ]
    lines = [
        f"Recommended: {best.layout.name} ({best.goodput_req_s:.2f} req/s within the SLOs, "
        f"{best.goodput_per_gpu:.3f} req/s per GPU; {best.attainment:.1%} of requests meet them at x{rate_scale:g})."
    ]
    colocated = next((r for r in results if r.layout.roles == 1 and r.layout.colocated), None)
    top = next((r for r in results if r.layout.disaggregated), None)
    if top is not None and colocated is not None:
        if not colocated.goodput_req_s:
            lines.append(f"Disaggregation pays: {colocated.layout.name} meets the SLOs at no rate searched.")
        elif best.layout.disaggregated:
            gain = top.goodput_per_gpu / colocated.goodput_per_gpu - 1
            how = "pays" if gain >= 0.1 else "pays, marginally"
            lines.append(f"Disaggregation {how}: {top.layout.name} serves {gain:+.0%} over {colocated.layout.name}.")
        else:
            gain = top.goodput_per_gpu / colocated.goodput_per_gpu - 1
            lines.append(
                f"Disaggregation does not pay for this workload: the best disaggregated layout, {top.layout.name}, "
                f"serves {top.goodput_per_gpu:.3f} req/s per GPU against {colocated.layout.name}'s "
                f"{colocated.goodput_per_gpu:.3f} ({gain:+.0%}). "
                f"Deploy colocated workers (--colocated-workers {colocated.layout.gpus}, pools.colocated)."
            )
    bounds = pd_bounds(results)
    if top is not None and bounds is not None:
        lo, hi = bounds
        lines.append(
            f"Best disaggregated layout: {top.layout.name}, P:D = {top.layout.pd_ratio:.2f} prefill per decode "
            f"worker. As the autoscaler's bounds (the splits within {RATIO_BAND:.0%} of its goodput): "
            f"autoscaling.pd_ratio_min: {lo:.2f}, autoscaling.pd_ratio_max: {hi:.2f}."
        )
    if any(r.capped for r in results):
        lines.append(f"'>=': still within the SLOs at x{rate_scale * max_scale:g} (the top of the search).")
    return lines


def run(args: argparse.Namespace) -> int:
    check(args)
    trace = load_trace(Path(args.trace), args.block_size, args.limit)
    if len(trace) < 2 or mean_rate(trace) == float("inf"):
        raise ValueError(f"--trace: {args.trace} needs at least two requests at different times")
    slo = SLO(args.slo_ttft, args.slo_tpot, args.target)
    opts = PlanOptions(rate_scale=args.rate_scale, block_size=args.block_size, policy=args.policy, seed=args.seed)
    rate = mean_rate(trace)
    prompt = sum(r.num_prompt_tokens for r in trace) / len(trace)
    output = sum(r.max_tokens for r in trace) / len(trace)
    print(
        f"trace {args.trace}: {len(trace)} requests over {trace[-1].arrival_s - trace[0].arrival_s:.0f} s "
        f"({rate:.2f} req/s; mean prompt {prompt:.0f} tokens, mean output {output:.0f}); "
        f"calibration {args.calibration}; {args.gpus} GPUs, one worker each; routing {args.policy}"
    )
    print(
        f"SLO: TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s:g} s for >= {slo.target:.0%} of requests; "
        f"attainment at x{args.rate_scale:g} the trace's rate ({rate * args.rate_scale:.2f} req/s)",
        flush=True,
    )
    model = load_model(args.calibration)
    start = time.perf_counter()
    results = plan(trace, args.gpus, slo, model, opts, jobs=args.jobs)
    wall = time.perf_counter() - start
    print()
    print(calibration_line(args.calibration, model))
    print(table(results, args.rate_scale))
    print()
    lines = advice(results, slo, args.rate_scale, opts.max_scale)
    print("\n".join(lines))
    runs = sum(len(r.points) for r in results)
    print(f"({len(results)} layouts, {runs} simulated runs in {wall:.0f} s, {args.jobs} processes)", file=sys.stderr)
    if args.json:
        payload = {
            "trace": str(args.trace),
            "requests": len(trace),
            "trace_rate_req_s": rate,
            "gpus": args.gpus,
            "calibration": args.calibration,
            "calibration_provenance": model.provenance,
            "slo": asdict(slo),
            "options": asdict(opts),
            "recommended": results[0].layout.name,
            "pd_ratio_bounds": pd_bounds(results),
            "advice": lines,
            "layouts": [
                {
                    "name": r.layout.name,
                    **asdict(r),
                    "goodput_per_gpu": r.goodput_per_gpu,
                    "pd_ratio": r.layout.pd_ratio,
                }
                for r in results
            ],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
