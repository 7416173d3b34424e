"""The lifecycle's plan as a table: (desired, registry records) -> actions; the one removal order ("who leaves
first") as a table; and the autoscaler's actuation choosing the worker that the plan's scale-in drains."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pdserve.autoscale.actuate import Autoscaler
from pdserve.autoscale.policy import ScaleDecision
from pdserve.autoscale.removal import RemovalCandidate, removal_order
from pdserve.controller.reconcile import (
    Desired,
    DrainWorker,
    KillWorker,
    StartFrontend,
    StartWorker,
    StopFrontend,
    StopWorker,
    plan,
)
from pdserve.controller.registry import Registry, WorkerRecord
from pdserve.protocol import WorkerStats
from tests.conftest import serve_config


def stats(worker_id: str, running: int = 0) -> WorkerStats:
    return WorkerStats(
        worker_id=worker_id, role="decode", num_running=running, num_waiting=0, num_held=0, num_free_blocks=10,
        num_blocks=10, kv_usage=0.0, num_prefill_tokens_queued=0, time=0.0,
    )  # fmt: skip


def w(spec: str, running: int = 0) -> WorkerRecord:
    """'decode-1:ready' -> a record of role decode, id decode-1, in state ready."""
    worker_id, state = spec.split(":")
    return WorkerRecord(worker_id, worker_id.rsplit("-", 1)[0], state=state, stats=stats(worker_id, running))


def targets(prefill: int = 0, decode: int = 0, colocated: int = 0) -> dict[str, int]:
    return {"prefill": prefill, "decode": decode, "colocated": colocated}


CACHED = {"decode-1": 50, "decode-2": 0, "decode-3": 0}  # blocks only that worker caches

PLANS = [
    ("at target", Desired(targets(1, 2)), [w("prefill-1:ready"), w("decode-1:ready"), w("decode-2:ready")], []),
    ("a missing worker", Desired(targets(1, 2)), [w("prefill-1:ready"), w("decode-1:ready")], [StartWorker("decode")]),
    ("an empty deployment", Desired(targets(1, 1)), [], [StartWorker("prefill"), StartWorker("decode")]),
    ("a dead worker is replaced", Desired(targets(decode=2)), [w("decode-1:dead"), w("decode-2:ready")],
     [StartWorker("decode")]),
    ("a dead worker asked to leave is not replaced", Desired(targets(decode=1), leaving={"decode-1"}),
     [w("decode-1:dead"), w("decode-2:ready")], []),
    ("no start during the backoff", Desired(targets(decode=2), may_start=False),
     [w("decode-1:dead"), w("decode-2:ready")], []),
    ("scale-in drains the one that loses least", Desired(targets(decode=2)),
     [w("decode-1:ready", 1), w("decode-2:ready", 3), w("decode-3:ready", 1)], [DrainWorker("decode-3")]),
    ("scale-in by two, in the removal order", Desired(targets(decode=1)),
     [w("decode-1:ready", 1), w("decode-2:ready", 3), w("decode-3:ready", 1)],
     [DrainWorker("decode-3"), DrainWorker("decode-1")]),
    ("scale-in: fewest running first", Desired(targets(decode=2)),
     [w("decode-1:ready", 0), w("decode-2:ready", 3), w("decode-3:ready", 1)], [DrainWorker("decode-1")]),
    ("scale-in kills a starting worker first", Desired(targets(decode=1)),
     [w("decode-1:ready"), w("decode-2:starting")], [KillWorker("decode-2")]),
    ("a ready worker asked to leave is drained", Desired(targets(decode=1), leaving={"decode-1"}),
     [w("decode-1:ready"), w("decode-2:ready")], [DrainWorker("decode-1")]),
    ("a starting worker asked to leave is killed", Desired(targets(decode=1), leaving={"decode-2"}),
     [w("decode-1:ready"), w("decode-2:starting")], [KillWorker("decode-2")]),
    ("a draining worker is left alone and replaced", Desired(targets(decode=2), leaving={"decode-1"}),
     [w("decode-1:draining"), w("decode-2:ready")], [StartWorker("decode")]),
    ("a draining worker does not count", Desired(targets(decode=1)), [w("decode-1:draining"), w("decode-2:ready")], []),
    ("a role flip", Desired(targets(1, 2)), [w("prefill-1:ready", 2), w("prefill-2:ready"), w("decode-1:ready")],
     [DrainWorker("prefill-2"), StartWorker("decode")]),
    ("frontends missing", Desired(targets(decode=1), frontends=3), [w("decode-1:ready")],
     [StartFrontend(0), StartFrontend(2)]),
    ("shutdown", Desired(targets(decode=2), frontends=3, stopping=True),
     [w("decode-1:ready"), w("decode-2:draining"), w("decode-3:dead"), w("prefill-4:starting")],
     [StopWorker("decode-1"), StopWorker("decode-2"), StopWorker("prefill-4"), StopFrontend(1)]),
]  # fmt: skip


@pytest.mark.parametrize("desired, workers, expected", [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(desired, workers, expected):
    assert plan(desired, workers, frontends={1}, unique_blocks=lambda wid: CACHED.get(wid, 0)) == expected


def test_planning_again_asks_for_nothing_twice():
    """Each action's first effect lands in the registry at once: the next plan sees it."""
    reg = Registry(targets(decode=2))
    reg.add(WorkerRecord("decode-1", "decode", state="ready"))
    assert plan(Desired(reg.targets), reg.workers.values()) == [StartWorker("decode")]
    reg.add(WorkerRecord("decode-2", "decode"))  # what the executor does for StartWorker, before any await
    assert plan(Desired(reg.targets), reg.workers.values()) == []
    reg.shrink_target("decode")
    (drain,) = plan(Desired(reg.targets), reg.workers.values())
    assert drain == KillWorker("decode-2")
    reg.set_state("decode-2", "dead")
    assert plan(Desired(reg.targets), reg.workers.values()) == []


