"""Operational endpoints: /v1/models, /health (through the data path) and /metrics after traffic."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pdserve.api.app import create_app
from pdserve.config import EngineConfig
from pdserve.live.thread import serving
from pdserve.metrics import Metrics
from pdserve.workers.local_client import LocalClient

pytestmark = pytest.mark.e2e

METRIC_NAMES = [
    "pdserve_requests_total",
    "pdserve_request_finished_total",
    "pdserve_request_prompt_tokens_total",
    "pdserve_request_generation_tokens_total",
    "pdserve_prompt_cached_tokens_total",
    "pdserve_num_requests_running",
    "pdserve_time_to_first_token_seconds",
    "pdserve_inter_token_latency_seconds",
    "pdserve_e2e_request_latency_seconds",
    "pdserve_ttft_queue_seconds",
    "pdserve_ttft_prefill_seconds",
    "pdserve_kv_transfer_bytes_total",
    "pdserve_kv_transfer_seconds",
    "pdserve_worker_running_requests",
    "pdserve_worker_waiting_requests",
    "pdserve_worker_kv_usage_ratio",
]


def test_models(client, model_name, backend):
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert models[0].model_extra["max_model_len"] == backend.info.max_model_len
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-this-one")


def test_health_ok(http, model_name):
    resp = http.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok", "model": model_name}


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not exported"
    return float(match.group(1))


def test_metrics_after_traffic():
    """On its own app (own registry), so the counts are exactly this test's traffic."""
    backend = LocalClient(EngineConfig(num_kv_blocks=64))
    try:
        metrics = Metrics()
        with serving(create_app(backend, metrics=metrics)) as srv:
            model = backend.info.model_id
            with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as client:
                client.completions.create(model=model, prompt="count me", max_tokens=5, temperature=0)
                list(client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True, n=2
                ))  # fmt: skip
                with pytest.raises(openai.BadRequestError):
                    client.completions.create(model=model, prompt="x", max_tokens=0)
            text = httpx.get(f"{srv.url}/metrics").text
    finally:
        backend.engine_thread.stop()
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    assert _sample(text, "pdserve_requests_total", '{endpoint="/v1/completions",status="200"}') == 1
    assert _sample(text, "pdserve_requests_total", '{endpoint="/v1/chat/completions",status="200"}') == 1
    assert _sample(text, "pdserve_requests_total", '{endpoint="/v1/completions",status="400"}') == 1
    assert _sample(text, "pdserve_request_generation_tokens_total") == 5 + 2 * 4
    assert _sample(text, "pdserve_request_finished_total", '{finish_reason="length"}') == 3
    assert _sample(text, "pdserve_time_to_first_token_seconds_count") == 2
    assert _sample(text, "pdserve_e2e_request_latency_seconds_count") == 2
    assert _sample(text, "pdserve_inter_token_latency_seconds_count") == 4 + 2 * 3
    assert _sample(text, "pdserve_num_requests_running") == 0
    assert _sample(text, "pdserve_worker_kv_usage_ratio", '{role="colocated",worker="local"}') >= 0


def test_health_503_when_engine_loop_stopped():
    backend = LocalClient(EngineConfig(num_kv_blocks=16))
    with serving(create_app(backend)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        model = backend.info.model_id
        assert http.get("/health").status_code == 200
        # the engine's own admission check (prompt larger than its 16-block KV cache) is a 400 too
        resp = http.post("/v1/completions", json={"model": model, "prompt": [65] * 300, "max_tokens": 1})
        assert resp.status_code == 400 and "KV cache" in resp.json()["error"]["message"]
        backend.engine_thread.stop()
        resp = http.get("/health")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable"
        resp = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert resp.status_code == 503 and "error" in resp.json()
        assert http.get("/metrics").status_code == 200  # scrapes keep working with no live worker


def test_serve_runs_until_interrupted_then_shuts_the_backend_down(tmp_path):
    """`serve()` in its own process: healthy, answers, exits cleanly on SIGINT after stopping the engine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import sys\n"
        "from pdserve.api.app import create_app, serve\n"
        "from pdserve.config import EngineConfig\n"
        "from pdserve.workers.local_client import LocalClient\n"
        "backend = LocalClient(EngineConfig(num_kv_blocks=16))\n"
        f"serve(create_app(backend), host='127.0.0.1', port={port}, log_level='warning')\n"
        "print('engine alive after serve:', backend.engine_thread.alive, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve() did not become healthy"
            time.sleep(0.1)
        body = {"model": "pdserve-demo", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "engine alive after serve: False" in out
    assert "Traceback" not in err
