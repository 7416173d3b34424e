"""The registry (pure data, no Ray): the only writer of worker and frontend records and of the pool targets.
Records are frozen and the maps read-only; every write goes through `_commit`, which bumps the counters.

Worker states, by validated transitions (`set_state`; anything else raises `InvalidTransition`):

    from \\ to   starting  ready  draining  dead
    starting    =         yes    -         yes
    ready       -         =      yes       yes
    draining    -         -      =         yes
    dead        (final: a late event about a dead worker is ignored, returns None)

`=`: no change, no write. `writes` counts every write; `version` counts the writes that change membership
(ids, roles, states, handles, peers, frontends, targets), which frontends long-poll: a load report alone
does not wake them. `listen` hands every new worker record to a projection (the router's views).
Frontend records go starting -> ready and are forgotten when the frontend goes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

from pdserve.config import ROLES, PoolsConfig

STATES = ("starting", "ready", "draining", "dead")
TRANSITIONS = {"starting": ("ready", "dead"), "ready": ("draining", "dead"), "draining": ("dead",), "dead": ()}
INFO_FIELDS = ("node_id", "pid", "started_at", "peer")
MEMBERSHIP_FIELDS = ("role", "state", "handle", "peer")


class InvalidTransition(ValueError):
    """A state change the table in this module's docstring does not allow."""


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: str
    handle: object = None  # Ray actor handle
    state: str = "starting"
    node_id: str = ""
    pid: int = 0
    started_at: float = field(default_factory=time.time)
    last_report: float = field(default_factory=time.monotonic)  # the last heartbeat (or state change)
    stats: object = None  # the last WorkerStats
    peer: object = None  # its KV transport's PeerInfo, once it is wired to the others (None again when dead)
    leaving: bool = False  # asked to leave: drained if ready, never replaced

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


@dataclass(frozen=True)
class FrontendRecord:
    index: int  # frontend i serves on port + i
    handle: object
    url: str | None = None
    state: str = "starting"  # starting | ready
    pid: int = 0

    def row(self) -> dict:
        return {"index": self.index, "url": self.url, "state": self.state, "pid": self.pid}


