"""Bad input gets the right 4xx with an OpenAI error object naming the parameter, and the server keeps
serving; API keys; unknown routes."""

from __future__ import annotations

import httpx
import openai
import pytest

from pdserve.api.app import create_app
from pdserve.live.thread import serving

pytestmark = pytest.mark.e2e

M = "<model>"  # replaced by the served model name
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]

CASES = [
    # (id, path, body, status, param)
    ("missing model", CMPL, {"prompt": "x"}, 400, "model"),
    ("missing prompt", CMPL, {"model": M}, 400, "prompt"),
    ("missing messages", CHAT, {"model": M}, 400, "messages"),
    ("max_tokens as string", CMPL, {"model": M, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens as bool", CMPL, {"model": M, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("temperature as string", CMPL, {"model": M, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("prompt as number", CMPL, {"model": M, "prompt": 5}, 400, "prompt"),
    ("prompt mixed list", CMPL, {"model": M, "prompt": [1, "a"]}, 400, "prompt"),
    ("stream as string", CMPL, {"model": M, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("messages as string", CHAT, {"model": M, "messages": "hi"}, 400, "messages"),
    ("bad role", CHAT, {"model": M, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("content as number", CHAT, {"model": M, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("huge max_tokens", CMPL, {"model": M, "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("huge stop token id", CMPL, {"model": M, "prompt": "x", "stop_token_ids": [2**64]}, 400, "stop_token_ids[0]"),
    ("negative max_tokens", CMPL, {"model": M, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", CMPL, {"model": M, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("negative max_completion_tokens", CHAT, {"model": M, "messages": MSGS, "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("temperature < 0", CMPL, {"model": M, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("chat temperature < 0", CHAT, {"model": M, "messages": MSGS, "temperature": -1}, 400, "temperature"),
    ("top_p 0", CMPL, {"model": M, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p 1.5", CHAT, {"model": M, "messages": MSGS, "top_p": 1.5}, 400, "top_p"),
    ("top_k -2", CMPL, {"model": M, "prompt": "x", "top_k": -2}, 400, "top_k"),
    ("n 0", CMPL, {"model": M, "prompt": "x", "n": 0}, 400, "n"),
    ("seed too large", CMPL, {"model": M, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("empty stop string", CMPL, {"model": M, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("logprobs 6", CMPL, {"model": M, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("top_logprobs 21", CHAT, {"model": M, "messages": MSGS, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {"model": M, "messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs"),
    ("stream_options without stream", CMPL, {"model": M, "prompt": "x", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("empty prompt", CMPL, {"model": M, "prompt": ""}, 400, "prompt"),
    ("empty prompt list", CMPL, {"model": M, "prompt": []}, 400, "prompt"),
    ("token id outside vocab", CMPL, {"model": M, "prompt": [5, 10**6]}, 400, "prompt"),
    ("prompt over the context", CMPL, {"model": M, "prompt": [65] * 4096}, 400, "prompt"),
    ("empty messages", CHAT, {"model": M, "messages": []}, 400, "messages"),
    ("image content part", CHAT, {"model": M, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content[0].type"),
    ("unknown field", CMPL, {"model": M, "prompt": "x", "foo": 1}, 400, "foo"),
    ("presence_penalty", CMPL, {"model": M, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("frequency_penalty", CHAT, {"model": M, "messages": MSGS, "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("best_of", CMPL, {"model": M, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("suffix", CMPL, {"model": M, "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("logit_bias", CMPL, {"model": M, "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("echo with logprobs", CMPL, {"model": M, "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("tools", CHAT, {"model": M, "messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("json response_format", CHAT, {"model": M, "messages": MSGS, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("unknown model", CMPL, {"model": "gpt-5", "prompt": "x"}, 404, "model"),
]  # fmt: skip


def _fill(body, model):
    return {k: (model if v == M else v) for k, v in body.items()}


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(http, model_name, path, body, status, param):
    resp = http.post(path, json=_fill(body, model_name))
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if param is not None and status == 400:
        assert param.split("[")[0] in err["message"] or "content part" in err["message"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"{bad json", "not valid JSON"), (b"", "empty"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")],
)
def test_malformed_bodies(http, content, needle):
    resp = http.post(CMPL, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert needle in resp.json()["error"]["message"]


def test_body_without_content_type_is_still_json(http, model_name):
    resp = http.post(CMPL, content=f'{{"model": "{model_name}", "prompt": "x", "max_tokens": 1}}'.encode())
    assert resp.status_code == 200


def test_prompt_too_long_message_says_so(http, model_name):
    err = http.post(CMPL, json={"model": model_name, "prompt": [65] * 5000}).json()["error"]
    assert "context length" in err["message"] and "max_model_len=4096" in err["message"]


def test_server_keeps_serving_after_bad_input(client, http, model_name):
    for _, path, body, _, _ in CASES[:10]:
        http.post(path, json=_fill(body, model_name))
    resp = client.completions.create(model=model_name, prompt="still here", max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=-1)
    assert info.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)


def test_unknown_route_and_method(http):
    resp = http.get("/v1/nothing")
    assert resp.status_code == 404 and "error" in resp.json()
    resp = http.get(CMPL)
    assert resp.status_code == 405 and resp.json()["error"]["type"] == "invalid_request_error"


def test_api_key_and_served_model_name(backend):
    app = create_app(backend, api_key="sekret", served_model_name="alias")
    with serving(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        body = {"model": "alias", "prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            resp = http.post(CMPL, json=body, headers=headers)
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200  # probes need no key
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(**body)
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekret", max_retries=0) as good:
            assert good.completions.create(**body).model == "alias"
            assert [m.id for m in good.models.list()] == ["alias"]
            with pytest.raises(openai.NotFoundError):
                good.completions.create(model=backend.info.model_id, prompt="x", max_tokens=1)
