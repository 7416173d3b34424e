"""Live migration between two in-process workers over the local transport (the oracle): parity with an
undisturbed run (greedy and seeded sampling, once and back again), the stage record, every failure path
ending with the request carrying on or freed, and no block leaked anywhere."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pdserve.config import EngineConfig, MigrationConfig, WorkerConfig
from pdserve.protocol import EngineRequest, SamplingParams
from pdserve.workers.worker import Worker

CONSUMER = "frontend-test"
_ids = itertools.count()


class Handle:
    """A Ray-actor-like handle on an in-process worker: `handle.method.remote(...)` is an awaitable task."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker

    def __getattr__(self, name):
        fn = getattr(self.w, name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def run():
                    out = fn(*args, **kwargs)
                    return await out if asyncio.iscoroutine(out) else out

                return asyncio.ensure_future(run())

        return _Method()


def make_worker(name: str, num_kv_blocks: int = 256, **migration) -> tuple[Worker, Handle]:
    cfg = EngineConfig(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=256)
    w = Worker(name, "decode", cfg, WorkerConfig(), "local", migration=MigrationConfig(**migration))
    h = Handle(w)
    w.migrator.self_handle = h
    return w, h


def pair(**migration):
    (a, ha), (b, hb) = make_worker(f"a{next(_ids)}", **migration), make_worker(f"b{next(_ids)}", **migration)
    a.add_peers([b.peer_info()])
    b.add_peers([a.peer_info()])
    return (a, ha), (b, hb)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(7 * i + 13 * seed) % 240 + 10 for i in range(n)]


async def collect(workers: list[Worker], rid: str, timeout_s: float = 60.0) -> list:
    """Every delta of `rid` from every worker's outbox, until the finished one."""
    got = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not any(d.finished for d in got):
        assert asyncio.get_running_loop().time() < deadline, f"{rid} never finished: {len(got)} deltas"
        polls = await asyncio.gather(*(w.poll_outputs(0.02, CONSUMER) for w in workers))
        got += [d for batch in polls for d in batch if d.request_id == rid]
    return got


def tokens_of(deltas) -> list[int]:
    """The stream as a frontend assembles it: by token index, each index once; no gap allowed."""
    out: dict[int, int] = {}
    for d in deltas:
        for i, t in enumerate(d.new_token_ids):
            assert out.setdefault(d.index + i, t) == t, f"token {d.index + i} differs between sources"
    assert sorted(out) == list(range(len(out))), "a gap in the token indices"
    return [out[i] for i in range(len(out))]


async def reference(params: SamplingParams, ids: list[int]) -> list[int]:
    w, _ = make_worker(f"ref-{next(_ids)}")
    try:
        rid = f"ref-{next(_ids)}"
        await w.generate(EngineRequest(request_id=rid, prompt_token_ids=ids, params=params, reply_to=CONSUMER))
        return tokens_of(await collect([w], rid))
    finally:
        await w.shutdown()


async def leak_free(*workers: Worker) -> None:
    for w in workers:
        for _ in range(100):  # releases are fire-and-forget: give them a moment
            if await w.leak_report() is None and not w.engine.requests:
                break
            await asyncio.sleep(0.02)
        assert await w.leak_report() is None, w.worker_id
        assert not w.engine.requests, (w.worker_id, list(w.engine.requests))
        assert not w.receiver.num_staging


async def wait_tokens(w: Worker, rid: str, n: int) -> None:
    while True:
        req = w.engine.requests.get(rid)
        if req is not None and len(req.output_token_ids) >= n:
            return
        await asyncio.sleep(0.005)


PARAMS = {
    "greedy": SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=48, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True),
}


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("hops", [1, 2])
def test_migrated_stream_equals_an_undisturbed_run(kind, hops):
    async def main():
        params, ids = PARAMS[kind], prompt(150)
        expected = await reference(params, ids)
        (a, ha), (b, hb) = pair()
        rid = f"r{next(_ids)}"
        await a.generate(EngineRequest(request_id=rid, prompt_token_ids=ids, params=params, reply_to=CONSUMER))
        collector = asyncio.ensure_future(collect([a, b], rid))
        await wait_tokens(a, rid, 5)
        first = await a.migrate(rid, b.worker_id, hb, "operator")
        assert first.outcome == "migrated", first
        records = [first]
        if hops == 2:  # and back again: D1 -> D2 -> D1
            await wait_tokens(b, rid, 20)
            records.append(await b.migrate(rid, a.worker_id, ha, "operator"))
            assert records[-1].outcome == "migrated", records[-1]
        deltas = await collector
        assert tokens_of(deltas) == expected
        moved = [d for d in deltas if d.moved_to]
        assert len(moved) == hops
        for rec in records:
            assert len(rec.blocks_per_stage) >= 2, rec  # at least one live stage, then the final one
            assert rec.blocks_per_stage[-1] <= MigrationConfig().final_blocks + 1, rec
            assert rec.pause_s > 0
        await leak_free(a, b)
        await a.shutdown()
        await b.shutdown()

    asyncio.run(main())
