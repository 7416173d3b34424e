"""Routing policies and the Router (no Ray): table tests of picks, pending decisions and admission."""

import time

import pytest

from pdserve.protocol import RouteRequest, WorkerStats
from pdserve.scheduler.policies import LeastLoaded, RoundRobin, WorkerView, make_policy
from pdserve.scheduler.router import NoCapacity, Router

REQ = RouteRequest(request_id="r", num_prompt_tokens=100, max_tokens=10)


def view(wid, role="decode", **kw):
    return WorkerView(wid, role, **kw)


@pytest.mark.parametrize(
    "pool,candidates,expected",
    [
        ("decode", [view("a", num_running=3), view("b", num_running=1)], "b"),
        ("decode", [view("a", num_running=1, pending_requests=2), view("b", num_running=2)], "b"),
        ("decode", [view("a", num_running=1, kv_usage=0.9), view("b", num_running=1, kv_usage=0.1)], "b"),
        ("decode", [view("a"), view("b")], "a"),  # ties break by id: deterministic
        ("prefill", [view("a", "prefill", num_prefill_tokens_queued=500), view("b", "prefill", num_running=5)], "b"),
        (
            "prefill",
            [view("a", "prefill", pending_tokens=900), view("b", "prefill", num_prefill_tokens_queued=100)],
            "b",
        ),
    ],
)
def test_least_loaded(pool, candidates, expected):
    assert LeastLoaded().pick(candidates, REQ, pool) == expected


def test_round_robin_cycles_per_pool():
    rr = RoundRobin()
    cands = [view("b"), view("a"), view("c")]
    assert [rr.pick(cands, REQ, "decode") for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick(cands, REQ, "prefill") == "a"


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("nope")


def stats(wid, role, t=None, **kw):
    base = dict(
        num_running=0,
        num_waiting=0,
        num_held=0,
        num_free_blocks=10,
        num_blocks=10,
        kv_usage=0.0,
        num_prefill_tokens_queued=0,
    )
    base.update(kw)
    return WorkerStats(worker_id=wid, role=role, time=time.time() if t is None else t, **base)


def make_router(**kw):
    r = Router(**kw)
    for wid, role in [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")]:
        r.register(wid, role)
    return r


def test_burst_is_spread_by_recorded_decisions():
    r = make_router()
    routes = [r.route(REQ) for _ in range(4)]
    assert sorted(x.decode_worker for x in routes) == ["d0", "d0", "d1", "d1"]
    assert sorted(x.prefill_worker for x in routes) == ["p0", "p0", "p1", "p1"]
    assert all(x.reason == "disaggregated" for x in routes)


def test_a_report_supersedes_earlier_decisions_only():
    r = make_router()
    r.route(REQ)  # pending on d0 and p0
    before = time.time()
    r.route(REQ)  # pending on d1 and p1
    r.report(stats("d0", "decode", t=before, num_running=1))
    assert r.views["d0"].pending_requests == 0 and r.views["d0"].load == 1
    r.report(stats("d1", "decode", t=before - 10))
    assert r.views["d1"].pending_requests == 1  # decision made after that report was taken still counts


def test_admission_is_bounded_and_dead_workers_leave_the_pool():
    r = make_router(max_waiting_per_worker=2)
    for _ in range(4):
        r.route(REQ)
    with pytest.raises(NoCapacity) as e:
        r.route(REQ)
    assert not e.value.unavailable
    r.report(stats("d0", "decode", alive=False))
    r.remove("d1")
    with pytest.raises(NoCapacity) as e:
        r.route(REQ)
    assert e.value.unavailable


def test_colocated_workers_prefill_locally():
    r = Router()
    r.register("m0", "mixed")
    route = r.route(REQ)
    assert route.prefill_worker is None and route.decode_worker == "m0" and route.reason == "local_prefill"
