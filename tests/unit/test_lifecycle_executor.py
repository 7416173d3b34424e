"""The lifecycle's executor against fake worker actors (no Ray): it starts what the plan asks, wires each new
worker to the others exactly once, replaces a dead worker, drains a removed one without replacing it, and
shuts everything down; every outcome lands in the registry, and the router's views follow the registry."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pdserve.controller import lifecycle as lifecycle_mod
from pdserve.controller.lifecycle import Lifecycle
from pdserve.controller.metrics import ControllerMetrics
from pdserve.controller.reconcile import StartWorker
from pdserve.controller.registry import Registry
from pdserve.router.router import Router, RouterConfig
from tests.conftest import serve_config


class Remote:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


class FakeWorker:
    """A worker actor's methods as the lifecycle calls them; `kill` makes `wait_closed` fail, as Ray's does."""

    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id, self.role, self.peers, self.calls = worker_id, role, [], []
        self._closed = asyncio.get_running_loop().create_future()
        for name in ("start", "info", "add_peers", "set_controller", "keep_note", "wait_closed", "drain",
                     "leak_report", "shutdown", "migratable"):  # fmt: skip
            setattr(self, name, Remote(getattr(self, f"_{name}")))

    async def _start(self):
        return f"peer:{self.worker_id}"

    async def _info(self):
        return SimpleNamespace(worker_id=self.worker_id, role=self.role, node_id="n", pid=1, started_at=0.0, peer=None)

    async def _add_peers(self, peers):
        self.peers += peers

    async def _set_controller(self, me):
        pass

    async def _keep_note(self, note):
        pass

    async def _wait_closed(self):
        await asyncio.shield(self._closed)

    async def _drain(self):
        self.calls.append("drain")

    async def _leak_report(self):
        return ""

    async def _shutdown(self):
        self.calls.append("shutdown")
        if not self._closed.done():
            self._closed.set_result(None)

    async def _migratable(self):
        return []

    def kill(self) -> None:
        if not self._closed.done():
            self._closed.set_exception(RuntimeError("actor died"))


async def until(condition) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the lifecycle did not get there")


def test_start_wire_replace_drain_and_shutdown(monkeypatch):
    workers: dict[str, FakeWorker] = {}

    def create(config, worker_id, role):
        workers[worker_id] = FakeWorker(worker_id, role)
        return workers[worker_id]

    monkeypatch.setattr(lifecycle_mod, "create_worker", create)
    monkeypatch.setattr(lifecycle_mod.ray, "kill", lambda handle, **kw: handle.kill())

    async def scenario():
        reg, router = Registry({"decode": 2}), Router(RouterConfig())
        reg.listen(router.project)
        config = serve_config(pools={"prefill": 0, "decode": 2})
        life = Lifecycle(config, reg, router, ControllerMetrics(lambda: reg), None)
        assert life.reconcile() == [StartWorker("decode")] * 2 and life.reconcile() == []  # nothing asked twice
        await until(life.at_target)
        assert set(router.views) == {"decode-1", "decode-2"}
        assert workers["decode-1"].peers == ["peer:decode-2"] and workers["decode-2"].peers == ["peer:decode-1"]
        assert [p for _, p in reg.peers()] == ["peer:decode-1", "peer:decode-2"]

        workers["decode-1"].kill()  # dies: out of the router and the mesh, then replaced
        await until(lambda: reg.workers["decode-1"].state == "dead")
        assert set(router.views) == {"decode-2"} and [w for w, _ in reg.peers()] == ["decode-2"]
        assert life.reconcile() == [StartWorker("decode")]
        await until(life.at_target)
        assert workers["decode-3"].peers == ["peer:decode-2"] and workers["decode-2"].peers[-1] == "peer:decode-3"

        await life.remove("decode-2")  # drained, stopped, not replaced
        assert reg.workers["decode-2"].state == "dead" and workers["decode-2"].calls == ["drain", "shutdown"]
        assert reg.targets["decode"] == 1 and life.reconcile() == [] and set(router.views) == {"decode-3"}

        await life.shutdown()
        assert all(r.state == "dead" for r in reg.workers.values()) and router.views == {}
        assert workers["decode-3"].calls == ["shutdown"] and life.reconcile() == []

    asyncio.run(scenario())
