"""Live migration in a deployment of Ray actors: a request moved mid-stream by the operator (and back) keeps
its exact tokens over NIXL and the collective transport (Gloo), P/D included; the rebalancer spreads a
pile-up onto a worker that joined empty; draining empties a busy worker by migration; a target or source
killed mid-migration loses no request. Every stream is checked against an undisturbed run and for leaks."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray

from pdserve import LLM, SamplingParams
from pdserve.controller.deploy import build
from pdserve.live.poll import wait_for
from tests.conftest import serve_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = [[(5 * i + 11 * j) % 250 + 3 for i in range(80 + 9 * j)] for j in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=77, max_tokens=160, ignore_eos=True)
_ref: dict = {}


def COLOCATED(n: int) -> dict:  # noqa: N802
    return {"prefill": 0, "decode": 0, "colocated": n}


def reference(i: int, params: SamplingParams) -> list[int]:
    key = (i, params.seed, params.max_tokens)
    if key not in _ref:
        llm = _ref.setdefault("llm", LLM(num_kv_blocks=512, enable_prefix_caching=False))
        _ref[key] = llm.generate([PROMPTS[i]], params)[0].token_ids
    return _ref[key]


@pytest.fixture(scope="module")
def runner():
    loop = asyncio.new_event_loop()
    ray.init(num_cpus=12, include_dashboard=False, namespace="pdserve-test-migration")
    yield loop
    ray.shutdown()
    loop.close()


class Stream:
    """One request through the deployment's client, its deltas kept with their token indices."""

    def __init__(self, client, rid: str, i: int, params: SamplingParams) -> None:
        self.rid, self.i, self.params, self.tokens, self.indices = rid, i, params, [], []
        self.task = asyncio.ensure_future(self._run(client))

    async def _run(self, client) -> None:
        async for d in client.generate(self.rid, PROMPTS[self.i], self.params):
            self.indices += range(d.index, d.index + len(d.new_token_ids))
            self.tokens += d.new_token_ids

    async def until(self, n: int) -> None:
        await wait_for(lambda: _ready(len(self.tokens) >= n), 60, f"{self.rid} to reach {n} tokens", 0.005)

    async def check(self) -> None:
        await asyncio.wait_for(self.task, 120)
        assert self.indices == list(range(len(self.tokens))), "a gap or a repeat in the client's stream"
        assert self.tokens == reference(self.i, self.params)


async def _ready(value):
    return value


async def leak_free(dep) -> None:
    last = {}

    async def clean():
        st = await dep.controller.status.remote()
        live = [w["worker_id"] for w in st["workers"] if w["state"] == "ready"]
        reports = await asyncio.gather(*(dep.handles[w].leak_report.remote() for w in live))
        last.update(zip(live, reports))
        return not any(reports)

    try:
        await wait_for(clean, 20, "every worker to hold no KV block")
    except AssertionError as e:
        raise AssertionError(f"{e}: {last}") from None


async def workers(dep, role: str) -> list[str]:
    st = await dep.controller.status.remote()
    return sorted(w["worker_id"] for w in st["workers"] if w["state"] == "ready" and w["role"] == role)


@pytest.mark.parametrize("transport", ["nixl", "nccl"])
def test_operator_migration_keeps_every_token(runner, transport):
    """P/D with two decode workers: greedy and seeded requests moved D1 -> D2 -> D1 mid-stream."""
    cfg = serve_config(
        engine={"num_kv_blocks": 512}, pools={"prefill": 1, "decode": 2}, kv={"transport": transport},
        migration={"rebalance": False}, routing={"disagg": {"local_prefill_max_tokens": -1}},
    )  # fmt: skip
    for params in (GREEDY, SEEDED):
        reference(0, params)

    async def scenario():
        dep = await build(cfg)
        try:
            for n, params in enumerate((GREEDY, SEEDED)):
                s = Stream(dep.client, f"op-{transport}-{n}", 0, params)
                for hop in range(2):
                    await s.until(10 + 50 * hop)
                    records = await dep.controller.migrate.remote(s.rid, None)
                    assert [r.outcome for r in records] == ["migrated"], records
                    r = records[0]
                    assert len(r.blocks_per_stage) >= 2 and r.blocks_per_stage[-1] <= 3, r
                    assert r.num_bytes > 0 and r.pause_s > 0
                await s.check()
            with pytest.raises(ray.exceptions.RayTaskError, match="not running"):
                await dep.controller.migrate.remote("cmpl-nothing", None)
            await leak_free(dep)
        finally:
            await dep.shutdown()

    runner.run_until_complete(scenario())


