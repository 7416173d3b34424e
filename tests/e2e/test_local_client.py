"""LocalClient on its own (no HTTP): one hand-off per engine step, abort on early close, bounded
admission, the health probe and stats."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.config import EngineConfig
from pdserve.engine_client import Overloaded, ServiceUnavailable
from pdserve.live.thread import engine_call, wait_idle
from pdserve.protocol import SamplingParams
from pdserve.workers.local_client import LocalClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def local():
    backend = LocalClient(EngineConfig(num_kv_blocks=64), max_queued=4)
    yield backend
    backend.engine_thread.stop()


def test_one_asyncio_callback_per_engine_step(local, monkeypatch):
    routed: list[int] = []
    steps: list[int] = []
    route, step = local._route, local.engine.step

    def counting_route(deltas):
        routed.append(len(deltas))
        route(deltas)

    def counting_step():
        out = step()
        if out:
            steps.append(len(out))
        return out

    monkeypatch.setattr(local, "_route", counting_route)
    monkeypatch.setattr(local.engine, "step", counting_step)
    ids = local.info.encode_prompt("batch me")

    async def consume(i):
        params = SamplingParams(max_tokens=8, temperature=0)
        return [d async for d in local.generate(f"r{i}", ids, params)]

    async def main():
        return await asyncio.gather(*(consume(i) for i in range(4)))

    results = asyncio.run(main())
    assert all(sum(len(d.new_token_ids) for d in r) == 8 and r[-1].finished for r in results)
    assert routed == steps  # exactly one call_soon_threadsafe per step, carrying the whole batch
    assert max(routed) == 4
    wait_idle(local)


def test_closing_the_stream_aborts_and_admission_is_bounded(local):
    ids = local.info.encode_prompt("long")

    async def main():
        streams = [local.generate(f"long{i}", ids, SamplingParams(max_tokens=3000)) for i in range(4)]
        for s in streams:
            await s.__anext__()
        with pytest.raises(Overloaded) as info:
            await local.generate("one-too-many", ids, SamplingParams()).__anext__()
        assert info.value.status == 429 and info.value.retry_after > 0
        await local.check_health()  # the probe bypasses admission
        stats = await local.stats()
        for s in streams:
            await s.aclose()
        return stats

    stats = asyncio.run(main())
    (worker,) = stats["workers"]
    assert worker["running"] + worker["waiting"] == 4 and 0 < worker["kv_usage"] <= 1
    assert worker["num_free_blocks"] < worker["num_blocks"] == 64
    wait_idle(local)
    assert engine_call(local, lambda e: e.num_computed_tokens_total) < 4 * 1000


def test_duplicate_request_id_is_refused(local):
    ids = local.info.encode_prompt("dup")

    async def main():
        first = local.generate("same", ids, SamplingParams(max_tokens=50))
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await local.generate("same", ids, SamplingParams()).__anext__()
        await first.aclose()

    asyncio.run(main())
    wait_idle(local)


def test_stopped_engine_fails_open_streams_and_health():
    backend = LocalClient(EngineConfig(num_kv_blocks=16))
    ids = backend.info.encode_prompt("x")

    async def main():
        stream = backend.generate("a", ids, SamplingParams(max_tokens=3000))
        await stream.__anext__()
        await backend.shutdown()
        await backend.shutdown()  # idempotent
        with pytest.raises(ServiceUnavailable):
            async for _ in stream:
                pass
        with pytest.raises(ServiceUnavailable):
            await backend.check_health()
        with pytest.raises(ServiceUnavailable):
            await backend.generate("b", ids, SamplingParams()).__anext__()
        assert (await backend.stats())["workers"] == []

    asyncio.run(main())
