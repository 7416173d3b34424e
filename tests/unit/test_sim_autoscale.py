"""The elastic simulator (bench/sim): workers start, drain and flip through the real Router with GPU-seconds
accounted, and pdserve's real autoscaling policy grows then shrinks the pools on a small ramp."""

from dataclasses import replace

import pytest

from pdserve.config import AutoscalingConfig
from pdserve.sim.autoscalers import IndependentAutoscaler, PdserveAutoscaler
from pdserve.sim.clock import virtual_clock
from pdserve.sim.cluster import ClusterConfig
from pdserve.sim.elastic import ElasticConfig, ElasticSimulation
from pdserve.sim.metrics import SLO, summarize
from pdserve.sim.observe import Observer
from pdserve.sim.trace import shared_prefix_trace
from pdserve.sim.workloads import Lengths, capacity, diurnal_rate, poisson_trace
from tests.unit.test_sim import MODEL

CLUSTER = ClusterConfig(num_prefill=1, num_decode=1, block_size=16, report_interval_s=0.05)
ELASTIC = ElasticConfig(worker_start_s=5.0, flip_restart_s=2.0, interval_s=1.0)


def in_router(sim, wid: str) -> bool:
    return wid in sim.router.views


def test_add_drain_and_flip_change_router_membership_and_gpu_seconds():
    sim = ElasticSimulation([], MODEL, CLUSTER, elastic=ELASTIC)
    with virtual_clock(sim.clock):
        sim.start()
        sim.advance(1.0)
        wid = sim.add_worker("prefill", 1.0)
        assert wid == "prefill-1" and sim.gpus == 3 and not in_router(sim, wid)
        sim.advance(5.9)
        assert not in_router(sim, wid) and sim.count("prefill") == 1  # still loading weights
        sim.advance(6.1)
        assert in_router(sim, wid) and sim.router.views[wid].role == "prefill" and sim.count("prefill") == 2
        sim.advance(10.0)
        sim.drain(wid, 10.0)
        assert not in_router(sim, wid) and sim.gpus == 3  # an idle draining worker stops at its next tick
        sim.advance(10.2)
        assert sim.state[wid] == "stopped" and sim.gpus == 2
        sim.advance(11.0)
        assert sim.flip_one("prefill", "decode", 11.0) == "prefill-0"
        sim.advance(11.2)
        assert sim.state["prefill-0"] == "stopped" and sim.gpus == 2  # the GPU restarts in the other role
        sim.advance(13.5)
        assert in_router(sim, "decode-1") and sim.router.views["decode-1"].role == "decode"
        assert sim.count("decode") == 2 and sim.count("prefill") == 0 and sim.gpus == 2
        sim.advance(14.0)
        assert sim.remove_one("prefill", 14.0) is None  # no prefill worker left to remove
        sim.add_worker("decode", 14.0)
        sim.advance(15.0)
        assert sim.remove_one("decode", 15.0) == "decode-2" and sim.gpus == 2  # a starting one is cancelled first
        sim.advance(20.0)
        sim._gpu(20.0, 0)
    # 2 GPUs throughout, a third from 1 s until prefill-1 stopped (10-10.05 s), a fourth from 14 to 15 s
    assert sim.gpu_s == pytest.approx(2 * 20 + 9.0 + 1.0, abs=0.06)
    assert not sim.router.pools["prefill"].views and set(sim.router.pools["decode"].views) == {"decode-0", "decode-1"}


def test_a_draining_decode_worker_gets_nothing_new_and_finishes_what_it_holds():
    trace = shared_prefix_trace(40, block_size=16, prefix_blocks=2, unique_blocks=2, gap_s=0.02)
    sim = ElasticSimulation(trace, MODEL, replace(CLUSTER, num_decode=2), elastic=ELASTIC)
    drained_at = 0.3
    sim.at(drained_at, lambda now: sim.drain("decode-0", now))
    requests = sim.run()
    assert all(r.outcome == "finished" for r in requests)
    assert all(r.trace.arrival_s < drained_at for r in requests if r.decode_worker == "decode-0")
    assert any(r.decode_worker == "decode-0" for r in requests) and sim.state["decode-0"] == "stopped"
    assert sim.workers["decode-0"].cache.num_free == sim.workers["decode-0"].cache.num_blocks


def ramp(seconds: float = 200.0):
    model = replace(MODEL, decode_a=0.02, kv_capacity_tokens=16 * 256)
    lengths = Lengths(prompts=(80, 120, 160), outputs=(30, 40, 50))
    cap = capacity(model, lengths.prompts, lengths.outputs)
    high = 2.0 * min(cap.prefill_req_s, cap.decode_req_s)
    trace = poisson_trace(diurnal_rate(0.15 * high, high, seconds), high, seconds, lengths, block_size=16)
    cfg = AutoscalingConfig(
        interval_s=1, min_prefill=1, max_prefill=3, min_decode=1, max_decode=3,
        decode_tokens_per_worker=0.5 * cap.decode_tokens_s, prefill_tokens_per_worker=2000,
        ttft_slo_s=1.0, tpot_slo_s=0.1, pd_ratio_min=0.5, pd_ratio_max=3, scale_in_window_s=8, cooldown_s=2,
    )  # fmt: skip
    return model, trace, cfg


def by_throughput(cfg: AutoscalingConfig) -> PdserveAutoscaler:
    """pdserve's policy sizing prefill by prompt tokens/s (at half a worker's throughput) and scaling in fast."""
    model, _, _ = ramp()
    per_s = 0.5 * 120 / model.chunk_s(120, 0)  # the ramp's mean prompt over its prefill time
    return PdserveAutoscaler(cfg.replace(prefill_tokens_per_s_per_worker=per_s, scale_in_max_workers=3))


@pytest.mark.parametrize("controller", [PdserveAutoscaler, by_throughput, IndependentAutoscaler])
def test_on_a_ramp_the_autoscaler_grows_then_shrinks_and_serves_every_request(controller):
    model, trace, cfg = ramp()
    observer = Observer(SLO(cfg.ttft_slo_s, cfg.tpot_slo_s), window_s=5)
    elastic = replace(ELASTIC, worker_start_s=3.0)
    sim = ElasticSimulation(trace, model, CLUSTER, elastic=elastic, controller=controller(cfg), observer=observer)
    requests = sim.run()
    s = summarize(requests, sim.workers, SLO(cfg.ttft_slo_s, cfg.tpot_slo_s))
    assert s["finished"] == len(requests)
    gpus = [row["gpus"] for row in observer.series]
    peak = gpus.index(max(gpus))
    assert max(gpus) >= 4 and gpus[0] == 2 and gpus[-1] < max(gpus)
    assert 0.2 * len(gpus) < peak < 0.8 * len(gpus)  # the peak is in the middle of the ramp
    assert sim.gpu_s < max(gpus) * sim.clock.now  # cheaper than holding the peak throughout
    assert max(row["prompt_tokens_per_s"] for row in observer.series) > 0
    assert any(row["starting"] for row in observer.series)
    for w in sim.workers.values():
        assert sim.state[w.worker_id] in ("ready", "stopped", "draining", "starting")
        assert w.cache.num_free == w.cache.num_blocks or sim.state[w.worker_id] != "stopped"
