"""The real P/D deployment behind the HTTP API, driven by the official `openai` client.

Disaggregated (1 prefill + 1 decode, over NIXL and over the collective transport) == colocated == offline,
token for token; 32 concurrent streams; cancellation and a killed decode worker leave no KV held anywhere;
an operator's POST /admin/migrate moves a stream live without the client noticing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time

import httpx
import openai
import pytest
import ray
import uvicorn

from pdserve import LLM, SamplingParams
from pdserve.api.app import create_app
from pdserve.api.auth import Auth
from pdserve.config import EngineConfig, ServeConfig
from pdserve.controller.deploy import build
from pdserve.metrics import Metrics
from tests.conftest import serve_config

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

PROMPTS = ["The quick brown fox", "Serving engines batch many requests at once and keep the GPU busy.", "Hi"]


class DeploymentServer:
    """`pdserve serve` in a thread: the deployment and uvicorn share one event loop, as in the CLI."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.ready = concurrent.futures.Future()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        try:
            metrics = Metrics()
            self.deployment = await build(self.config, metrics)
            app = create_app(self.deployment.client, metrics=metrics, auth=Auth.from_config(self.config.frontend))
            self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
            task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
            while not self.server.started and not task.done():
                await asyncio.sleep(0.02)
            self.ready.set_result(True)
            await task
        except BaseException as e:
            if not self.ready.done():
                self.ready.set_exception(e)
            raise
        finally:
            if hasattr(self, "deployment"):
                await self.deployment.shutdown()

    def __enter__(self) -> DeploymentServer:
        self.thread.start()
        self.ready.result(timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
        assert not self.thread.is_alive()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def leaks(self, timeout: float = 10.0) -> list[str]:
        """What the ready workers still hold (after the deployment is back at its target size)."""
        ray.get(self.deployment.controller.wait_ready.remote(60))
        deadline = time.time() + timeout
        while True:
            ready = {w["worker_id"] for w in ray.get(self.deployment.controller.status.remote())["workers"]
                     if w["state"] == "ready"}  # fmt: skip
            live = [h for w, h in self.deployment.handles.items() if w in ready]
            reports = [r for r in ray.get([h.leak_report.remote() for h in live]) if r]
            if not reports or time.time() > deadline:
                return reports
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-e2e")
    yield
    ray.shutdown()


def engine(**kw):
    return EngineConfig(num_kv_blocks=256, **kw)


@pytest.fixture(scope="module", params=["nixl", "nccl"])
def pd(ray_cluster, request):
    """1 prefill + 1 decode worker over NIXL, and over the collective transport (Gloo on CPU)."""
    cfg = serve_config(
        engine=engine(), pools={"prefill": 1, "decode": 1}, worker={"lease_s": 5}, kv={"transport": request.param}
    )
    with DeploymentServer(cfg) as s:
        yield s


def complete(client, prompt, **kw):
    kw.setdefault("max_tokens", 12)
    return client.completions.create(model="pdserve-demo", prompt=prompt, temperature=0, **kw)


def test_disaggregated_equals_colocated_equals_offline(ray_cluster, pd):
    offline = LLM(num_kv_blocks=256).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    expected = [o.text for o in offline]
    with DeploymentServer(serve_config(engine=engine(), pools={"prefill": 0, "decode": 0, "colocated": 1})) as colo:
        for server in (pd, colo):
            client = server.client()
            got = [complete(client, p).choices[0].text for p in PROMPTS]
            assert got == expected
            streamed = [
                "".join(c.choices[0].text for c in complete(client, p, stream=True) if c.choices) for p in PROMPTS
            ]
            assert streamed == expected
        assert colo.leaks() == []
    assert pd.leaks() == []


def test_chat_streaming_and_usage(pd):
    client = pd.client()
    msgs = [{"role": "user", "content": "hello there"}]
    offline = LLM(num_kv_blocks=64).chat(msgs, SamplingParams(temperature=0, max_tokens=10))[0]
    reply = client.chat.completions.create(model="pdserve-demo", messages=msgs, temperature=0, max_tokens=10)
    assert reply.choices[0].message.content == offline.text
    assert reply.usage.prompt_tokens == offline.num_prompt_tokens and reply.usage.completion_tokens == 10
    chunks = list(
        client.chat.completions.create(
            model="pdserve-demo",
            messages=msgs,
            temperature=0,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline.text
    assert chunks[-1].usage.completion_tokens == 10
    long_prompt = "shared prefix " * 40
    complete(client, long_prompt + "one")
    again = complete(client, long_prompt + "two")
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the prefill worker's prefix cache
    assert pd.leaks() == []


def test_32_concurrent_streams(pd):
    prompts = [f"request number {i} " * (1 + i % 5) for i in range(32)]
    expected = [o.text for o in LLM(num_kv_blocks=256).generate(prompts, SamplingParams(temperature=0, max_tokens=16))]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{pd.url}/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(p):
            stream = await client.completions.create(
                model="pdserve-demo", prompt=p, temperature=0, max_tokens=16, stream=True
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    assert asyncio.run(run()) == expected
    assert pd.leaks() == []


def test_cancel_mid_stream_and_bad_inputs(pd):
    with httpx.stream(
        "POST",
        f"{pd.url}/v1/completions",
        timeout=60,
        json={"model": "pdserve-demo", "prompt": "cancel me " * 20, "max_tokens": 500, "stream": True},
    ) as r:
        lines = 0
        for line in r.iter_lines():
            lines += bool(line)
            if lines >= 4:
                break  # leaving the block closes the connection mid-stream
    assert pd.leaks() == []
    client = pd.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="pdserve-demo", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="pdserve-demo", prompt="x" * 5000, max_tokens=2)
    assert complete(client, "still serving").usage.completion_tokens == 12
    assert httpx.get(f"{pd.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{pd.url}/ready", timeout=30).status_code == 200
    metrics = httpx.get(f"{pd.url}/metrics", timeout=30).text
    for name in ("pdserve_kv_transfer_seconds_count", "pdserve_kv_transfer_bytes_total", "pdserve_ttft_queue_seconds"):
        assert name in metrics
    assert "pdserve_worker_kv_usage_ratio{" not in metrics  # per-worker series are the controller's
    port = ray.get(pd.deployment.controller.status.remote())["controller"]["metrics_port"]
    controller = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    for name in ("pdserve_worker_kv_usage_ratio", "pdserve_prefix_cache_hit_tokens_total", "pdserve_workers"):
        assert name in controller


def test_killed_decode_worker_gives_a_clean_error(ray_cluster):
    with DeploymentServer(
        serve_config(engine=engine(), pools={"prefill": 1, "decode": 1}, worker={"lease_s": 30})
    ) as s:
        decode = next(h for w, h in s.deployment.handles.items() if w.startswith("decode"))
        start = time.time()
        with httpx.stream(
            "POST",
            f"{s.url}/v1/completions",
            timeout=30,
            json={
                "model": "pdserve-demo",
                "prompt": "doomed " * 10,
                "max_tokens": 3000,
                "stream": True,
                "ignore_eos": True,
            },
        ) as r:
            seen = []
            for line in r.iter_lines():
                if line:
                    seen.append(line)
                if len(seen) == 2:
                    ray.kill(decode)
        assert time.time() - start < 20  # ended, not hung
        assert seen[-1] != "data: [DONE]" or any('"error"' in x for x in seen)
        assert any('"error"' in x for x in seen)
        assert s.leaks() == []  # the prefill worker freed what it held for the dead decode worker


def test_admin_migrate_moves_a_stream_live(ray_cluster):
    cfg = serve_config(
        engine=engine(), pools={"prefill": 1, "decode": 2}, migration={"rebalance": False},
        frontend={"api_key": "sekret", "admin_keys": ["root"]},
    )  # fmt: skip
    prompt = "move me along " * 6
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    expected = LLM(num_kv_blocks=256).generate([prompt], params)[0].text
    with DeploymentServer(cfg) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0, timeout=60)
        stream = client.completions.create(
            model="pdserve-demo", prompt=prompt, temperature=0, max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, answer = "", None
        for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
            if answer is None and len(text) > 20:
                url = f"{s.url}/admin/migrate"
                assert httpx.post(url, json={"request_id": chunk.id}, timeout=30).status_code == 401
                api_key = {"Authorization": "Bearer sekret"}  # good on /v1/*, refused on /admin/*
                as_api = httpx.post(url, json={"request_id": chunk.id}, headers=api_key, timeout=30)
                assert as_api.status_code == 403 and as_api.json()["error"]["code"] == "admin_key_required"
                auth = {"Authorization": "Bearer root"}
                bad = httpx.post(url, json={"request_id": chunk.id, "target_worker": "nope"}, headers=auth, timeout=30)
                assert bad.status_code == 400 and bad.json()["error"]["param"] == "target_worker"
                answer = httpx.post(url, json={"request_id": chunk.id}, headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        [record] = answer.json()["data"]
        assert record["outcome"] == "migrated" and record["source"] != record["target"], record
        assert text == expected  # the client saw nothing but its tokens
        missing = httpx.post(f"{s.url}/admin/migrate", json={"request_id": "cmpl-gone"}, headers=auth, timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
        assert s.leaks() == []