ORDERS = [
    ("starting before ready", [RemovalCandidate("d-1", 0, 0), RemovalCandidate("d-2", 9, 9, starting=True)],
     ["d-2", "d-1"]),
    ("fewest running", [RemovalCandidate("d-1", 3, 0), RemovalCandidate("d-2", 1, 500)], ["d-2", "d-1"]),
    ("then least cached nowhere else", [RemovalCandidate("d-1", 2, 40), RemovalCandidate("d-2", 2, 10)],
     ["d-2", "d-1"]),
    ("then the newest", [RemovalCandidate("d-3", 0, 0), RemovalCandidate("d-7", 0, 0), RemovalCandidate("d-12", 0, 0)],
     ["d-12", "d-7", "d-3"]),
    ("all of it", [RemovalCandidate("d-1", 1, 0), RemovalCandidate("d-2", 0, 5), RemovalCandidate("d-3", 0, 1),
                   RemovalCandidate("d-4", 4, 4, starting=True)], ["d-4", "d-3", "d-2", "d-1"]),
    ("nobody", [], []),
]  # fmt: skip


@pytest.mark.parametrize("candidates, expected", [o[1:] for o in ORDERS], ids=[o[0] for o in ORDERS])
def test_removal_order(candidates, expected):
    assert removal_order(candidates) == expected


def test_the_autoscaler_and_scale_in_pick_the_same_worker():
    cached = {"decode-1": 0, "decode-2": 30, "decode-3": 2, "decode-4": 2}
    running = {"decode-1": 4, "decode-2": 1, "decode-3": 1, "decode-4": 1}
    reg = Registry(targets(decode=4))
    for wid in cached:
        reg.add(WorkerRecord(wid, "decode", state="ready", stats=stats(wid, running[wid])))
    reg.shrink_target("decode")
    scale_in = plan(Desired(reg.targets), reg.workers.values(), unique_blocks=cached.__getitem__)
    assert scale_in == [DrainWorker("decode-4")]  # decode-3 and -4 tie on load and cache: the newest

    removed = []

    async def remove(worker_id):
        removed.append(worker_id)

    router = SimpleNamespace(index=SimpleNamespace(unique_blocks=cached.__getitem__))
    lifecycle = SimpleNamespace(remove=remove)
    config = serve_config(pools={"prefill": 0, "decode": 4}, autoscaling={"enabled": True, "prometheus_url": "x"})
    auto = Autoscaler(config, reg, router, lifecycle, None, None)
    decision = ScaleDecision("scale_in", "demand_fell", targets(decode=2), {})
    asyncio.run(auto.act(decision))
    assert removed[0] == scale_in[0].worker_id
