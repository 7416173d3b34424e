"""The short chaos run (bench/chaos.py, one round of each fault kind with a few seconds of load): 2 prefill + 2
decode workers and two HTTP frontends lose a worker, a frontend and the controller to SIGKILL, a worker to
SIGSTOP (resumed after its heartbeat timeout), a frontend and the controller to SIGSTOP (never resumed: found
hung by pings, killed and replaced or restarted), a KV transfer, streams whose clients leave, a worker during a
scale-in and one during an operator's migration; no request is lost (every answer is the offline text or a clean
error, none hangs), the deployment is back at its target size after each fault, and no KV block is held once the
load is drained."""

from __future__ import annotations

import asyncio

import pytest
import ray

from bench import chaos
from bench.chaos_rounds import Settings
from pdserve.live.faults import FAULTS

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

# generous bounds for a loaded 2-core machine; a hang is still found in a minute
SETTINGS = Settings(interval_s=3.0, warm_s=1.0, deadline_s=60.0, recover_s=90.0, leak_s=30.0, hang_s=5.0, concurrency=2)


def test_one_round_of_every_fault_loses_nothing_and_recovers():
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-test-chaos")
    try:
        result = asyncio.run(chaos.run(FAULTS, SETTINGS, seed=0, worker_timeout_s=3.0, on_round=chaos.print_round))
    finally:
        ray.shutdown()
    rounds, s = result["rounds"], result["summary"]
    chaos.report(result)
    assert [r["fault"] for r in rounds] == list(FAULTS)
    assert all(r["fired"] for r in rounds), [(r["fault"], r["victim"]) for r in rounds if not r["fired"]]
    assert all(r["served"] > 0 for r in rounds), [(r["fault"], r["served"], r["error_kinds"]) for r in rounds]
    assert s["lost"] == 0, f"{s['lost']} of {s['requests']} requests lost: {[r['violations'] for r in rounds]}"
    assert s["unclean"] == 0, f"{s['unclean']} unclean endings: {[r['violations'] for r in rounds]}"
    assert s["not_recovered"] == 0, f"{s['not_recovered']} rounds not back at full strength: {rounds}"
    assert s["leaked_blocks"] == 0 and s["leak_reports"] == 0, f"held after the drain: {[r['leaks'] for r in rounds]}"
    bugs = {k: n for k, n in s["errors"].items() if k in ("http_500", "sse_generation_failed")}
    assert not bugs, f"a 500 means a bug, never a fault's consequence: {bugs}"
    assert s["left"] == SETTINGS.disconnects, s  # the disconnecting clients did read their first chunks
    failed = {r["fault"]: r["violations"] for r in rounds if r["violations"]}
    assert not failed, failed
