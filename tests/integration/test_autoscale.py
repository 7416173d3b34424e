"""The autoscaling loop end to end with a real Prometheus (started here, time compressed: 1 s scrapes and
rule evaluations, 10 s rate windows): under a rising load the decode pool grows and a new worker serves;
when the load stops the pool shrinks back to its minimum after the stabilization window; no request fails
in between; the decisions and pool sizes are in the controller's /metrics and in Prometheus."""

from __future__ import annotations

import time

import httpx
import pytest

from pdserve.live.inprocess import live_deployment
from pdserve.live.poll import wait
from pdserve.load.steady import uncached
from tests.conftest import needs_binary

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.e2e,
    needs_binary("prometheus"),
]


def test_pools_grow_under_load_and_shrink_back_to_min():
    auto = {
        "interval_s": 1.0, "decode_tokens_per_worker": 40, "prefill_tokens_per_worker": 100000, "min_prefill": 1,
        "max_prefill": 1, "min_decode": 1, "max_decode": 3, "scale_in_window_s": 8, "cooldown_s": 2,
        "ttft_slo_s": 40, "tpot_slo_s": 5, "flip_roles": False,
    }  # fmt: skip
    with live_deployment(auto, "pdserve-test-autoscale", rule_window="10s", engine={"num_kv_blocks": 256},
                         pools={"prefill": 1, "decode": 1}) as live:  # fmt: skip
        load = uncached(live.url, concurrency=6).start_thread()
        try:
            wait(lambda: len(live.ready("decode")) >= 2 and all(w["requests_total"] for w in live.ready("decode")),
                 150, "a second decode worker serving")  # fmt: skip
            grown = len(live.ready("decode"))
        finally:
            load.end()
        assert load.done > 0 and not load.failures, load.failures[:3]
        wait(lambda: len(live.ready("decode")) == 1
             and all(w["state"] != "draining" for w in live.status()["workers"]), 150,
             "the decode pool back at its minimum")  # fmt: skip
        decisions = live.decisions()
        actions = [d["action"] for d in decisions]
        assert "scale_out" in actions and actions.count("scale_in") >= grown - 1, actions
        out = next(d for d in decisions if d["action"] == "scale_out")
        assert out["signals"]["decode_tokens_per_s"] > 40 and out["targets"]["decode"] > 1, out  # logged inputs
        assert len(live.ready("prefill")) == 1  # min_prefill kept
        text = httpx.get(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=10).text
        assert 'pdserve_autoscaler_desired_workers{role="decode"}' in text
        assert 'pdserve_autoscaler_decisions_total{action="scale_in",reason="demand_fell"}' in text

        def seen_in_prometheus():
            q = 'max_over_time(pdserve_workers{role="decode",state="ready"}[5m])'
            r = httpx.get(f"{live.prom.url}/api/v1/query", params={"query": q}, timeout=10).json()
            return r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 2

        wait(seen_in_prometheus, 30, "Prometheus to have recorded the grown pool")


def test_a_prefill_worker_flips_to_decode_when_the_load_turns_decode_heavy():
    """2P1D at a GPU budget of 3: long prompts with short outputs keep both prefill workers busy; then short
    prompts with long outputs make decode short while prefill has slack. With no GPU to add, the autoscaler
    waits for prefill's slack to hold for the window, then drains a prefill worker (by migration) and starts
    a decode worker in its place, which serves; no request fails."""
    auto = {
        "interval_s": 1.0, "decode_tokens_per_worker": 40, "prefill_tokens_per_s_per_worker": 2000,
        "min_prefill": 1, "max_prefill": 2, "min_decode": 1, "max_decode": 2, "max_workers": 3,
        "scale_in_window_s": 8, "cooldown_s": 2, "ttft_slo_s": 40, "tpot_slo_s": 5, "flip_roles": True,
    }  # fmt: skip
    with live_deployment(auto, "pdserve-test-autoscale", rule_window="10s", engine={"num_kv_blocks": 1024},
                         pools={"prefill": 2, "decode": 1}) as live:  # fmt: skip
        first_decode = {w["worker_id"] for w in live.ready("decode")}
        # prefill-heavy: ~1k-token prompts
        heavy = uncached(live.url, concurrency=4, prompt_words=200, max_tokens=2).start_thread()
        try:
            time.sleep(20)  # longer than the window: both prefill workers stay wanted
            assert {"scale_in", "flip"}.isdisjoint(live.actions()), live.decisions()
        finally:
            heavy.end()
        light = uncached(live.url, concurrency=6, prompt_words=4, max_tokens=48).start_thread()  # decode-heavy
        try:
            wait(lambda: "flip" in live.actions(), 120, "a flip", lambda: live.decisions()[-3:])
            new = wait(lambda: [w for w in live.ready("decode") if w["worker_id"] not in first_decode
                                and w["requests_total"] > 0], 120, "the flipped worker serving decode")  # fmt: skip
        finally:
            light.end()
        assert heavy.done > 0 and light.done > 0, (heavy.done, light.done)
        assert not heavy.failures and not light.failures, (heavy.failures + light.failures)[:3]
        decisions = live.decisions()
        flip = next(d for d in decisions if d["action"] == "flip")
        assert flip["reason"] == "decode_short_prefill_slack", flip
        assert flip["targets"] == {"prefill": 1, "decode": 2, "colocated": 0}, flip
        assert "scale_out" not in [d["action"] for d in decisions], decisions  # no GPU beyond the budget
        assert len(live.ready("prefill")) == 1 and len(live.ready("decode")) == 2, live.status()["workers"]
        assert new, live.status()["workers"]
