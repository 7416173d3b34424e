"""The P/D deployment on a local Ray cluster (no HTTP): parity, concurrency, leaks, the handoff transaction."""

import asyncio
import time

import pytest
import ray

from pdserve import LLM, SamplingParams
from pdserve.config import EngineConfig
from pdserve.controller.deploy import build
from pdserve.engine_client import ServiceUnavailable
from pdserve.protocol import EngineRequest
from tests.conftest import serve_config

pytestmark = pytest.mark.ray

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[(5 * i + j) % 250 for i in range(n)] for j, n in enumerate((7, 40, 90))]


@pytest.fixture(scope="module")
def runner():
    loop = asyncio.new_event_loop()
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-test")
    yield loop
    ray.shutdown()
    loop.close()


@pytest.fixture(scope="module")
def pd(runner):
    cfg = serve_config(engine=EngineConfig(num_kv_blocks=128), pools={"prefill": 1, "decode": 1}, worker={"lease_s": 3})
    dep = runner.run_until_complete(build(cfg))
    yield dep
    runner.run_until_complete(dep.shutdown())


def collect(client, rid, ids, params):
    async def go():
        out = []
        async for d in client.generate(rid, ids, params):
            out += d.new_token_ids
        return out

    return go()


def role_handle(dep, role):
    return next(h for w, h in dep.handles.items() if w.startswith(role))


async def wait_no_leak(dep, timeout=10.0):
    deadline = time.time() + timeout
    while True:
        reports = await asyncio.gather(*(h.leak_report.remote() for h in dep.handles.values()))
        if not any(reports) or time.time() > deadline:
            return [r for r in reports if r]
        await asyncio.sleep(0.1)


def test_disaggregated_equals_offline(runner, pd):
    offline = LLM(num_kv_blocks=128)
    expected = [o.token_ids for o in offline.generate(PROMPTS, GREEDY)]
    got = [runner.run_until_complete(collect(pd.client, f"par-{i}", p, GREEDY)) for i, p in enumerate(PROMPTS)]
    assert got == expected
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    assert (
        runner.run_until_complete(collect(pd.client, "seeded", PROMPTS[1], seeded))
        == offline.generate([PROMPTS[1]], seeded)[0].token_ids
    )
    assert runner.run_until_complete(wait_no_leak(pd)) == []


def test_32_concurrent_requests_complete_without_leaks(runner, pd):
    offline = LLM(num_kv_blocks=256)
    prompts = [[(3 * i + j) % 250 for i in range(10 + j)] for j in range(32)]
    expected = [o.token_ids for o in offline.generate(prompts, GREEDY)]

    async def all_of_them():
        return await asyncio.gather(*(collect(pd.client, f"c-{j}", p, GREEDY) for j, p in enumerate(prompts)))

    assert runner.run_until_complete(all_of_them()) == expected
    assert runner.run_until_complete(wait_no_leak(pd)) == []


def test_cancel_mid_stream_frees_blocks_on_both_workers(runner, pd):
    async def cancel_after(n):
        gen = pd.client.generate("cancel", PROMPTS[2], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        got = 0
        async for d in gen:
            got += len(d.new_token_ids)
            if got >= n:
                break
        await gen.aclose()

    runner.run_until_complete(cancel_after(1))  # right after the handoff
    runner.run_until_complete(cancel_after(5))  # while decoding
    assert runner.run_until_complete(wait_no_leak(pd)) == []


def test_unclaimed_handoff_is_freed_when_the_lease_expires(runner, pd):
    prefill = role_handle(pd, "prefill")
    req = EngineRequest(request_id="orphan", prompt_token_ids=PROMPTS[2], params=GREEDY)
    result = runner.run_until_complete(prefill.prefill.remote(req))
    assert result.handoff is not None and result.handoff.block_ids
    assert runner.run_until_complete(prefill.leak_report.remote()) is not None  # held under the lease
    start = time.time()
    assert runner.run_until_complete(wait_no_leak(pd, timeout=10)) == []
    assert time.time() - start < pd.config.worker.lease_s + 2


def test_killed_decode_worker_fails_the_request_and_prefill_frees(runner):
    cfg = serve_config(engine=EngineConfig(num_kv_blocks=64), pools={"prefill": 1, "decode": 1}, worker={"lease_s": 30})
    dep = runner.run_until_complete(build(cfg))
    try:
        decode, prefill = role_handle(dep, "decode"), role_handle(dep, "prefill")

        async def run():
            gen = dep.client.generate("doomed", PROMPTS[2], SamplingParams(temperature=0, max_tokens=50))
            first = await gen.__anext__()  # prefill done: the KV is held for the decode worker
            ray.kill(decode)
            with pytest.raises(ServiceUnavailable):
                async for _ in gen:
                    pass
            return first

        start = time.time()
        first = asyncio.wait_for(run(), 20)
        assert len(runner.run_until_complete(first).new_token_ids) == 1
        deadline = time.time() + 10
        while runner.run_until_complete(prefill.leak_report.remote()) and time.time() < deadline:
            time.sleep(0.1)
        assert runner.run_until_complete(prefill.leak_report.remote()) is None
        assert time.time() - start < 10  # freed on the death notice, well before the 30 s lease
    finally:
        runner.run_until_complete(dep.shutdown())
