"""Controllers the elastic simulation ticks: pdserve's own policy (`pdserve.autoscale.policy.decide`, applied as
the controller would) and an independent per-pool autoscaler (Ray Serve / KEDA style) to compare it with.
"""

from __future__ import annotations

import math
from collections import Counter

from pdserve.autoscale.policy import PolicyState, ScaleDecision, decide
from pdserve.config import AutoscalingConfig


class PdserveAutoscaler:
    """Signals from the observer -> `decide` -> actuation: scale out starts workers until ready + starting
    reach the targets (so a decision repeated while workers start adds none); scale in removes workers down
    to the targets, each chosen by `pick_removal`; a flip drains one and restarts it in the other role."""

    name = "pdserve"

    def __init__(self, cfg: AutoscalingConfig) -> None:
        self.cfg, self.state = cfg, PolicyState()
        self.actions: Counter[str] = Counter()
        self.log: list[tuple[float, str, str]] = []

    def step(self, sim, now: float) -> ScaleDecision:
        s = sim.observer.signals
        d = decide(s, self.state, self.cfg, now)
        current = s.totals()
        if d.action == "scale_out":
            sim.scale_to(d.targets, now)
        elif d.action == "scale_in":
            for role in current:
                for _ in range(current[role] - d.targets[role]):
                    sim.remove_one(role, now)
        elif d.action == "flip":
            sim.flip_one(*d.flip, now)
        self.actions[d.action] += 1
        if d.action != "hold":
            self.log.append((now, d.action, d.reason))
        return d


class IndependentAutoscaler:
    """Each pool on its own utilization target, as Kubernetes' HPA (and KEDA on it) and Ray Serve scale a
    deployment: desired = ceil(size * utilization / target), ignored within `tolerance` of 1; scale out at once,
    scale in to the highest desire of the last `scale_in_window_s`; same min/max, interval and cooldown as
    pdserve's; no P:D ratio, no flips. Utilization: prefill = engine busy fraction, decode = KV usage."""

    name = "independent"

    def __init__(
        self, cfg: AutoscalingConfig, prefill_target: float = 0.4, decode_target: float = 0.5, tolerance: float = 0.1
    ) -> None:
        self.cfg, self.targets, self.tolerance = cfg, {"prefill": prefill_target, "decode": decode_target}, tolerance
        self.history: list[tuple[float, dict[str, int]]] = []
        self.started_at: float | None = None
        self.last_action_at = -math.inf
        self.actions: Counter[str] = Counter()
        self.log: list[tuple[float, str, str]] = []

    def step(self, sim, now: float) -> None:
        s, cfg = sim.observer.signals, self.cfg
        current = {"prefill": s.prefill, "decode": s.decode}
        utilization = {"prefill": sim.observer.prefill_busy, "decode": s.kv_usage}
        bounds = {"prefill": (cfg.min_prefill, cfg.max_prefill), "decode": (cfg.min_decode, cfg.max_decode)}
        want = {}
        for pool, n in current.items():
            u, (lo, hi) = utilization[pool], bounds[pool]
            ratio = u / self.targets[pool] if u is not None else 1.0
            desired = n if abs(ratio - 1) <= self.tolerance else math.ceil(n * ratio)
            want[pool] = min(hi, max(lo, desired))
        self.history = [(t, w) for t, w in self.history if now - t <= cfg.scale_in_window_s] + [(now, want)]
        self.started_at = now if self.started_at is None else self.started_at
        if now - self.last_action_at < cfg.cooldown_s:
            self.actions["hold"] += 1
            return
        acted = []
        for pool, n in current.items():
            peak = max(w[pool] for _, w in self.history)
            if want[pool] > n:
                sim.scale_to({pool: want[pool]}, now)
                acted.append(f"{pool}_out")
            elif peak < n and now - self.started_at >= cfg.scale_in_window_s:
                for _ in range(n - peak):
                    sim.remove_one(pool, now)
                acted.append(f"{pool}_in")
        self.actions["+".join(acted) or "hold"] += 1
        if acted:
            self.last_action_at = now
            self.log.append((now, "+".join(acted), ""))
