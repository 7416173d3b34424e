"""`cache_salt` over HTTP: the same prompt under another salt reports no cached tokens, under the same salt
it does; on one local engine, and through a P/D deployment (routing, prefill, KV handoff to decode). A
request without a salt in its body takes its API key's default salt."""

from __future__ import annotations

import uuid

import openai
import pytest

from pdserve.api.app import create_app
from pdserve.api.auth import Auth
from pdserve.config import FrontendConfig
from pdserve.live.thread import serving

pytestmark = pytest.mark.e2e


def _prompt() -> str:
    """A prompt no other test sent: the e2e backend's prefix cache is shared by the session."""
    return f"{uuid.uuid4().hex} is the tenant's private system prompt, long enough for several blocks. " * 3


def _cached(client: openai.OpenAI, model: str, prompt: str, salt: str | None = None, chat: bool = False) -> int:
    body = {} if salt is None else {"cache_salt": salt}
    if chat:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=2, temperature=0, extra_body=body
        )
    else:
        resp = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, extra_body=body)
    assert resp.usage.prompt_tokens > 48
    return resp.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_salts_separate_the_prefix_cache(client, model_name, chat):
    prompt = _prompt()
    assert _cached(client, model_name, prompt, "tenant-a", chat) == 0
    assert _cached(client, model_name, prompt, "tenant-b", chat) == 0
    assert _cached(client, model_name, prompt, None, chat) == 0
    assert _cached(client, model_name, prompt, "tenant-a", chat) > 0
    assert _cached(client, model_name, prompt, "tenant-b", chat) > 0


def test_a_bad_salt_is_a_400(http, model_name):
    for salt in ("", "x" * 257, 7):
        resp = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "cache_salt": salt})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "cache_salt", salt
    ok = http.post(
        "/v1/completions", json={"model": model_name, "prompt": "hi", "cache_salt": "x" * 256, "max_tokens": 1}
    )
    assert ok.status_code == 200


def test_an_api_keys_default_salt(backend, model_name):
    auth = Auth.from_config(FrontendConfig(api_keys=["key-a tenant=a", "key-a2 tenant=a", "key-b tenant=b"]))
    with serving(create_app(backend, auth=auth)) as s:

        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=60)

        a, a2, b = client("key-a"), client("key-a2"), client("key-b")
        prompt = _prompt()
        assert _cached(a, model_name, prompt) == 0
        assert _cached(b, model_name, prompt) == 0  # another tenant
        assert _cached(a2, model_name, prompt) > 0  # the same tenant, another key
        assert _cached(a, model_name, prompt, salt="own") == 0  # a salt in the body separates further
        assert _cached(a2, model_name, prompt, salt="own") > 0  # within the tenant
        assert _cached(b, model_name, prompt, salt="own") == 0  # the same body salt from another tenant
        assert _cached(b, model_name, prompt, salt="tenant:a") == 0  # cannot name another tenant's cache


@pytest.mark.ray
def test_salts_across_a_pd_deployment():
    """1 prefill + 1 decode over NIXL: the prefill worker's cache (the cached tokens reported) and the
    decode worker's import are under the request's salt."""
    import ray

    from tests.conftest import serve_config
    from tests.e2e.test_pd_server import DeploymentServer, engine

    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-e2e-salt")
    try:
        cfg = serve_config(engine=engine(), pools={"prefill": 1, "decode": 1}, kv={"transport": "nixl"})
        with DeploymentServer(cfg) as s, s.client() as client:
            prompt = _prompt()
            model = "pdserve-demo"
            assert _cached(client, model, prompt, "tenant-a") == 0
            assert _cached(client, model, prompt, "tenant-b") == 0
            assert _cached(client, model, prompt) == 0
            assert _cached(client, model, prompt, "tenant-a") > 0
            assert _cached(client, model, prompt, "tenant-b", chat=True) == 0  # a new prompt (the chat template)
            assert _cached(client, model, prompt, "tenant-b", chat=True) > 0
            assert s.leaks() == []
    finally:
        ray.shutdown()
