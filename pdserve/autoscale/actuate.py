"""Actuate: the autoscaler's loop inside the controller. Every `interval_s` it observes (Prometheus), decides
(the pure policy) and acts through the controller's lifecycle: scale out by raising targets (a worker that
finds no resources waits, and Ray's or KubeRay's autoscaler adds a node), scale in by draining the worker
whose removal loses the least (its requests migrate away), flip by draining a worker and starting one of the
other role in its place. Every decision is logged with its inputs and exported; a failed action is retried
with backoff and never takes a pool below its minimum (the policy's targets already respect it)."""

from __future__ import annotations

import asyncio
import logging
import time

from pdserve.autoscale.policy import PolicyState, ScaleDecision, decide
from pdserve.autoscale.removal import pick_removal, removal_candidates
from pdserve.config import ServeConfig

log = logging.getLogger(__name__)

BACKOFF_S = (5.0, 10.0, 30.0, 60.0)


class Autoscaler:
    def __init__(self, config: ServeConfig, registry, router, lifecycle, metrics, observer) -> None:
        self.config, self.cfg = config, config.autoscaling
        self.registry, self.router, self.lifecycle, self.metrics = registry, router, lifecycle, metrics
        self.observer = observer
        self.state = PolicyState()
        self.decisions: list[dict] = []  # the latest, for status and tests
        self._failures = 0
        self._not_before = 0.0
        self._acting_since: float | None = None  # the last action, until the deployment has settled

    def sizes(self) -> dict[str, int]:
        """Ready workers per role: what serves now (starting and draining ones do not count)."""
        out = {"prefill": 0, "decode": 0, "colocated": 0}
        for rec in self.registry.workers.values():
            if rec.state == "ready":
                out[rec.role] += 1
        return out

    def settled(self) -> bool:
        """No worker starting or draining, and targets met: the last action has taken effect."""
        busy = any(r.state in ("starting", "draining") for r in self.registry.workers.values())
        return not busy and self.sizes() == self.registry.targets

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.step(time.monotonic())
            except Exception:  # the loop must survive anything one pass does
                log.exception("autoscaler pass failed")

    async def step(self, now: float) -> ScaleDecision | None:
        if now < self._not_before:
            return None  # backing off after a failure
        if not self.settled():  # the last action is still taking effect (a start the lifecycle retries)
            if self._acting_since is not None and now - self._acting_since > self.cfg.action_timeout_s:
                self._acting_since = None
                self._report_failure(now, "action_timeout", f"not settled after {self.cfg.action_timeout_s:.0f} s")
            return None
        self._acting_since = None
        sizes = self.sizes()
        signals = await self.observer.observe(sizes)
        decision = decide(signals, self.state, self.cfg, now)
        for role, n in decision.desired.items():
            self.metrics.autoscaler_desired.labels(role).set(n)
        self.metrics.autoscaler_decisions.labels(decision.action, decision.reason).inc()
        record = {"time": time.time(), "action": decision.action, "reason": decision.reason,
                  "targets": decision.targets, "desired": decision.desired, "signals": signals.__dict__,
                  "error": self.observer.last_error}  # fmt: skip
        self.decisions = [*self.decisions[-99:], record]
        if decision.action == "hold":
            log.debug("autoscaler holds (%s): %s", decision.reason, signals)
            return decision
        log.info("autoscaler: %s (%s) -> %s; signals %s", decision.action, decision.reason, decision.targets, signals)
        try:
            await self.act(decision)
            self._failures, self._acting_since = 0, now
        except Exception as e:
            self._report_failure(now, decision.action, repr(e))
        return decision

    def _report_failure(self, now: float, what: str, error: str) -> None:
        """An action that raised, or one that did not settle within action_timeout_s: logged, exported
        (decisions_total{action="failed"}), and the next decision waits out a growing backoff."""
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._failures += 1
        self._not_before = now + delay
        self.state.last_action_at = float("-inf")  # the next pass may try again
        self.metrics.autoscaler_decisions.labels("failed", what).inc()
        self.decisions = [*self.decisions[-99:], {"time": time.time(), "action": "failed", "reason": what,
                                                  "error": error, "retry_in_s": delay}]  # fmt: skip
        log.warning("autoscaler: %s failed (%s); next decision in %.0f s", what, error, delay)

    async def act(self, d: ScaleDecision) -> None:
        if d.action == "scale_out":
            before = dict(self.registry.targets)
            self.registry.set_targets(**d.targets)
            try:
                self.lifecycle.publish_targets()
                self.lifecycle.reconcile()
            except Exception:  # back to what was there: the retry raises them again
                self.registry.set_targets(**before)
                self.lifecycle.publish_targets()
                raise
        elif d.action == "scale_in":
            role = next(r for r in d.targets if d.targets[r] < self.registry.targets[r])
            for _ in range(self.registry.targets[role] - d.targets[role]):  # up to scale_in_max_workers
                await self.lifecycle.remove(self._leaver(role))  # drains by migration; the target drops by one
        elif d.action == "flip":
            frm, to = d.flip
            await self.lifecycle.remove(self._leaver(frm))  # its GPU is free once it has drained and stopped
            self.registry.set_targets(**{to: self.registry.targets[to] + 1})
            self.lifecycle.publish_targets()
            self.lifecycle.reconcile()

    def _leaver(self, role: str) -> str:
        """The ready worker of `role` that leaves first, by the removal order the lifecycle's plan uses."""
        ready = [r for r in self.registry.workers.values() if r.role == role and r.state == "ready"]
        chosen = pick_removal(removal_candidates(ready, self.router.index.unique_blocks))
        if chosen is None:
            raise RuntimeError(f"no ready {role} worker to remove")
        return chosen
