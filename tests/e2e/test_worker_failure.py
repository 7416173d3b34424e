"""A broken engine takes its worker down visibly: the worker's process ends with the traceback in its log, the
controller drops it (prefill workers too) and starts a replacement, requests in flight on it get a 503 or an SSE
error event (never a 500), and the next requests are served by the other workers."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import pytest
import ray

from tests.conftest import serve_config
from tests.e2e.test_pd_server import DeploymentServer, engine

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-e2e-failure")
    yield
    ray.shutdown()


def workers(server, role):
    return sorted(w for w in server.deployment.handles if w.startswith(role))


def ready_workers(server) -> set[str]:
    status = ray.get(server.deployment.controller.status.remote())
    return {w["worker_id"] for w in status["workers"] if w["state"] == "ready"}


def wait_dead(server, worker_id, timeout=15.0) -> None:
    deadline = time.time() + timeout
    while worker_id in ready_workers(server) or worker_id in server.deployment.client.workers:
        assert time.time() < deadline, f"{worker_id} was not dropped"
        time.sleep(0.1)


def stream(url, prompt, max_tokens) -> list[str]:
    body = {"model": "pdserve-demo", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line]


def complete(url, prompt, max_tokens=4) -> httpx.Response:
    body = {"model": "pdserve-demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def logged_traceback() -> bool:
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for path in logs.glob("worker-*.err"):
        text = path.read_text(errors="replace")
        if "injected fault: engine step failed" in text and "Traceback" in text:
            return True
    return False


def break_engine(handle):
    """Injects the engine fault. The worker may die (its intended end) before the call's reply is
    sent, so an actor error from this call is an outcome, not a failure (seen once in CI)."""
    try:
        ray.get(handle.inject_fault.remote("engine_step"), timeout=30)
    except ray.exceptions.RayActorError:
        pass


def test_broken_engines_end_their_workers_and_requests_get_503s(ray_cluster):
    # no retries: this shows what a client gets when a worker fails and nothing can be retried
    config = serve_config(
        engine=engine(), pools={"prefill": 2, "decode": 2}, routing={"policy": "round_robin"}, worker={"lease_s": 5},
        failure={"max_request_retries": 0},
    )  # fmt: skip
    with DeploymentServer(config) as s:
        handles = dict(s.deployment.handles)  # kept: the broken ones leave the deployment
        # -- a decode worker breaks while streams are decoding on both decode workers
        d_broken, d_ok = workers(s, "decode")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, s.url, f"stream {i} " * 5, 400) for i in range(4)]
            time.sleep(1.5)
            break_engine(handles[d_broken])
            results = [f.result(timeout=60) for f in futures]
        wait_dead(s, d_broken)
        errors = [json.loads(lines[-2][6:])["error"] for lines in results if '"error"' in lines[-2]]
        done = [lines for lines in results if '"error"' not in lines[-2]]
        assert errors, "no stream was on the broken decode worker"
        assert done, "no stream was on the healthy decode worker"
        assert all(e["code"] == "service_unavailable" and "500" not in e["type"] for e in errors)
        assert all(lines[-1] == "data: [DONE]" for lines in results)
        # -- a prefill worker breaks: the request on it gets a 503, the next ones go to the other prefill worker
        p_broken, p_ok = workers(s, "prefill")
        break_engine(handles[p_broken])
        statuses = [complete(s.url, f"prompt {i} " * 20).status_code for i in range(4)]
        assert 503 in statuses and 500 not in statuses
        wait_dead(s, p_broken)
        after = [complete(s.url, f"after {i} " * 20) for i in range(6)]
        assert [r.status_code for r in after] == [200] * 6
        ready = ready_workers(s)
        assert {d_ok, p_ok} <= ready and not {d_broken, p_broken} & ready
        # -- both are gone for good, visibly: Ray reports the actors dead, their logs hold the traceback
        for worker_id in (d_broken, p_broken):
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(handles[worker_id].ping.remote(), timeout=10)
        deadline = time.time() + 10
        while not logged_traceback():
            assert time.time() < deadline, "the engine's traceback is not in the worker's log"
            time.sleep(0.2)
        assert s.leaks() == []
