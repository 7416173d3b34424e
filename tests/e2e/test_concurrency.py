"""Many concurrent streams, client disconnects (streaming and not) and API admission: every path ends with
the engine idle and no KV block referenced."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from pdserve import SamplingParams
from pdserve.api.app import create_app
from pdserve.live.thread import engine_call, serving, wait_idle

pytestmark = pytest.mark.e2e

LONG = 3000  # tokens: seconds of decoding for the demo model, unless the request is aborted


def _computed_tokens(backend) -> int:
    return engine_call(backend, lambda e: e.num_computed_tokens_total)


def test_32_concurrent_streams_complete_and_leak_nothing(server, backend, model_name, llm):
    prompts = [f"Request number {i}: tell me about {i * 7} things" for i in range(32)]
    refs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=model_name, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == [r.text for r in refs]
    assert all(finish == "length" for _, finish in results)
    wait_idle(backend)


def _long_body(model: str, stream: bool) -> dict:
    return {"model": model, "prompt": "never ending", "max_tokens": LONG, "temperature": 0, "stream": stream}


def test_stream_disconnect_aborts_and_frees_blocks(http, backend, model_name):
    before = _computed_tokens(backend)
    with http.stream("POST", "/v1/completions", json=_long_body(model_name, True)) as resp:
        assert resp.status_code == 200
        events = 0
        for line in resp.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    wait_idle(backend)
    assert _computed_tokens(backend) - before < LONG // 2  # aborted long before max_tokens


def test_nonstreaming_disconnect_aborts_and_frees_blocks(server, backend, model_name):
    before = _computed_tokens(backend)
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.3)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=_long_body(model_name, False))
    wait_idle(backend)
    assert _computed_tokens(backend) - before < LONG // 2


def test_max_pending_gives_429_with_retry_after(backend, model_name):
    with serving(create_app(backend, max_pending=2)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        with (
            http.stream("POST", "/v1/completions", json=_long_body(model_name, True)) as a,
            http.stream("POST", "/v1/chat/completions", json=_chat_long(model_name)) as b,
        ):
            lines = [a.iter_lines(), b.iter_lines()]  # kept: dropping an iterator closes its connection
            for resp, it in zip((a, b), lines):
                assert resp.status_code == 200
                assert next(it).startswith("data: ")  # both are in flight
            third = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 1})
            assert third.status_code == 429
            assert int(third.headers["retry-after"]) >= 1
            assert third.json()["error"]["code"] == "too_many_pending_requests"
            with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as client:
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=model_name, prompt="hi", max_tokens=1)
            metrics = http.get("/metrics").text
            assert "pdserve_num_requests_running 2.0" in metrics
        wait_idle(backend, timeout=10)
        ok = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        metrics = http.get("/metrics").text
        assert 'pdserve_requests_total{endpoint="/v1/completions",status="429"} 2.0' in metrics
        assert 'pdserve_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics
        assert "pdserve_num_requests_running 0.0" in metrics


def _chat_long(model: str) -> dict:
    messages = [{"role": "user", "content": "go on forever"}]
    return {"model": model, "messages": messages, "max_tokens": LONG, "temperature": 0, "stream": True}


def test_sse_wire_format(http, model_name):
    body = {"model": model_name, "prompt": "wire", "max_tokens": 3, "stream": True, "temperature": 0}
    body["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    assert all(p["object"] == "text_completion" for p in payloads)
