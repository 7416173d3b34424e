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
    """A Ray-actor-like handle on an in-process worker: `handle.method.remote(...)` is an awaitable task.
    `hooks[name]` (async, given the call's args) runs before the method: tests intervene mid-migration."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.hooks = {}

    def __getattr__(self, name):
        fn = getattr(self.w, name)
        hook = self.hooks.get(name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def run():
                    if hook is not None:
                        await hook(*args)
                    out = fn(*args, **kwargs)
                    return await out if asyncio.iscoroutine(out) else out

                return asyncio.ensure_future(run())

        return _Method()


def make_worker(name: str, num_kv_blocks: int = 256, **migration) -> tuple[Worker, Handle]:
    cfg = EngineConfig(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=256)
    w = Worker(name, "decode", cfg, WorkerConfig(), "local", migration=MigrationConfig(**migration))
    h = Handle(w)
    w.self_handle = h
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
    return (await collect_all(workers, [rid], timeout_s))[rid]


async def collect_all(workers: list[Worker], rids: list[str], timeout_s: float = 60.0) -> dict[str, list]:
    got = {rid: [] for rid in rids}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not all(any(d.finished for d in ds) for ds in got.values()):
        assert asyncio.get_running_loop().time() < deadline, f"never finished: { {r: len(d) for r, d in got.items()} }"
        polls = await asyncio.gather(*(w.poll_outputs(0.02, CONSUMER) for w in workers))
        for d in (d for batch in polls for d in batch):
            got[d.request_id].append(d)
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
        assert not w.handoff.receiver.num_staging


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
            assert rec.num_bytes == sum(rec.blocks_per_stage) * a.layout.block_bytes
            assert rec.blocks_per_stage[-1] <= MigrationConfig().final_blocks + 1, rec
            assert rec.pause_s > 0
        await leak_free(a, b)
        await a.shutdown()
        await b.shutdown()

    asyncio.run(main())


def start(w: Worker, ids: list[int], params: SamplingParams) -> str:
    rid = f"r{next(_ids)}"
    req = EngineRequest(request_id=rid, prompt_token_ids=ids, params=params, reply_to=CONSUMER)
    return rid, asyncio.ensure_future(w.generate(req))


GREEDY = PARAMS["greedy"]


def run_fault(intervene, expect: str, aborted: bool = False, mode: str = "multi_stage", **migration):
    """Migrate a greedy request from a to b with `intervene(a, b, ha, hb, rid)` installing hooks; the
    migration's outcome must be `expect`, the stream must equal the reference (unless aborted), and
    neither worker may hold a block at the end."""

    async def main():
        ids = prompt(150)
        expected = await reference(GREEDY, ids)
        (a, ha), (b, hb) = pair(**migration)
        try:
            rid, admitted = start(a, ids, GREEDY)
            await admitted
            collector = asyncio.ensure_future(collect([a, b], rid))
            await wait_tokens(a, rid, 5)
            intervene(a, b, ha, hb, rid)
            rec = await a.migrate(rid, b.worker_id, hb, "operator", mode)
            assert rec.outcome == expect, rec
            if aborted:  # cancelled: nothing more is generated anywhere, and no finish comes
                await leak_free(a, b)
                await asyncio.sleep(0.3)
                assert not collector.done()
                collector.cancel()
                return rec
            assert tokens_of(await collector) == expected
            await leak_free(a, b)
            return rec
        finally:
            await a.shutdown()
            await b.shutdown()

    return asyncio.run(main())


def test_target_refuses_and_the_request_carries_on_at_the_source():
    def intervene(a, b, ha, hb, rid):
        b._draining = True  # a draining target refuses every stage

    rec = run_fault(intervene, "failed")
    assert "draining" in rec.error


def test_target_dies_in_the_final_stage():
    def intervene(a, b, ha, hb, rid):
        async def die(final, source):
            raise RuntimeError("The actor died unexpectedly before finishing this task.")

        hb.hooks["migrate_finish"] = die

    rec = run_fault(intervene, "failed")
    assert "actor died" in rec.error


def test_a_failed_transfer_aborts_the_migration():
    def intervene(a, b, ha, hb, rid):
        from pdserve.kv.transport import KVTransferError

        def broken(*args, **kwargs):
            raise KVTransferError("injected: the NIC went away")

        b.transport.start_pull = broken

    rec = run_fault(intervene, "failed")
    assert "NIC went away" in rec.error


def test_cancel_during_a_stage_frees_both_sides():
    def intervene(a, b, ha, hb, rid):
        async def cancel(stage, source):
            await a.abort([rid])

        hb.hooks["migrate_stage"] = cancel

    run_fault(intervene, "finished", aborted=True)


def test_cancel_during_the_final_stage_follows_the_request_to_the_target():
    def intervene(a, b, ha, hb, rid):
        async def cancel(final, source):
            await a.abort([rid])  # deferred at the source: the target has not confirmed yet

        hb.hooks["migrate_finish"] = cancel

    assert run_fault(intervene, "migrated", aborted=True).blocks_per_stage


def test_request_finishing_mid_migration():
    def intervene(a, b, ha, hb, rid):
        async def finish_first(stage, source):
            while rid in a.engine.requests:  # the source decodes to the end while the stage waits
                await asyncio.sleep(0.01)

        hb.hooks["migrate_stage"] = finish_first

    run_fault(intervene, "finished")


def test_source_dies_mid_migration_and_the_target_drops_what_it_staged():
    async def main():
        (a, ha), (b, hb) = pair(stage_timeout_s=0.2)
        rid, admitted = start(a, prompt(150), GREEDY)
        await admitted
        await wait_tokens(a, rid, 5)
        staged = asyncio.Event()

        async def after_stage(final, source):
            staged.set()
            await asyncio.sleep(3600)  # the source "dies" here: no final stage ever comes

        hb.hooks["migrate_finish"] = after_stage
        task = asyncio.ensure_future(a.migrate(rid, b.worker_id, hb, "operator"))
        await staged.wait()
        assert b.handoff.receiver.num_staging == 1 and await b.leak_report() is not None
        task.cancel()
        await a.shutdown()
        await leak_free(b)  # expired after 2 x stage_timeout_s without a word from the source
        await b.shutdown()

    asyncio.run(main())


class FakeController:
    """What a worker asks the controller when it runs out of blocks: a target (or none), and the record."""

    def __init__(self, target) -> None:
        self.target, self.records = target, []
        me = self

        class _Call:
            def __init__(self, fn) -> None:
                self.fn = fn

            def remote(self, *args):
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(self.fn(*args))
                return fut

        self.migration_target = _Call(lambda worker, blocks: me.target)
        self.record_migration = _Call(me.records.append)


@pytest.mark.parametrize("room_elsewhere", [True, False])
def test_out_of_blocks_migrates_instead_of_preempting(room_elsewhere):
    """Four requests that outgrow the source's KV: with room on another worker the one that would be
    preempted moves there (no recompute); with none, it is preempted as before. Same tokens either way."""

    async def main():
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        prompts = [prompt(90, seed=s) for s in range(4)]
        expected = [await reference(params, p) for p in prompts]
        a, b = make_worker(f"a{next(_ids)}", num_kv_blocks=30)[0], make_worker(f"b{next(_ids)}")[0]
        hb = Handle(b)
        a.add_peers([b.peer_info()])
        b.add_peers([a.peer_info()])
        a._controller = FakeController((b.worker_id, hb) if room_elsewhere else None)
        try:
            rids = []
            for p in prompts:
                rid, admitted = start(a, p, params)
                await admitted
                rids.append(rid)
            outs = await collect_all([a, b], rids)
            assert [tokens_of(outs[rid]) for rid in rids] == expected
            records = a._controller.records
            if room_elsewhere:
                assert records and all(r.reason == "out_of_blocks" for r in records)
                assert any(r.outcome == "migrated" for r in records)
                assert a.engine.num_preemptions_total == 0
            else:
                assert not records and a.engine.num_preemptions_total > 0
            await leak_free(a, b)
        finally:
            await a.shutdown()
            await b.shutdown()

    asyncio.run(main())


def test_text_held_back_for_a_stop_string_survives_the_move():
    async def main():
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=["@@@@@@"])
        ids = prompt(120)
        w, _ = make_worker(f"ref-{next(_ids)}")
        rid, admitted = start(w, ids, params)
        await admitted
        want = "".join(d.text for d in await collect([w], rid))
        await w.shutdown()
        (a, ha), (b, hb) = pair()
        try:
            rid, admitted = start(a, ids, params)
            await admitted
            collector = asyncio.ensure_future(collect([a, b], rid))
            await wait_tokens(a, rid, 7)
            assert (await a.migrate(rid, b.worker_id, hb, "operator")).outcome == "migrated"
            got = sorted(await collector, key=lambda d: (d.index, d.finished))
            assert "".join(d.text for d in got) == want
        finally:
            await a.shutdown()
            await b.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["stop_and_copy", "recompute"])
def test_the_baselines_also_keep_every_token(mode):
    """The benchmark's alternatives: one paused copy of everything, and no copy (the target recomputes)."""
    rec = run_fault(lambda *_: None, "migrated", mode=mode)
    assert len(rec.blocks_per_stage) == 1  # the final stage only
    assert (rec.blocks_per_stage[0] == 0) == (mode == "recompute")