def test_rebalancer_spreads_a_pile_up_onto_a_new_worker(runner):
    cfg = serve_config(
        engine={"num_kv_blocks": 2048}, pools=COLOCATED(1),
        migration={"rebalance_interval_s": 0.3, "rebalance_threshold": 16.0},
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)  # outlasts the new worker's start
    for i in range(2):
        reference(i, params)

    async def scenario():
        dep = await build(cfg)
        try:
            streams = [Stream(dep.client, f"pile-{k}", k % 2, params) for k in range(8)]
            for s in streams:
                await s.until(3)
            await dep.controller.scale.remote(colocated=2)

            async def balanced():
                st = await dep.controller.status.remote()
                running = [w["running"] for w in st["workers"] if w["state"] == "ready"]
                return len(running) == 2 and min(running) >= 3

            await wait_for(balanced, 90, "the rebalancer to move requests onto the new worker")
            moved = [r for r in await dep.controller.migrations.remote() if r.reason == "rebalance"]
            assert moved and all(r.outcome in ("migrated", "finished") for r in moved), moved
            for s in streams:
                await s.check()
            await leak_free(dep)
        finally:
            await dep.shutdown()

    runner.run_until_complete(scenario())


def test_draining_a_busy_worker_migrates_its_requests(runner):
    cfg = serve_config(
        engine={"num_kv_blocks": 2048, "max_num_seqs": 64}, pools=COLOCATED(2),
        migration={"rebalance": False}, routing={"policy": "round_robin"},
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=800, ignore_eos=True)
    for i in range(4):
        reference(i, params)

    async def scenario():
        dep = await build(cfg)
        try:
            streams = [Stream(dep.client, f"drain-{k}", k % 4, params) for k in range(32)]
            for s in streams:
                await s.until(3)
            deadline = time.monotonic() + 15  # status shows the workers' last reports: wait for one with them
            while True:
                st = await dep.controller.status.remote()
                busy = max((w for w in st["workers"] if w["state"] == "ready"), key=lambda w: w["running"])
                if busy["running"] >= 16 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert busy["running"] >= 16, st["workers"]
            t0 = time.monotonic()
            await dep.controller.drain.remote(busy["worker_id"])
            took = time.monotonic() - t0
            drained = [r for r in await dep.controller.migrations.remote() if r.reason == "drain"]
            assert sum(r.outcome == "migrated" for r in drained) >= 16, drained
            assert took < 20, f"draining took {took:.1f} s"
            print(f"drained {busy['running']} running requests by migration in {took:.2f} s")
            for s in streams:
                await s.check()  # no client error, every token right
            await leak_free(dep)
        finally:
            await dep.shutdown()

    runner.run_until_complete(scenario())


@pytest.mark.parametrize("victim", ["target", "source"])
def test_a_worker_killed_mid_migration_loses_no_request(runner, victim):
    cfg = serve_config(
        engine={"num_kv_blocks": 512}, pools=COLOCATED(2), migration={"rebalance": False},
        failure={"max_request_retries": 2},
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    reference(1, params)

    async def scenario():
        dep = await build(cfg)
        try:
            s = Stream(dep.client, f"kill-{victim}", 1, params)
            await s.until(5)
            names = await workers(dep, "colocated")
            found = await asyncio.gather(*(dep.handles[w].find.remote(s.rid) for w in names))
            source = next(w for w, f in zip(names, found) if f)
            target = next(w for w in names if w != source)
            await dep.handles[target].inject_fault.remote("stall_migration")  # stage 1 waits 3 s there
            migration = dep.controller.migrate.remote(s.rid, target)
            await asyncio.sleep(1.0)
            pid = (await dep.handles[victim == "target" and target or source].info.remote()).pid
            os.kill(pid, signal.SIGKILL)
            if victim == "target":  # the request carries on at the source, untouched
                records = await migration
                assert records[0].outcome == "failed", records
            else:  # the controller's call on the source fails; the client continues the stream elsewhere
                with pytest.raises(ray.exceptions.RayTaskError):
                    await migration
            await s.check()  # carried on at the source, or continued elsewhere after the source's death

            async def replaced():
                return len(await workers(dep, "colocated")) == 2

            await wait_for(replaced, 60, "the dead worker's replacement")
            await leak_free(dep)
        finally:
            await dep.shutdown()

    runner.run_until_complete(scenario())
