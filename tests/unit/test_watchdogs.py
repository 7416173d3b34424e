"""Hang detection without Ray: a frontend that answers no ping is killed (and dropped, so the next reconcile
replaces it); a controller that answers nothing is killed for Ray to restart; a routing call to a silent
controller fails its requests instead of waiting forever. The actors are fakes whose calls never answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.cluster import membership as membership_mod
from pdserve.cluster.membership import Membership
from pdserve.cluster.routing import RouteBatcher
from pdserve.config import ServeConfig
from pdserve.controller import frontends as frontends_mod
from pdserve.controller.frontends import Frontends
from pdserve.controller.registry import FrontendRecord, Registry
from pdserve.protocol import RouteRequest


class Method:
    """`.remote()` returns a future that `answer` resolves (or never, when it is None)."""

    def __init__(self, answer=None) -> None:
        self.answer, self.calls = answer, 0
        self.pending: list[asyncio.Future] = []

    def remote(self, *args):
        self.calls += 1
        fut = asyncio.get_running_loop().create_future()
        if self.answer is not None:
            fut.set_result(self.answer(*args))
        self.pending.append(fut)
        return fut


class Actor:
    def __init__(self, **methods: Method) -> None:
        self.__dict__.update(methods)


class Kills:
    def __init__(self) -> None:
        self.killed: list[tuple[object, dict]] = []

    def __call__(self, handle, **kw) -> None:
        self.killed.append((handle, kw))
        for method in vars(handle).values():  # a killed actor's calls fail, as Ray's do
            for fut in method.pending:
                if not fut.done():
                    fut.set_exception(RuntimeError("actor died"))


def test_a_frontend_that_answers_no_ping_is_killed_and_dropped(monkeypatch):
    kills = Kills()
    monkeypatch.setattr(frontends_mod.ray, "kill", kills)
    config = ServeConfig(failure={"frontend_timeout_s": 0.3})

    async def scenario():
        fe = Frontends(config, Registry({}), spawn=asyncio.ensure_future, failed=lambda why: None)
        healthy = Actor(pid=Method(lambda: 42), wait_closed=Method())
        hung = Actor(pid=Method(), wait_closed=Method())
        for i, handle in enumerate((healthy, hung)):
            fe.registry.add_frontend(FrontendRecord(i, handle, f"u{i}", "ready", i))
        watches = [asyncio.ensure_future(fe._watch(i, h)) for i, h in enumerate((healthy, hung))]
        start = time.monotonic()
        await asyncio.wait_for(watches[1], 5)
        took = time.monotonic() - start
        assert not watches[0].done() and healthy.pid.calls >= 2  # pinged, answering: left alone
        watches[0].cancel()
        return fe, took, hung

    fe, took, hung = asyncio.run(scenario())
    assert len(kills.killed) == 1 and kills.killed[0][0] is hung and 0.3 <= took < 2.0
    assert 1 not in fe.frontends and 0 in fe.frontends  # the hung one is gone: reconcile starts a new one


def test_a_silent_controller_is_killed_for_ray_to_restart(monkeypatch):
    kills = Kills()
    monkeypatch.setattr(membership_mod.ray, "kill", kills)
    monkeypatch.setattr(membership_mod, "PING_S", 0.2)

    async def scenario(controller):
        m = Membership(controller, deliver=None, worker_left=None, controller_timeout_s=0.5)
        m.last_answer = time.monotonic()
        task = asyncio.ensure_future(m._watch_controller())
        await asyncio.sleep(2.2)
        m._closed = True
        task.cancel()
        return m

    answering = Actor(ping=Method(lambda: True))
    m = asyncio.run(scenario(answering))
    assert m.controller_kills == 0 and answering.ping.calls >= 1 and not kills.killed
    silent = Actor(ping=Method())
    m = asyncio.run(scenario(silent))
    assert m.controller_kills >= 1 and kills.killed[0] == (silent, {"no_restart": False})


@pytest.mark.parametrize("answers", [True, False])
def test_routing_calls_to_a_silent_controller_fail_within_the_timeout(answers):
    controller = Actor(route_batch=Method((lambda reqs: ["routed"] * len(reqs)) if answers else None))

    async def scenario():
        batcher = RouteBatcher(controller, timeout_s=0.3)
        reqs = [RouteRequest(request_id=f"r{i}", num_prompt_tokens=4, max_tokens=1) for i in range(3)]
        return await asyncio.gather(*(batcher.route(r) for r in reqs), return_exceptions=True)

    start = time.monotonic()
    results = asyncio.run(scenario())
    if answers:
        assert results == ["routed"] * 3
    else:
        assert all(isinstance(r, TimeoutError) for r in results) and time.monotonic() - start < 2.0
