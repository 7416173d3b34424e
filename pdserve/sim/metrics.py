"""Summaries of one simulated run: hit rate, TTFT/TPOT percentiles, SLO attainment, imbalance, decisions.

SLO attainment counts every trace request (rejected and failed ones miss); a request meets the SLOs when
TTFT <= ttft_s and TPOT = (finish - first token) / (output tokens - 1) <= tpot_s (one-token outputs have no
TPOT). This is what a pdserve client sees: the prefill worker streams the first token before the KV moves, so
a P/D request's first gap holds the handoff (reserve + transfer). Diagnostics split it out: `handoff` (first
token -> decode start), `tpot_decode` (TPOT from the decode start) and the attainment had the first token been
held until the decode start (TTFT to it, TPOT from it). Goodput (DistServe): the highest swept rate whose
attainment is >= `target`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pdserve.sim.worker import SimRequest, SimWorker


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    target: float = 0.9


def ttft(r: SimRequest) -> float:
    return r.first_token_s - r.trace.arrival_s


def tpot(r: SimRequest) -> float | None:
    if r.trace.max_tokens < 2:
        return None
    return (r.finish_s - r.first_token_s) / (r.trace.max_tokens - 1)


def handoff(r: SimRequest) -> float | None:
    """First token -> the request joins a decode batch (0 for a local prefill; None: never decoded)."""
    return None if r.decode_start_s is None else r.decode_start_s - r.first_token_s


def tpot_decode(r: SimRequest) -> float | None:
    """TPOT from the decode start: the handoff gap left out."""
    if r.trace.max_tokens < 2 or r.decode_start_s is None:
        return None
    return (r.finish_s - r.decode_start_s) / (r.trace.max_tokens - 1)


def meets(r: SimRequest, slo: SLO) -> bool:
    if r.outcome != "finished" or ttft(r) > slo.ttft_s:
        return False
    t = tpot(r)
    return t is None or t <= slo.tpot_s


def meets_first_token_held(r: SimRequest, slo: SLO) -> bool:
    """`meets` had the frontend held the first token until the decode start (the handoff counts in TTFT)."""
    if r.outcome != "finished" or r.decode_start_s is None:
        return meets(r, slo)
    t = tpot_decode(r)
    return r.decode_start_s - r.trace.arrival_s <= slo.ttft_s and (t is None or t <= slo.tpot_s)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _imbalance(values: list[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0
    return max(values) / mean if mean else None


def summarize(requests: list[SimRequest], workers: dict[str, SimWorker], slo: SLO) -> dict:
    done = [r for r in requests if r.outcome == "finished"]
    started = [r for r in requests if r.first_token_s is not None]
    prompt = sum(r.trace.num_prompt_tokens for r in started)
    ttfts = [ttft(r) for r in started]
    tpots = [t for r in done if (t := tpot(r)) is not None]
    tpots_decode = [t for r in done if (t := tpot_decode(r)) is not None]
    handoffs = [h for r in done if r.prefill_worker != r.decode_worker and (h := handoff(r)) is not None]
    outcomes = Counter(r.outcome for r in requests)
    prefillers = [w for w in workers.values() if w.role in ("prefill", "colocated")]
    decoders = [w for w in workers.values() if w.role in ("decode", "colocated")]
    routed = [r for r in requests if r.reason]
    local = [r for r in routed if r.prefill_worker == r.decode_worker]
    return {
        "requests": len(requests),
        "finished": outcomes["finished"],
        "rejected": outcomes["rejected"],
        "failed": sum(n for k, n in outcomes.items() if k.startswith("failed")),
        "hit_rate": sum(r.cached_tokens for r in started) / prompt if prompt else 0.0,
        "predicted_hit_rate": sum(r.predicted_cached for r in started) / prompt if prompt else 0.0,
        "ttft_p50": _pct(ttfts, 50),
        "ttft_p90": _pct(ttfts, 90),
        "ttft_p99": _pct(ttfts, 99),
        "tpot_p50": _pct(tpots, 50),
        "tpot_p99": _pct(tpots, 99),
        "tpot_decode_p99": _pct(tpots_decode, 99),
        "handoff_p50": _pct(handoffs, 50),
        "handoff_p99": _pct(handoffs, 99),
        "slo_attainment": sum(meets(r, slo) for r in requests) / len(requests),
        "slo_attainment_first_token_held": sum(meets_first_token_held(r, slo) for r in requests) / len(requests),
        "prefill_imbalance": _imbalance([w.prefill_tokens for w in prefillers]),
        "decode_busy_imbalance": _imbalance([w.busy_s for w in decoders]),
        "local_prefill_frac": len(local) / len(routed) if routed else 0.0,
        "local_prefill_frac_by_reason": {
            reason: n / len(routed) for reason, n in sorted(Counter(r.reason for r in local).items())
        },
        "local_prefill_tokens": sum(w.prefill_tokens for w in workers.values() if w.role == "decode"),
        "transfer_tokens_mean": float(np.mean([r.transfer_tokens for r in done if r.transfer_tokens] or [0])),
        "decisions": dict(Counter(f"{r.reason}/{r.policy_reason}" for r in routed)),
        "prefill_tokens_per_worker": {w.worker_id: w.prefill_tokens for w in workers.values()},
        "makespan_s": max((r.finish_s or 0.0) for r in requests),
    }


def goodput(points: list[tuple[float, float]], target: float) -> float:
    """Highest rate among (rate, attainment) points meeting `target` (0 when none does)."""
    return max((rate for rate, att in points if att >= target), default=0.0)
