"""Admission that holds its bounds: the worker, not the router's estimate, decides. Load reports that are stale
or late (here: every routing batch sees a report saying the workers are empty) let the router send a worker
far more than it may take; the worker refuses past `engine.max_num_seqs` running plus
`routing.max_waiting_per_worker` queued, before any work, and the frontend routes the request again or
answers 429. In-process workers (the local transport) behind a real router and the real frontend client."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.cluster.client import ClusterClient
from pdserve.config import EngineConfig, WorkerConfig, load_config
from pdserve.engine_client import Overloaded
from pdserve.model_info import load_model_info
from pdserve.protocol import SamplingParams, WorkerStats
from pdserve.router.router import NoCapacity, Router, RouterConfig
from pdserve.workers.worker import Worker
from tests.unit.test_migration import Handle, leak_free, prompt

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        return asyncio.ensure_future(self.fn(*args))


class StaleController:
    """The controller's routing and membership, with load reports that never catch up: before each decision
    every worker is reported empty (all slots free, as of now), which discards the decisions made before it."""

    def __init__(self, workers: dict[str, tuple[Worker, Handle]], max_waiting: int) -> None:
        self.workers = workers
        self.router = Router(RouterConfig(max_waiting_per_worker=max_waiting, block_size=16))
        for wid, (w, _) in workers.items():
            self.router.register(wid, w.role)
        self.route_batch = _Method(self._route_batch)
        self.membership = _Method(self._membership)
        self.worker_failed = _Method(self._noop)
        self.ping = _Method(self._ping)

    async def _route_batch(self, reqs):
        out = []
        for r in reqs:
            for wid, (w, _) in self.workers.items():
                n = w.engine.scheduler.max_num_seqs
                stale = WorkerStats(worker_id=wid, role=w.role, num_running=0, num_waiting=0, num_held=0,
                                    num_free_blocks=256, num_blocks=256, kv_usage=0.0, num_prefill_tokens_queued=0,
                                    time=time.time(), num_free_slots=n)  # fmt: skip
                self.router.report(stale)
            try:
                out.append(self.router.route(r))
            except NoCapacity as e:
                out.append(e)
        return out

    async def _membership(self, version, timeout_s):
        if version == 1:
            await asyncio.sleep(timeout_s)
        members = [(wid, w.role, "ready", h) for wid, (w, h) in self.workers.items()]
        return 1, members, sorted({w.role for w, _ in self.workers.values()})

    async def _noop(self, *args):
        return None

    async def _ping(self):
        return True


def make_worker(name: str, role: str, max_num_seqs: int, max_waiting: int) -> tuple[Worker, Handle]:
    cfg = EngineConfig(num_kv_blocks=256, max_num_seqs=max_num_seqs, max_num_batched_tokens=512)
    w = Worker(name, role, cfg, WorkerConfig(), "local", max_waiting=max_waiting)
    samples = w.samples = []  # (admitted, waiting after the step's schedule), on the engine thread
    engine, step, add = w.engine, w.engine.step, w.engine.add_request

    def watched_step():
        out = step()
        samples.append((engine.num_admitted(), len(engine.scheduler.waiting)))
        return out

    def watched_add(*args, **kwargs):
        add(*args, **kwargs)
        samples.append((engine.num_admitted(), 0))

    engine.step, engine.add_request = watched_step, watched_add
    return w, Handle(w)


async def burst(client: ClusterClient, n: int, prompt_len: int = 20) -> tuple[int, int]:
    """`n` requests at once: (completed with every token, refused with 429 before any token)."""

    async def one(i: int) -> str:
        tokens = []
        try:
            async for d in client.generate(f"r{i}", prompt(prompt_len + i % 7, seed=i), PARAMS):
                tokens += d.new_token_ids
        except Overloaded as e:
            assert not tokens and e.status == 429 and e.retry_after > 0, (tokens, e)
            return "refused"
        assert len(tokens) == PARAMS.max_tokens, tokens  # a request that got in is served whole
        return "done"

    outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    return outcomes.count("done"), outcomes.count("refused")


def deployment(roles: dict[str, str], max_num_seqs: int, max_waiting: int):
    workers = {wid: make_worker(wid, role, max_num_seqs, max_waiting) for wid, role in roles.items()}
    for w, _ in workers.values():
        w.add_peers([o.peer_info() for o, _ in workers.values()])
    config = load_config(overrides={"routing": {"max_waiting_per_worker": max_waiting}}, env=False)
    controller = StaleController(workers, max_waiting)
    return workers, ClusterClient(load_model_info(None), controller, config)


async def finish(client: ClusterClient, workers) -> None:
    await client.shutdown()
    for w, _ in workers.values():
        await leak_free(w)
        assert w.engine.reserved_slots == set() and not w.engine.requests
        await w.shutdown()


@pytest.mark.parametrize("num_workers", [1, 2])
def test_stale_reports_cannot_push_a_worker_past_its_bound(num_workers):
    max_num_seqs, max_waiting, n = 4, 2, 48

    async def main():
        workers, client = deployment({f"c{i}": "colocated" for i in range(num_workers)}, max_num_seqs, max_waiting)
        await client.start(5.0)
        done, refused = await burst(client, n)
        assert done + refused == n and refused > 0 and done >= num_workers * (max_num_seqs + max_waiting)
        for w, _ in workers.values():
            assert w.samples and max(a for a, _ in w.samples) <= max_num_seqs + max_waiting, w.samples
            assert max(q for _, q in w.samples) <= max_waiting, w.samples  # queued after the batch was formed
            assert w.num_refused_total > 0  # the router's estimate would have sent more
        if num_workers == 2:  # a refusal is routed again: both workers served, more than either could hold
            assert all(w.num_requests_total > 0 for w, _ in workers.values())
        await finish(client, workers)

    asyncio.run(main())


def test_a_full_decode_worker_refuses_before_any_prefill_starts():
    async def main():
        workers, client = deployment({"p0": "prefill", "d0": "decode"}, max_num_seqs=2, max_waiting=1)
        (p, _), (d, _) = workers["p0"], workers["d0"]
        p.engine.max_waiting = 64  # the prefill worker has room: the decode worker's bound is the one that binds
        await client.start(5.0)
        done, refused = await burst(client, 24, prompt_len=100)  # too long to prefill on the decode worker
        assert done + refused == 24 and refused > 0
        assert max(a for a, _ in d.samples) <= 3, d.samples
        assert p.num_requests_total == done  # no prefill started for a request the decode worker refused
        assert d.num_refused_total >= refused  # each 429 was a refusal at the decode worker (maybe after retries)
        await finish(client, workers)

    asyncio.run(main())
