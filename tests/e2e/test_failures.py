"""Engine-client failures through a real server over a scripted client: admission refusals keep their status
and Retry-After, a dead data path is 503, a failure after the 200 becomes an SSE error event, and a bug
is a 500 OpenAI error object; the server keeps serving after each."""

from __future__ import annotations

import json

import httpx
import pytest

from pdserve.api.app import create_app
from pdserve.engine_client import Overloaded, ServiceUnavailable
from pdserve.live.thread import serving
from pdserve.model_info import load_model_info
from pdserve.protocol import TokenDelta

pytestmark = pytest.mark.e2e


class ScriptedClient:
    """A EngineClient whose behaviour the test sets in `mode`; records closed request ids."""

    def __init__(self) -> None:
        self.info = load_model_info(None)
        self.mode = "ok"
        self.closed: list[str] = []

    async def generate(self, request_id, prompt_token_ids, params, cache_salt=None):
        try:
            if self.mode == "overloaded":
                raise Overloaded("queue full", retry_after=3.0)
            if self.mode == "overloaded503":
                raise Overloaded("no capacity", retry_after=7.0, status=503)
            if self.mode == "unavailable":
                raise ServiceUnavailable("no live workers")
            if self.mode == "bug":
                raise TypeError("oops")
            yield TokenDelta(request_id=request_id, new_token_ids=[65], text="A", num_prompt_tokens=3)
            if self.mode == "fail_midway":
                raise RuntimeError("decode worker died")
            yield TokenDelta(
                request_id=request_id, new_token_ids=[66], text="B", finished=True, finish_reason="stop",
                num_prompt_tokens=3,
            )  # fmt: skip
        finally:
            self.closed.append(request_id)

    async def check_health(self) -> None:
        if self.mode != "ok":
            raise ServiceUnavailable("scripted")

    async def stats(self) -> dict:
        if self.mode == "bug":
            raise RuntimeError("stats broke")
        return {"workers": [{"worker": "p0", "role": "prefill", "running": 1, "waiting": 2, "kv_usage": 0.5}]}

    async def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted():
    client = ScriptedClient()
    with serving(create_app(client)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        yield client, http


def _body(client, stream=False) -> dict:
    return {"model": client.info.model_id, "prompt": "abc", "max_tokens": 2, "stream": stream}


@pytest.mark.parametrize(
    ("mode", "status", "retry_after"),
    [("overloaded", 429, "3"), ("overloaded503", 503, "7"), ("unavailable", 503, None), ("bug", 500, None)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_refusals_and_bugs_map_to_status(scripted, mode, status, retry_after, stream):
    client, http = scripted
    client.mode = mode
    try:
        resp = http.post("/v1/completions", json=_body(client, stream))
        assert resp.status_code == status
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert resp.headers.get("retry-after") == retry_after
    finally:
        client.mode = "ok"
    assert http.post("/v1/completions", json=_body(client)).json()["choices"][0]["text"] == "AB"


def test_failure_after_first_token_is_an_sse_error_event(scripted):
    client, http = scripted
    client.mode = "fail_midway"
    try:
        with http.stream("POST", "/v1/chat/completions", json={
            "model": client.info.model_id, "messages": [{"role": "user", "content": "x"}], "stream": True,
        }) as resp:  # fmt: skip
            assert resp.status_code == 200
            events = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    finally:
        client.mode = "ok"
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "decode worker died" in error["message"]
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "A"
    metrics = http.get("/metrics").text
    assert 'pdserve_requests_total{endpoint="/v1/chat/completions",status="500"}' in metrics


def test_nonstreaming_failure_midway_is_500(scripted):
    client, http = scripted
    client.mode = "fail_midway"
    try:
        resp = http.post("/v1/completions", json=_body(client))
    finally:
        client.mode = "ok"
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"


def test_n_choices_are_all_closed_when_one_fails(scripted):
    client, http = scripted
    client.closed.clear()
    client.mode = "fail_midway"
    try:
        resp = http.post("/v1/completions", json={**_body(client), "n": 3})
    finally:
        client.mode = "ok"
    assert resp.status_code == 500
    assert len(client.closed) == 3


def test_health_and_metrics_follow_the_backend(scripted):
    client, http = scripted
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    assert 'pdserve_worker_waiting_requests{role="prefill",worker="p0"} 2.0' in text
    client.mode = "bug"
    try:
        assert http.get("/health").status_code == 503
        assert http.get("/metrics").status_code == 200  # stats() failing does not break the scrape
    finally:
        client.mode = "ok"
