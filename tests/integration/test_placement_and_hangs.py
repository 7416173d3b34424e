"""Placement by role (`pools.resources` pins each role to nodes holding a Ray resource) and a hung worker
(SIGSTOP: alive but silent) found dead by its missing heartbeats, killed and replaced."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray

from pdserve.controller.deploy import build
from pdserve.live.poll import wait_for
from tests.conftest import serve_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def runner():
    loop = asyncio.new_event_loop()
    # one "node" with room for one prefill and two decode workers, as a GPU node group would offer
    ray.init(num_cpus=8, resources={"pdserve_prefill": 1, "pdserve_decode": 2}, include_dashboard=False)
    yield loop
    ray.shutdown()
    loop.close()


def test_roles_are_pinned_by_resources_and_a_hung_worker_is_replaced(runner):
    cfg = serve_config(
        engine={"num_kv_blocks": 128},
        pools={"prefill": 1, "decode": 1, "resources": {"prefill": {"pdserve_prefill": 1},
                                                        "decode": {"pdserve_decode": 1}}},
        failure={"worker_timeout_s": 3},
    )  # fmt: skip

    async def scenario():
        dep = await build(cfg)
        stopped = None
        try:
            # a second prefill worker has no node with `pdserve_prefill` left: it waits; a decode one fits
            await dep.controller.scale.remote(prefill=2, decode=2)

            async def decode_joined():
                st = await dep.controller.status.remote()
                return [w for w in st["workers"] if w["role"] == "decode" and w["state"] == "ready"][1:]

            await wait_for(decode_joined, 60, "the second decode worker")
            await asyncio.sleep(3)
            st = await dep.controller.status.remote()
            states = sorted((w["role"], w["state"]) for w in st["workers"])
            assert states == [("decode", "ready")] * 2 + [("prefill", "ready"), ("prefill", "starting")]
            await dep.controller.scale.remote(prefill=1)  # the pending one is dropped
            # -- a hung decode worker: its reports stop, it is declared dead, killed and replaced
            victim = [w for w in st["workers"] if w["role"] == "decode"][0]
            os.kill(victim["pid"], signal.SIGSTOP)
            stopped = victim["pid"]

            async def replaced():
                now = await dep.controller.status.remote()
                rows = {w["worker_id"]: w for w in now["workers"]}
                ready = [w for w in now["workers"] if w["role"] == "decode" and w["state"] == "ready"]
                return rows[victim["worker_id"]]["state"] == "dead" and len(ready) == 2

            await wait_for(replaced, 60, "the hung worker declared dead and replaced")
            await asyncio.sleep(1)
            assert not _alive(victim["pid"]), "the hung worker's process was not killed"
            stopped = None
            out = []
            async for d in dep.client.generate("after-hang", list(range(10, 90)), _greedy()):
                out += d.new_token_ids
            assert len(out) == 8
        finally:
            if stopped is not None and _alive(stopped):
                os.kill(stopped, signal.SIGCONT)
            await dep.shutdown()

    runner.run_until_complete(asyncio.wait_for(scenario(), 300))


def _greedy():
    from pdserve import SamplingParams

    return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
