"""A simulated cluster whose membership changes through the real Router's register/remove: workers start after a
delay, drain (leave the router, finish what they hold where they are: no live migration), stop, or flip roles
(drain, then restart in the other role on the same GPU); GPU-seconds and pool sizes are accounted in virtual time."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pdserve.autoscale.removal import RemovalCandidate, pick_removal
from pdserve.sim.cluster import ClusterConfig, Simulation
from pdserve.sim.model import LatencyModel
from pdserve.sim.trace import TraceRequest
from pdserve.sim.worker import SimRequest, SimWorker

ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class ElasticConfig:
    worker_start_s: float = 30.0  # a new GPU worker: process, weights, warm-up, until it joins the router
    flip_restart_s: float = 10.0  # a drained worker restarting its engine in the other role (weights kept)
    interval_s: float = 10.0  # the observer/controller tick


class ElasticSimulation(Simulation):
    """`controller.step(sim, now)` runs every `interval_s` (None: static membership, still observed)."""

    def __init__(
        self,
        trace: list[TraceRequest],
        model: LatencyModel,
        cluster: ClusterConfig,
        policy: str = "prefix_aware",
        *,
        elastic: ElasticConfig | None = None,
        controller=None,
        observer=None,
        seed: int = 0,
    ) -> None:
        super().__init__(trace, model, cluster, policy, seed=seed)
        self.elastic = elastic or ElasticConfig()
        self.controller, self.observer = controller, observer
        self.state = {wid: "ready" for wid in self.workers}  # starting | ready | draining | stopped
        self.flip_to: dict[str, str] = {}  # draining worker -> the role it restarts in
        self._next = Counter(role for _, role in cluster.roles())
        self.gpus = len(self.workers)  # invariant: starting + ready + draining workers + flips restarting
        self.gpu_s, self._gpu_at = 0.0, 0.0
        self.changes: list[tuple[float, str, str]] = []  # (time, what, worker id)

    # ---- membership ------------------------------------------------------------------------------
    def count(self, role: str, *states: str) -> int:
        states = states or ("ready",)
        return sum(1 for wid, st in self.state.items() if st in states and self.workers[wid].role == role)

    def members(self, *roles: str) -> list[SimWorker]:
        """Ready workers (in the router) of these roles."""
        return [w for wid, w in self.workers.items() if self.state[wid] == "ready" and w.role in roles]

    def add_worker(self, role: str, now: float, delay: float | None = None) -> str:
        wid = f"{role}-{self._next[role]}"
        self._next[role] += 1
        self.workers[wid] = SimWorker(wid, role, self.model, self.cluster.block_size, self)
        self.state[wid] = "starting"
        if delay is None:
            self._gpu(now, +1)
        self.changes.append((now, "start", wid))
        self.at(now + (self.elastic.worker_start_s if delay is None else delay), self._join, wid)
        return wid

    def _join(self, now: float, wid: str) -> None:
        if self.state[wid] != "starting":
            return  # cancelled while starting
        self.state[wid] = "ready"
        self.router.register(wid, self.workers[wid].role)
        self.changes.append((now, "join", wid))
        self.at(now + self.rng.uniform(0, self.cluster.report_interval_s), self._report, self.workers[wid])

    def drain(self, wid: str, now: float, then_role: str | None = None) -> None:
        if self.state[wid] == "starting":  # never joined: stop it at once
            self.state[wid] = "stopped"
            self._gpu(now, -1)
            self.changes.append((now, "cancel", wid))
            return
        self.state[wid] = "draining"
        self.router.remove(wid)
        if then_role:
            self.flip_to[wid] = then_role
        self.changes.append((now, "drain", wid))

    def _drained(self, now: float, w: SimWorker) -> None:
        self.state[w.worker_id] = "stopped"
        self.changes.append((now, "stop", w.worker_id))
        role = self.flip_to.pop(w.worker_id, None)
        if role is None:
            self._gpu(now, -1)
        else:  # the same GPU restarts in the other role
            self.add_worker(role, now, delay=self.elastic.flip_restart_s)

    def _gpu(self, now: float, delta: int) -> None:
        self.gpu_s += self.gpus * (now - self._gpu_at)
        self.gpus, self._gpu_at = self.gpus + delta, now

    # ---- actuation: what a controller asks for ---------------------------------------------------
    def scale_to(self, targets: dict[str, int], now: float) -> None:
        """Start workers until each pool's ready + starting count reaches its target (never removes)."""
        for role in ROLES:
            for _ in range(targets.get(role, 0) - self.count(role, "ready", "starting")):
                self.add_worker(role, now)

    def remove_one(self, role: str, now: float, then_role: str | None = None) -> str | None:
        """Cancel a starting worker of `role`, or drain the ready one `pick_removal` chooses."""
        starting = [wid for wid, st in self.state.items() if st == "starting" and self.workers[wid].role == role]
        if starting and then_role is None:
            self.drain(starting[-1], now)
            return starting[-1]
        candidates = [
            RemovalCandidate(
                w.worker_id,
                len(w.waiting) + len(w.prefilling) + len(w.decoding) + len(w.imports),
                self.router.index.unique_blocks(w.worker_id),
            )
            for w in self.members(role)
        ]
        if len(candidates) <= (1 if role in ("decode", "colocated") else 0):
            return None  # the router always keeps a decode-capable worker
        wid = pick_removal(candidates)
        self.drain(wid, now, then_role)
        return wid

    def flip_one(self, from_role: str, to_role: str, now: float) -> str | None:
        return self.remove_one(from_role, now, then_role=to_role)

    # ---- the event loop's hooks ------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        self.at(self.elastic.interval_s, self._tick)

    def run(self) -> list[SimRequest]:
        super().run()
        self._gpu(self.clock.now, 0)
        return self.requests

    def _tick(self, now: float) -> None:
        if self.observer is not None:
            self.observer.observe(self, now)
        if self.controller is not None:
            self.controller.step(self, now)
        self.at(now + self.elastic.interval_s, self._tick)

    def _report(self, now: float, w: SimWorker) -> None:
        state = self.state[w.worker_id]
        if state == "ready":
            super()._report(now, w)
        elif state == "draining":
            if w.imports:
                self.try_imports(w, now)
            if w.idle():
                self._drained(now, w)
            else:
                self.at(now + self.cluster.report_interval_s, self._report, w)

    def first_token(self, req: SimRequest, now: float) -> None:
        if self.observer is not None:
            self.observer.first_token(req, now)

    def settled(self, req: SimRequest) -> None:
        if self.observer is not None:
            self.observer.settled(req, self.clock.now)
