"""The worker registry: who is in the deployment, in which state, and since when (pure data, no Ray).

States: starting -> ready -> draining -> dead (any state may go to dead). Every change bumps `version`, which
frontends follow. Target sizes per role live here too, so "how many are missing" has one answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.config import ROLES, PoolsConfig

STATES = ("starting", "ready", "draining", "dead")


@dataclass
class WorkerRecord:
    worker_id: str
    role: str
    handle: object = None  # Ray actor handle
    state: str = "starting"
    node_id: str = ""
    pid: int = 0
    started_at: float = field(default_factory=time.time)
    last_report: float = field(default_factory=time.monotonic)
    stats: object = None  # the last WorkerStats
    replace: bool = True  # start a replacement if it dies (False once it was asked to leave)

    def row(self) -> dict:
        s = self.stats
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "state": self.state,
            "node_id": self.node_id,
            "pid": self.pid,
            "started_at": self.started_at,
            "running": getattr(s, "num_running", 0),
            "waiting": getattr(s, "num_waiting", 0),
            "kv_usage": getattr(s, "kv_usage", 0.0),
            "requests_total": getattr(s, "num_requests_total", 0),
        }


class Registry:
    def __init__(self, targets: dict[str, int]) -> None:
        self.workers: dict[str, WorkerRecord] = {}
        self.targets = {role: int(targets.get(role, 0)) for role in ROLES}
        self.version = 0
        self._next = 0

    def new_id(self, role: str) -> str:
        self._next += 1
        return f"{role}-{self._next}"

    def note_existing_id(self, worker_id: str) -> None:
        """Keep new ids unique after a restart that found workers named `role-N`."""
        tail = worker_id.rsplit("-", 1)[-1]
        if tail.isdigit():
            self._next = max(self._next, int(tail))

    def add(self, record: WorkerRecord) -> WorkerRecord:
        self.workers[record.worker_id] = record
        self.version += 1
        return record

    def set_state(self, worker_id: str, state: str) -> WorkerRecord | None:
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        rec = self.workers.get(worker_id)
        if rec is None or rec.state == state or rec.state == "dead":
            return None
        rec.state = state
        self.version += 1
        return rec

    def forget(self, worker_id: str) -> None:
        if self.workers.pop(worker_id, None) is not None:
            self.version += 1

    def live(self, role: str | None = None) -> list[WorkerRecord]:
        """Workers that count toward their role's target: starting or ready (not draining, not dead)."""
        return [r for r in self.workers.values() if r.state in ("starting", "ready") and role in (None, r.role)]

    def missing(self) -> dict[str, int]:
        """Per role: workers to add (> 0) or to remove (< 0) to reach the targets."""
        return {role: self.targets[role] - len(self.live(role)) for role in ROLES}

    def set_targets(self, **sizes: int | None) -> None:
        """New pool sizes (None: unchanged), checked by the config tree's own rules before any changes."""
        wanted = {**self.targets, **{role: n for role, n in sizes.items() if n is not None}}
        checked = PoolsConfig.model_validate({**wanted, "resources": {}})  # a ValueError naming the key
        self.targets = {role: checked.size(role) for role in ROLES}
        self.version += 1

    def membership(self) -> list[tuple[str, str, str, object]]:
        """(worker_id, role, state, handle) of every worker not dead: what frontends route and poll."""
        return [(r.worker_id, r.role, r.state, r.handle) for r in self.workers.values() if r.state != "dead"]

    def ready_roles(self) -> set[str]:
        return {r.role for r in self.workers.values() if r.state == "ready"}