class Registry:
    def __init__(self, targets: dict[str, int]) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._frontends: dict[int, FrontendRecord] = {}
        self.workers = MappingProxyType(self._workers)
        self.frontends = MappingProxyType(self._frontends)
        self._targets = {role: int(targets.get(role, 0)) for role in ROLES}
        self._version = self._writes = self._next = 0
        self._listeners: list[Callable[[WorkerRecord], None]] = []
        self._followers: list[Callable[[], None]] = []

    # ---- reads ---------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def writes(self) -> int:
        return self._writes

    @property
    def targets(self) -> dict[str, int]:
        return dict(self._targets)

    def live(self, role: str | None = None) -> list[WorkerRecord]:
        """Workers that count toward their role's target: starting or ready, and not asked to leave."""
        return [
            r
            for r in self._workers.values()
            if r.state in ("starting", "ready") and not r.leaving and role in (None, r.role)
        ]

    def missing(self) -> dict[str, int]:
        """Per role: workers to add (> 0) or to remove (< 0) to reach the targets."""
        return {role: self._targets[role] - len(self.live(role)) for role in ROLES}

    def membership(self) -> list[tuple[str, str, str, object]]:
        """(worker_id, role, state, handle) of every worker not dead: what frontends route and poll."""
        return [(r.worker_id, r.role, r.state, r.handle) for r in self._workers.values() if r.state != "dead"]

    def ready_roles(self) -> set[str]:
        return {r.role for r in self._workers.values() if r.state == "ready"}

    def peers(self) -> list[tuple[str, object]]:
        """(worker id, PeerInfo) of every worker wired into the KV transport mesh (dead ones are not)."""
        return [(r.worker_id, r.peer) for r in self._workers.values() if r.peer is not None]

    def frontend_rows(self) -> list[dict]:
        return [f.row() for _, f in sorted(self._frontends.items())]

    def frontends_ready(self, n: int) -> bool:
        return all(i in self._frontends and self._frontends[i].state == "ready" for i in range(n))

    # ---- the one place that writes ------------------------------------------------------------------------
    def listen(self, listener: Callable[[WorkerRecord], None]) -> None:
        """`listener(record)` after every write of a worker record (a forgotten worker's comes as dead)."""
        self._listeners.append(listener)

    def on_version(self, callback: Callable[[], None]) -> None:
        """`callback()` after every write that bumps `version` (membership long-polls wait on it)."""
        self._followers.append(callback)

    def _commit(self, membership: bool, record: WorkerRecord | None = None) -> None:
        self._writes += 1
        if membership:
            self._version += 1
            for callback in self._followers:
                callback()
        if record is not None:
            for listener in self._listeners:
                listener(record)

    def _write(self, old: WorkerRecord, **changes) -> WorkerRecord:
        new = dataclasses.replace(old, **changes)
        self._workers[new.worker_id] = new
        self._commit(any(getattr(old, f) != getattr(new, f) for f in MEMBERSHIP_FIELDS), new)
        return new

    # ---- workers ---------------------------------------------------------------------------------------
    def new_id(self, role: str) -> str:
        self._next += 1
        return f"{role}-{self._next}"

    def note_existing_id(self, worker_id: str) -> None:
        """Keep new ids unique after a restart that found workers named `role-N`."""
        tail = worker_id.rsplit("-", 1)[-1]
        if tail.isdigit():
            self._next = max(self._next, int(tail))

    def add(self, record: WorkerRecord) -> WorkerRecord:
        if record.worker_id in self._workers:
            raise ValueError(f"worker {record.worker_id!r} is registered already")
        if record.state not in STATES or record.role not in ROLES:
            raise ValueError(f"a worker's state is one of {STATES} and its role one of {ROLES}: {record!r}")
        self._workers[record.worker_id] = record
        self._commit(True, record)
        return record

    def set_state(self, worker_id: str, state: str) -> WorkerRecord | None:
        """Move a worker along the table above; None when nothing changed (unknown, same state, or dead)."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        rec = self._workers.get(worker_id)
        if rec is None or rec.state == state or rec.state == "dead":
            return None
        if state not in TRANSITIONS[rec.state]:
            raise InvalidTransition(f"worker {worker_id!r}: {rec.state} -> {state} is not a transition of {STATES}")
        changes: dict = {"state": state}
        if state in ("ready", "dead"):
            changes["last_report"] = time.monotonic()  # ready: the heartbeat clock starts; dead: its TTL does
        if state == "dead":
            changes["peer"] = None  # out of the mesh: nobody is wired to it any more
        return self._write(rec, **changes)

    def set_info(self, worker_id: str, **info) -> WorkerRecord | None:
        """What a started worker says of itself (`INFO_FIELDS`); ignored once it is dead."""
        if unknown := set(info) - set(INFO_FIELDS):
            raise ValueError(f"set_info takes {INFO_FIELDS}, not {sorted(unknown)}")
        rec = self._workers.get(worker_id)
        return None if rec is None or rec.state == "dead" else self._write(rec, **info)

    def ask_to_leave(self, worker_id: str) -> WorkerRecord | None:
        rec = self._workers.get(worker_id)
        if rec is None or rec.leaving or rec.state == "dead":
            return None
        return self._write(rec, leaving=True)

    def report(self, stats) -> WorkerRecord | None:
        """A heartbeat with the worker's `WorkerStats`; None for a worker unknown or dead."""
        rec = self._workers.get(stats.worker_id)
        if rec is None or rec.state == "dead":
            return None
        return self._write(rec, stats=stats, last_report=time.monotonic())

    def forget(self, worker_id: str) -> None:
        rec = self._workers.pop(worker_id, None)
        if rec is not None:
            self._commit(True, dataclasses.replace(rec, state="dead", peer=None))

    # ---- frontends ---------------------------------------------------------------------------------------
    def add_frontend(self, record: FrontendRecord) -> FrontendRecord:
        if record.index in self._frontends:
            raise ValueError(f"frontend {record.index} is registered already")
        self._frontends[record.index] = record
        self._commit(True)
        return record

    def frontend_ready(self, index: int, handle, url: str, pid: int) -> FrontendRecord | None:
        """Frontend `index` serves; ignored when that frontend (this handle) is gone meanwhile."""
        rec = self._frontends.get(index)
        if rec is None or rec.handle is not handle:
            return None
        new = self._frontends[index] = dataclasses.replace(rec, url=url, pid=pid, state="ready")
        self._commit(True)
        return new

    def forget_frontend(self, index: int, handle=None) -> FrontendRecord | None:
        """Drop frontend `index` (only if it is still `handle`, when given): the next plan starts another."""
        rec = self._frontends.get(index)
        if rec is None or (handle is not None and rec.handle is not handle):
            return None
        del self._frontends[index]
        self._commit(True)
        return rec

    # ---- targets ---------------------------------------------------------------------------------------
    def set_targets(self, **sizes: int | None) -> None:
        """New pool sizes (None: unchanged), checked by the config tree's own rules before any changes."""
        wanted = {**self._targets, **{role: n for role, n in sizes.items() if n is not None}}
        checked = PoolsConfig.model_validate({**wanted, "resources": {}})  # a ValueError naming the key
        self.restore_targets({role: checked.size(role) for role in ROLES})

    def restore_targets(self, targets: dict[str, int]) -> None:
        """Unchecked: targets recovered from the workers after a restart, or zeros for a shutdown."""
        self._targets.update({role: max(0, int(n)) for role, n in targets.items() if role in ROLES})
        self._commit(True)

    def shrink_target(self, role: str) -> None:
        """One worker of `role` fewer (a removal, or a death that is not replaced), never below 0."""
        self.restore_targets({role: self._targets[role] - 1})