@pytest.mark.parametrize("mode", ["multi_stage", "stop_and_copy"])
def test_blocks_the_target_caches_are_not_copied(mode):
    """There and back: the second move finds the request's earlier blocks in the first worker's prefix
    cache (freed there, still cached) and copies only what was generated since."""

    async def main():
        ids = prompt(160)
        expected = await reference(GREEDY, ids)
        (a, ha), (b, hb) = pair()
        try:
            rid, admitted = start(a, ids, GREEDY)
            await admitted
            collector = asyncio.ensure_future(collect([a, b], rid))
            await wait_tokens(a, rid, 3)
            there = await a.migrate(rid, b.worker_id, hb, "operator", mode)
            await wait_tokens(b, rid, 30)
            back = await b.migrate(rid, a.worker_id, ha, "operator", mode)
            assert there.outcome == back.outcome == "migrated"
            assert there.num_reused == 0 and back.num_reused >= 160 // 16, (there, back)
            assert sum(back.blocks_per_stage) <= sum(there.blocks_per_stage) - 160 // 16 + 3
            assert tokens_of(await collector) == expected
            await leak_free(a, b)
        finally:
            await a.shutdown()
            await b.shutdown()

    asyncio.run(main())


def test_a_stage_dropped_while_it_waits_frees_what_it_staged():
    """The target drops a migration (its source died) while a stage still waits to reserve: the stage,
    not the drop, frees the blocks it then reserves; the request carries on at the source."""

    async def main():
        ids = prompt(150)
        expected = await reference(GREEDY, ids)
        (a, ha), (b, hb) = pair()
        try:
            rid, admitted = start(a, ids, GREEDY)
            await admitted
            collector = asyncio.ensure_future(collect([a, b], rid))
            await wait_tokens(a, rid, 5)
            b.handoff.receiver.stall_s = 0.3
            task = asyncio.ensure_future(a.migrate(rid, b.worker_id, hb, "operator"))
            while not b.handoff.receiver.num_staging:
                await asyncio.sleep(0.01)
            await b.migrate_drop(next(iter(b.handoff.receiver.describe())))
            rec = await task
            assert rec.outcome == "failed" and "dropped" in rec.error, rec
            assert tokens_of(await collector) == expected
            await leak_free(a, b)
        finally:
            await a.shutdown()
            await b.shutdown()

    asyncio.run(main())
