"""The autoscaling policy (pure, as Dynamo's planner's `decide`): signals in, one decision out, with the
state it needs between calls. No I/O, no clock of its own: `now` comes in, so tables can test it.

Demand: the decode pool needs ceil(decode tokens/s / tokens per worker) workers, one more when its KV usage
is high or TPOT attainment is low. The prefill pool, given a prompt throughput per worker, is sized by
throughput as HeteroScale sizes pools: (prompt tokens/s prefilled + the backlog the ready workers cannot
clear within `prefill_queue_drain_s`, over that time) / prompt tokens/s per worker; otherwise by its queue,
queued tokens / tokens per worker. It needs one more when TTFT attainment is low. A latency rule adds a
worker only to a pool carrying `attainment_min_load` of its target: misses on an idle pool (a KV handoff's
gap, a cold start) are not for want of workers. Colocated workers count in both pools. The P:D ratio stays
within bounds, the smaller pool raised to it (HeteroScale); min/max per pool win. Starting workers count as
the pool's, so a scale-out is not repeated while they boot (a +1 rule asks for one more than the ready
workers, so it waits for them too). Scale out at once; scale in only when the highest demand over the last
`scale_in_window_s` is below the current size (Kubernetes' stabilization): one pool per action, by at most
`scale_in_max_workers`; `cooldown_s` after any action. When one pool is short and the other has slack, a
worker changes role instead of a new one being added. With a GPU budget (`max_workers`, Dynamo's planner
has one too) a scale-out adds only what fits, and a short pool at the budget waits for a flip. Without
data the sizes hold: missing signals never scale anything in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdserve.config import AutoscalingConfig


@dataclass(frozen=True)
class Signals:
    """One observation: workers per role (ready, and started but not yet serving), and the pools' signals
    (None: Prometheus had no data)."""

    prefill: int
    decode: int
    colocated: int = 0
    decode_tokens_per_s: float | None = None  # the whole decode-capable pool
    kv_usage: float | None = None  # mean over decode-capable workers
    prefill_tokens_queued: float | None = None  # the whole prefill-capable pool
    ttft_attainment: float | None = None  # share of requests whose TTFT met the SLO
    tpot_attainment: float | None = None
    request_rate: float | None = None
    prompt_tokens_per_s: float | None = None  # prompt tokens prefilled per second, wherever they were
    starting_prefill: int = 0
    starting_decode: int = 0
    starting_colocated: int = 0

    def totals(self) -> dict[str, int]:
        """Pool sizes once the starting workers serve."""
        return {
            "prefill": self.prefill + self.starting_prefill,
            "decode": self.decode + self.starting_decode,
            "colocated": self.colocated + self.starting_colocated,
        }


@dataclass(frozen=True)
class ScaleDecision:
    action: str  # hold | scale_out | scale_in | flip
    reason: str
    targets: dict[str, int]  # pool sizes after the action (prefill, decode, colocated), starting workers included
    desired: dict[str, int]  # demand now, per pool (what the metric pdserve_autoscaler_desired_workers shows)
    flip: tuple[str, str] | None = None  # (from role, to role)


@dataclass
class PolicyState:
    last_action_at: float = -math.inf
    started_at: float | None = None  # first observation with data: no scale-in before a whole window of them
    history: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (time, desired) in the window


def demand(s: Signals, cfg: AutoscalingConfig) -> tuple[dict[str, int], list[str]] | None:
    """Workers each pool needs now (prefill-capable and decode-capable counts), or None without data."""
    if s.decode_tokens_per_s is None and s.prefill_tokens_queued is None and s.prompt_tokens_per_s is None:
        return None
    why = []
    decode_capable, prefill_capable = s.decode + s.colocated, s.prefill + s.colocated  # workers
    tokens = s.decode_tokens_per_s or 0.0
    d = math.ceil(tokens / cfg.decode_tokens_per_worker)
    if s.kv_usage is not None and s.kv_usage > cfg.kv_usage_high:
        d, _ = max(d, decode_capable + 1), why.append("kv_usage")
    decode_load = max(tokens / cfg.decode_tokens_per_worker, (s.kv_usage or 0.0) / cfg.kv_usage_high * decode_capable)
    if _latency_rule(s.tpot_attainment, decode_load, decode_capable, cfg):
        d, _ = max(d, decode_capable + 1), why.append("tpot_attainment")
    queued = s.prefill_tokens_queued or 0.0
    if cfg.prefill_tokens_per_s_per_worker and s.prompt_tokens_per_s is not None:
        per_s, drain = cfg.prefill_tokens_per_s_per_worker, cfg.prefill_queue_drain_s
        excess = max(0.0, queued - prefill_capable * per_s * drain)  # more than the ready workers clear in time
        prefill_load = (s.prompt_tokens_per_s + excess / drain) / per_s
    else:
        prefill_load = queued / cfg.prefill_tokens_per_worker
    p = math.ceil(prefill_load)
    if _latency_rule(s.ttft_attainment, prefill_load, prefill_capable, cfg):
        p, _ = max(p, prefill_capable + 1), why.append("ttft_attainment")
    return {"prefill": p, "decode": max(d, 1)}, why


def _latency_rule(attainment: float | None, load: float, workers: int, cfg: AutoscalingConfig) -> bool:
    """Low attainment asks for one more worker, if the pool carries `attainment_min_load` of its target."""
    low = attainment is not None and attainment < cfg.attainment_target
    return low and load >= cfg.attainment_min_load * max(workers, 1)


def _targets(want: dict[str, int], current: dict[str, int], cfg: AutoscalingConfig) -> dict[str, int]:
    """Pool sizes for a demand, within min/max and the P:D ratio; colocated workers stay as they are. The
    ratio raises the smaller pool (HeteroScale scales the two together): a prefill pool past `pd_ratio_max`
    per decode worker brings decode workers along, and one under `pd_ratio_min` is raised; min/max win."""
    c = current["colocated"]
    if current["prefill"] == current["decode"] == 0 and c:  # a colocated deployment: one pool serves both
        lo, hi = max(cfg.min_prefill, cfg.min_decode), max(cfg.max_prefill, cfg.max_decode)
        return {"prefill": 0, "decode": 0, "colocated": min(hi, max(lo, want["prefill"], want["decode"]))}
    d = min(cfg.max_decode, max(cfg.min_decode, want["decode"])) - c
    d = max(d, 1 if current["prefill"] or current["decode"] else 0)
    p = min(cfg.max_prefill, max(cfg.min_prefill, want["prefill"])) - c
    if d > 0 and current["prefill"] + want["prefill"] > 0:  # a P/D deployment: keep the ratio
        d = max(d, min(cfg.max_decode - c, math.ceil(p / cfg.pd_ratio_max)))
        p = min(max(p, math.ceil(cfg.pd_ratio_min * d)), math.floor(cfg.pd_ratio_max * d))
    p = min(cfg.max_prefill, max(cfg.min_prefill, p + c)) - c  # min/max win over the ratio
    return {"prefill": max(p, 0), "decode": d, "colocated": c}


def decide(s: Signals, state: PolicyState, cfg: AutoscalingConfig, now: float) -> ScaleDecision:
    current = s.totals()  # a starting worker counts: scale-out is not repeated while it boots
    found = demand(s, cfg)
    if found is None:
        return ScaleDecision("hold", "no_data", current, {})
    want, why = found
    state.history = [(t, w) for t, w in state.history if now - t <= cfg.scale_in_window_s] + [(now, want)]
    state.started_at = now if state.started_at is None else state.started_at
    now_targets = _targets(want, current, cfg)
    peak = {role: max(w[role] for _, w in state.history) for role in want}
    window_targets = _targets(peak, current, cfg)  # what scale-in may go down to
    covered = now - state.started_at >= cfg.scale_in_window_s
    desired = dict(now_targets)
    if now - state.last_action_at < cfg.cooldown_s:
        return ScaleDecision("hold", "cooldown", current, desired)
    short = [r for r in current if now_targets[r] > current[r]]
    slack = [r for r in current if covered and window_targets[r] < current[r]]
    if cfg.flip_roles and short and slack and {short[0], slack[0]} == {"prefill", "decode"}:
        to, frm = short[0], slack[0]
        targets = {**current, to: current[to] + 1, frm: current[frm] - 1}
        state.last_action_at = now
        return ScaleDecision("flip", f"{to}_short_{frm}_slack", targets, desired, flip=(frm, to))
    if short:
        targets = {r: max(current[r], now_targets[r]) for r in current}
        if cfg.max_workers:  # within the GPU budget, the first short pool first
            room = cfg.max_workers - sum(current.values())
            for r in short:
                targets[r] = current[r] + max(0, min(targets[r] - current[r], room))
                room -= targets[r] - current[r]
            if targets == current:
                return ScaleDecision("hold", "max_workers", current, desired)
        state.last_action_at = now
        return ScaleDecision("scale_out", "+".join(why) or "demand", targets, desired)
    if slack:  # the pool with the most slack, towards the window's demand
        role = max(slack, key=lambda r: current[r] - window_targets[r])
        n = max(window_targets[role], current[role] - cfg.scale_in_max_workers)
        state.last_action_at = now
        return ScaleDecision("scale_in", "demand_fell", {**current, role: n}, desired)
    return ScaleDecision("hold", "at_target", current, desired)
