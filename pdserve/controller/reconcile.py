"""The lifecycle's plan (pure): desired state and the registry's records in, the typed actions that close the
gap out. `lifecycle.Lifecycle` carries them out; each action's first effect (a record added, a state changed)
is in the registry at once, so planning again before an action has finished asks for nothing twice."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from pdserve.autoscale.removal import removal_candidates, removal_order
from pdserve.config import ROLES


@dataclass(frozen=True)
class StartWorker:
    role: str


@dataclass(frozen=True)
class DrainWorker:
    """Leave the router now, migrate or finish what runs, then stop."""

    worker_id: str


@dataclass(frozen=True)
class KillWorker:
    """A starting worker that is to leave: nothing runs on it, so it is stopped at once."""

    worker_id: str


@dataclass(frozen=True)
class StopWorker:
    """Shutdown: stop at once, no drain."""

    worker_id: str


@dataclass(frozen=True)
class StartFrontend:
    index: int


@dataclass(frozen=True)
class StopFrontend:
    index: int


Action = StartWorker | DrainWorker | KillWorker | StopWorker | StartFrontend | StopFrontend


@dataclass(frozen=True)
class Desired:
    targets: Mapping[str, int]  # workers per role
    frontends: int = 0  # frontends 0 .. n-1 wanted (0: the controller serves no HTTP)
    leaving: Collection[str] = field(default_factory=frozenset)  # workers asked to leave: drained, never replaced
    may_start: bool = True  # False during the backoff after a failed start
    stopping: bool = False  # shutdown: every worker and frontend stops, nothing starts


def plan(
    desired: Desired,
    workers: Iterable,
    frontends: Collection[int] = (),
    unique_blocks: Callable[[str], int] = lambda worker_id: 0,
) -> list[Action]:
    """The actions that take the registry's `workers` (records) and `frontends` (indices) to `desired`.

    A dead worker never counts, so one not asked to leave is replaced; a draining one is leaving already.
    Surplus workers of a role leave by the shared removal order (`autoscale.removal`): starting ones are
    killed, ready ones drained. `unique_blocks(worker_id)` (the prefixes only it caches) is asked only when
    a role has surplus: it is a scan of the prefix index.
    """
    workers = list(workers)
    if desired.stopping:
        stops: list[Action] = [StopWorker(r.worker_id) for r in workers if r.state != "dead"]
        return stops + [StopFrontend(i) for i in sorted(frontends)]
    actions: list[Action] = []
    for r in workers:
        if r.worker_id in desired.leaving:
            if r.state == "ready":
                actions.append(DrainWorker(r.worker_id))
            elif r.state == "starting":
                actions.append(KillWorker(r.worker_id))
    for role in ROLES:
        live = [
            r
            for r in workers
            if r.role == role and r.state in ("starting", "ready") and r.worker_id not in desired.leaving
        ]
        n = desired.targets.get(role, 0) - len(live)
        if n > 0 and desired.may_start:
            actions += [StartWorker(role)] * n
        elif n < 0:
            state = {r.worker_id: r.state for r in live}
            for worker_id in removal_order(removal_candidates(live, unique_blocks))[:-n]:
                actions.append(KillWorker(worker_id) if state[worker_id] == "starting" else DrainWorker(worker_id))
    actions += [StartFrontend(i) for i in range(desired.frontends) if i not in frontends]
    return actions
