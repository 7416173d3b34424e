"""The autoscaling policy (pure, as Dynamo's planner's `decide`): signals in, one decision out, with the
state it needs between calls. No I/O, no clock of its own: `now` comes in, so tables can test it.

Demand: the decode pool needs ceil(decode tokens/s / tokens per worker) workers, one more when its KV usage
is high or TPOT attainment is low; the prefill pool needs ceil(queued prompt tokens / tokens per worker),
one more when TTFT attainment is low. Colocated workers count in both pools. The P:D ratio stays within
bounds (HeteroScale); min/max per pool. Scale out at once; scale in one worker at a time, only when the
highest demand over the last `scale_in_window_s` is below the current size (Kubernetes' stabilization);
`cooldown_s` after any action. When one pool is short and the other has slack, a worker changes role
instead of a new one being added. Without data the sizes hold: missing signals never scale anything in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.config import AutoscalingConfig


@dataclass(frozen=True)
class Signals:
    """One observation: ready workers per role, and the pools' signals (None: Prometheus had no data)."""

    prefill: int
    decode: int
    colocated: int = 0
    decode_tokens_per_s: float | None = None  # the whole decode-capable pool
    kv_usage: float | None = None  # mean over decode-capable workers
    prefill_tokens_queued: float | None = None  # the whole prefill-capable pool
    ttft_attainment: float | None = None  # share of requests whose TTFT met the SLO
    tpot_attainment: float | None = None
    request_rate: float | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # hold | scale_out | scale_in | flip
    reason: str
    targets: dict[str, int]  # pool sizes after the action (prefill, decode, colocated)
    desired: dict[str, int]  # demand now, per pool (what the metric pdserve_autoscaler_desired_workers shows)
    flip: tuple[str, str] | None = None  # (from role, to role)


@dataclass
class PolicyState:
    last_action_at: float = -math.inf
    started_at: float | None = None  # first observation with data: no scale-in before a whole window of them
    history: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (time, desired) in the window


def demand(s: Signals, cfg: AutoscalingConfig) -> tuple[dict[str, int], list[str]] | None:
    """Workers each pool needs now (prefill-capable and decode-capable counts), or None without data."""
    if s.decode_tokens_per_s is None and s.prefill_tokens_queued is None:
        return None
    why = []
    d = math.ceil((s.decode_tokens_per_s or 0.0) / cfg.decode_tokens_per_worker)
    if s.kv_usage is not None and s.kv_usage > cfg.kv_usage_high:
        d, _ = max(d, s.decode + s.colocated + 1), why.append("kv_usage")
    if s.tpot_attainment is not None and s.tpot_attainment < cfg.attainment_target:
        d, _ = max(d, s.decode + s.colocated + 1), why.append("tpot_attainment")
    p = math.ceil((s.prefill_tokens_queued or 0.0) / cfg.prefill_tokens_per_worker)
    if s.ttft_attainment is not None and s.ttft_attainment < cfg.attainment_target:
        p, _ = max(p, s.prefill + s.colocated + 1), why.append("ttft_attainment")
    return {"prefill": p, "decode": max(d, 1)}, why


def _targets(want: dict[str, int], s: Signals, cfg: AutoscalingConfig) -> dict[str, int]:
    """Pool sizes for a demand, within min/max and the P:D ratio; colocated workers stay as they are."""
    c = s.colocated
    if s.prefill == s.decode == 0 and c:  # a colocated deployment: one pool serves both demands
        lo, hi = max(cfg.min_prefill, cfg.min_decode), max(cfg.max_prefill, cfg.max_decode)
        return {"prefill": 0, "decode": 0, "colocated": min(hi, max(lo, want["prefill"], want["decode"]))}
    d = min(cfg.max_decode, max(cfg.min_decode, want["decode"])) - c
    d = max(d, 1 if s.prefill or s.decode else 0)
    p = want["prefill"] - c
    if d > 0 and s.prefill + want["prefill"] > 0:  # a P/D deployment: keep the ratio
        p = min(max(p, math.ceil(cfg.pd_ratio_min * d)), math.floor(cfg.pd_ratio_max * d))
    p = min(cfg.max_prefill, max(cfg.min_prefill, p + c)) - c  # min/max win over the ratio
    return {"prefill": max(p, 0), "decode": d, "colocated": c}


def decide(s: Signals, state: PolicyState, cfg: AutoscalingConfig, now: float) -> Decision:
    current = {"prefill": s.prefill, "decode": s.decode, "colocated": s.colocated}
    found = demand(s, cfg)
    if found is None:
        return Decision("hold", "no_data", current, {})
    want, why = found
    state.history = [(t, w) for t, w in state.history if now - t <= cfg.scale_in_window_s] + [(now, want)]
    state.started_at = now if state.started_at is None else state.started_at
    now_targets = _targets(want, s, cfg)
    peak = {role: max(w[role] for _, w in state.history) for role in want}
    window_targets = _targets(peak, s, cfg)  # what scale-in may go down to
    covered = now - state.started_at >= cfg.scale_in_window_s
    desired = dict(now_targets)
    if now - state.last_action_at < cfg.cooldown_s:
        return Decision("hold", "cooldown", current, desired)
    short = [r for r in current if now_targets[r] > current[r]]
    slack = [r for r in current if covered and window_targets[r] < current[r]]
    if cfg.flip_roles and short and slack and {short[0], slack[0]} == {"prefill", "decode"}:
        to, frm = short[0], slack[0]
        targets = {**current, to: current[to] + 1, frm: current[frm] - 1}
        state.last_action_at = now
        return Decision("flip", f"{to}_short_{frm}_slack", targets, desired, flip=(frm, to))
    if short:
        targets = {r: max(current[r], now_targets[r]) for r in current}
        state.last_action_at = now
        return Decision("scale_out", "+".join(why) or "demand", targets, desired)
    if slack:
        role = max(slack, key=lambda r: current[r] - window_targets[r])
        state.last_action_at = now
        return Decision("scale_in", "demand_fell", {**current, role: current[role] - 1}, desired)
    return Decision("hold", "at_target", current, desired)


@dataclass(frozen=True)
class RemovalCandidate:
    worker_id: str
    running: int
    unique_cached_blocks: int  # blocks of the global prefix index that only this worker holds


def pick_removal(candidates: list[RemovalCandidate]) -> str | None:
    """The worker whose removal loses the least: fewest running requests, then fewest prefixes cached
    nowhere else, then the highest id (the newest)."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.running, c.unique_cached_blocks, _neg(c.worker_id))).worker_id


def _neg(worker_id: str):
    tail = worker_id.rsplit("-", 1)[-1]
    return -int(tail) if tail.isdigit() else 0
