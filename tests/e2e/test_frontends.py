"""HTTP frontends as Ray actors: two serve; SIGKILL of one leaves the other's streams alone and a new one
serves at once; probes (/health is liveness, /ready readiness); and in a real Prometheus scraping the
deployment as `deploy/prometheus.yml` documents, every per-worker series appears exactly once."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from pdserve.controller.deploy import deploy
from tests.conftest import needs_binary, serve_config

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PER_WORKER = (
    "pdserve_worker_running_requests",
    "pdserve_worker_waiting_requests",
    "pdserve_worker_kv_usage_ratio",
    "pdserve_prefix_cache_prompt_tokens_total",
    "pdserve_prefix_cache_hit_tokens_total",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployment():
    ray.init(num_cpus=10, include_dashboard=False, namespace="pdserve-e2e-frontends")
    port = free_port()
    while True:  # two consecutive free ports for frontends 0 and 1
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    cfg = serve_config(
        engine={"num_kv_blocks": 256},
        pools={"prefill": 1, "decode": 1},
        frontend={"frontends": 2, "port": port, "host": "127.0.0.1"},
        controller={"metrics_port": free_port()},
    )
    import asyncio

    dep = asyncio.run(deploy(cfg, serve_http=True))
    yield cfg, dep
    asyncio.run(dep.shutdown())
    ray.shutdown()


def status(dep) -> dict:
    return ray.get(dep.controller.status.remote())


def stream(url: str, prompt: str, max_tokens: int) -> list[str]:
    body = {"model": "pdserve-demo", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line]


def complete(url: str, prompt: str = "hello there", max_tokens: int = 8) -> httpx.Response:
    body = {"model": "pdserve-demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_two_frontends_serve_and_one_dies_alone(deployment):
    cfg, dep = deployment
    fronts = status(dep)["frontends"]
    assert [f["state"] for f in fronts] == ["ready", "ready"]
    a, b = fronts[0]["url"], fronts[1]["url"]
    assert complete(a).json()["choices"][0]["text"] == complete(b).json()["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        on_b = [pool.submit(stream, b, f"keep going {i} " * 6, 150) for i in range(3)]
        on_a = [pool.submit(_stream_or_error, a, f"doomed {i} " * 6, 150) for i in range(3)]
        time.sleep(1.5)
        os.kill(fronts[0]["pid"], signal.SIGKILL)
        results_b = [f.result(timeout=120) for f in on_b]
        [f.result(timeout=120) for f in on_a]
    for lines in results_b:  # undisturbed: every token, then [DONE], no error event
        assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 150
    deadline = time.time() + 60
    while True:  # a new frontend 0 serves on the same port
        fronts = status(dep)["frontends"]
        if len(fronts) == 2 and fronts[0]["state"] == "ready" and fronts[0]["pid"] not in (0,):
            try:
                if complete(a).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        assert time.time() < deadline, "no new frontend 0"
        time.sleep(0.5)
    _wait_no_leaks(dep)


def _stream_or_error(url, prompt, max_tokens):
    try:
        return stream(url, prompt, max_tokens)
    except httpx.HTTPError as e:  # its frontend was killed: the connection drops
        return e


def _wait_no_leaks(dep, timeout_s: float = 20.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        st = status(dep)
        handles = {w: h for w, h in _worker_handles(dep).items()}
        ready = [w["worker_id"] for w in st["workers"] if w["state"] == "ready"]
        leaks = [r for r in ray.get([handles[w].leak_report.remote() for w in ready]) if r]
        if not leaks:
            return
        assert time.time() < deadline, f"blocks still held: {leaks}"
        time.sleep(0.2)


def _worker_handles(dep) -> dict:
    _, members, _ = ray.get(dep.controller.membership.remote(-1, 0.0))
    return {w: h for w, _, _, h in members}


def test_probes_follow_the_decode_pool(deployment):
    cfg, dep = deployment
    url = status(dep)["frontends"][1]["url"]
    assert httpx.get(f"{url}/ready").status_code == 200
    decode = [w for w in status(dep)["workers"] if w["role"] == "decode" and w["state"] == "ready"][0]
    os.kill(decode["pid"], signal.SIGKILL)
    saw_not_ready, deadline = False, time.time() + 90
    while True:
        assert httpx.get(f"{url}/health").status_code == 200  # liveness never depends on the data path
        code = httpx.get(f"{url}/ready").status_code
        saw_not_ready |= code == 503
        if saw_not_ready and code == 200:
            break
        assert time.time() < deadline, f"/ready never went 503 then 200 (saw 503: {saw_not_ready})"
        time.sleep(0.05)
    assert complete(url).status_code == 200


@needs_binary("prometheus")
def test_every_per_worker_series_appears_once_in_prometheus(deployment, tmp_path):
    cfg, dep = deployment
    st = status(dep)
    for f in st["frontends"]:
        assert complete(f["url"], "warm the counters " * 8).status_code == 200
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "pdserve")
    # the documented job, pointed at this deployment's frontends and controller
    targets = [f["url"].removeprefix("http://") for f in st["frontends"]]
    targets.append(f"127.0.0.1:{st['controller']['metrics_port']}")
    job["static_configs"] = [{"targets": targets}]
    job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
    config["rule_files"] = [str(ROOT / "deploy" / "rules" / "*.rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"), start_new_session=True,
    )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"
        workers = {w["worker_id"] for w in status(dep)["workers"] if w["state"] == "ready"}
        deadline = time.time() + 60
        while True:
            counts = {}
            for name in PER_WORKER:
                try:
                    res = httpx.get(api, params={"query": f"count by (worker) ({name})"}, timeout=5).json()
                except (httpx.HTTPError, json.JSONDecodeError):
                    res = {"data": {"result": []}}
                counts[name] = {r["metric"].get("worker"): float(r["value"][1]) for r in res["data"]["result"]}
            try:  # Prometheus may still be starting: its port is not open yet
                up = httpx.get(api, params={"query": "up"}, timeout=5).json()["data"]["result"]
            except (httpx.HTTPError, json.JSONDecodeError):
                up = []
            scraped = len(up) == len(targets) and all(r["value"][1] == "1" for r in up)  # every target, once
            if scraped and all(workers <= set(c) for c in counts.values()):
                break
            assert time.time() < deadline, f"targets or series missing in Prometheus: up={up}, {counts}"
            time.sleep(1)
        for name, per_worker in counts.items():
            assert all(n == 1 for n in per_worker.values()), f"{name} appears more than once: {per_worker}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
