"""The routing simulator (bench/sim): a shared-prefix trace through the real Router, KV cache bookkeeping."""

import time

import pytest

from pdserve.config import DisaggConfig
from pdserve.protocol import BlockRemoved, BlockStored
from pdserve.router import prefix_index, router
from pdserve.sim.cluster import ClusterConfig, Simulation
from pdserve.sim.kvcache import KVCache
from pdserve.sim.metrics import SLO, handoff, meets, meets_first_token_held, summarize, tpot, tpot_decode
from pdserve.sim.model import LatencyModel
from pdserve.sim.trace import shared_prefix_trace

MODEL = LatencyModel(
    name="test",
    prefill_a=0.005,
    prefill_b=1e-4,
    prefill_c=1e-8,
    prefill_d=1e-8,
    decode_a=0.005,
    decode_b=1e-6,
    decode_c=1e-4,
    kv_bytes_per_token=4096,
    kv_capacity_tokens=16 * 64,
    max_num_batched_tokens=256,
    transfer_bytes_per_s=5e9,
    transfer_overhead_s=0.002,
)
CLUSTER = ClusterConfig(num_prefill=4, num_decode=2, block_size=16, report_interval_s=0.05)


def simulate(policy: str, cluster: ClusterConfig = CLUSTER):
    trace = shared_prefix_trace(60, block_size=16, prefix_blocks=8, groups=3, gap_s=0.05)
    sim = Simulation(trace, MODEL, cluster, policy)
    requests = sim.run()
    return sim, requests, summarize(requests, sim.workers, SLO(1.0, 0.1))


def test_prefix_aware_hits_more_and_everything_completes():
    pa_sim, pa_reqs, pa = simulate("prefix_aware")
    _, rr_reqs, rr = simulate("round_robin")
    assert all(r.outcome == "finished" for r in pa_reqs + rr_reqs)
    assert pa["hit_rate"] > rr["hit_rate"]
    assert pa["hit_rate"] > 0.5
    for w in pa_sim.workers.values():  # every block released (cached blocks stay, unreferenced)
        assert w.cache.num_free == w.cache.num_blocks
    assert router.time is time and prefix_index.time is time  # the virtual clock is put back


def test_colocated_cluster_completes():
    _, reqs, s = simulate("prefix_aware", ClusterConfig(num_prefill=0, num_decode=0, num_colocated=3, block_size=16))
    assert s["finished"] == len(reqs) and s["local_prefill_frac"] == 1.0


def test_kv_cache_lru_and_events():
    cache = KVCache(4)
    a = cache.acquire([], 3)
    cache.store(a, [1, 2])  # two full blocks cached, one anonymous (a partial block)
    assert cache.match([1, 2, 3]) == 2 and cache.num_free == 1
    cache.release(a)
    assert cache.num_free == 4 and cache.match([1, 2]) == 2  # free but still cached
    b = cache.acquire([1], 3)  # revives 1, evicts 2 (the tail goes first)
    assert b is not None and cache.match([1, 2]) == 1 and cache.acquire([], 1) is None
    events = cache.take_events()
    assert isinstance(events[0], BlockStored) and events[0].block_hashes == [1, 2]
    assert isinstance(events[1], BlockRemoved) and events[1].block_hashes == [2]


def test_decode_run_matches_single_steps():
    steps, batch, ctx = 7, 3, 1000
    single = sum(MODEL.step_s(0.0, batch, ctx + i * batch) for i in range(steps))
    assert abs(MODEL.decode_run_s(steps, batch, ctx) - single) < 1e-12


def test_queued_prefills_weigh_fully_on_decode_workers_and_a_quarter_on_colocated_ones():
    from pdserve.protocol import RouteRequest
    from pdserve.router.policies import Candidate, WorkerView
    from pdserve.sim.variants import make_variant

    req = RouteRequest(request_id="r", num_prompt_tokens=1000, max_tokens=10)
    views = {n: dict(num_blocks=100, num_free_blocks=100) for n in "ab"}
    for role, expected in (("decode", "b"), ("colocated", "a")):
        a = Candidate(WorkerView("a", role, num_prefill_tokens_queued=500, **views["a"]), 0)  # 500 or 125
        b = Candidate(WorkerView("b", role, num_running=3, **views["b"]), 0)  # 3 x 64
        assert make_variant("pa_queue").pick([a, b], req, "decode").worker_id == expected
        assert make_variant("pa_queue", colocated_queue_weight=0).pick([a, b], req, "decode").worker_id == expected
    assert make_variant("prefix_aware") is None  # pdserve's own policies are built by the Router


def test_handoff_gap_is_split_out_of_tpot():
    _, reqs, s = simulate("prefix_aware")
    remote = [r for r in reqs if r.prefill_worker != r.decode_worker]
    assert len(remote) == len(reqs)
    for r in remote:  # the first gap holds reserve + transfer: TPOT from the decode start leaves it out
        assert handoff(r) >= MODEL.transfer_s(r.transfer_tokens) - 1e-12
        assert tpot(r) - tpot_decode(r) == pytest.approx(handoff(r) / (r.trace.max_tokens - 1))
    assert s["handoff_p99"] > 0 and s["tpot_decode_p99"] < s["tpot_p99"]
    assert s["local_prefill_frac_by_reason"] == {}


def test_local_prefills_have_no_handoff_and_count_by_reason():
    _, reqs, s = simulate("prefix_aware", ClusterConfig(num_prefill=0, num_decode=0, num_colocated=3, block_size=16))
    slo = SLO(1.0, 0.1)
    assert all(
        handoff(r) == 0 and tpot_decode(r) == tpot(r) and meets_first_token_held(r, slo) == meets(r, slo) for r in reqs
    )
    assert s["slo_attainment_first_token_held"] == s["slo_attainment"] and s["handoff_p99"] is None
    assert s["local_prefill_frac_by_reason"] == {"colocated": 1.0}


def test_decode_workers_take_no_long_local_prefill_when_prefill_is_saturated():
    # one prefill worker, 197-token prompts arriving fast: its queue passes the saturation threshold at once
    trace = shared_prefix_trace(40, block_size=16, prefix_blocks=2, unique_blocks=10, groups=40, gap_s=0.01)
    budget = DisaggConfig(prefill_saturated_tokens=256, local_prefill_step_tokens=64)
    old = budget.model_copy(update={"local_prefill_step_tokens": 10**9})  # any length, as before the budget
    runs = {}
    for name, disagg in (("budget", budget), ("old", old)):
        cluster = ClusterConfig(num_prefill=1, num_decode=2, block_size=16, report_interval_s=0.01, disagg=disagg)
        runs[name] = Simulation(trace, MODEL, cluster, "prefix_aware").run()
    assert all(r.outcome == "finished" and r.reason == "disaggregated" for r in runs["budget"])
    assert any(r.reason == "prefill_saturated" and r.computed - r.cached_tokens > 64 for r in runs["old"])
