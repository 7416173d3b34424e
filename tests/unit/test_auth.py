"""API and admin keys (pdserve.api.auth): which key opens which route, keys from config, environment and
files (re-read when rotated), constant-time comparison with every key, and the per-key default cache salt."""

from __future__ import annotations

import json
import os
import secrets

import pytest
from fastapi import Depends, Request
from fastapi.testclient import TestClient

from pdserve.api.app import create_app
from pdserve.api.auth import Auth
from pdserve.config import ServeConfig
from pdserve.model_info import ModelInfo
from pdserve.protocol import TokenDelta

API, ADMIN, FILE_KEY, ENV_KEY = "sk-api", "adm-root", "sk-file", "sk-env"


class FakeTokenizer:
    def __len__(self) -> int:
        return 100

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "x" * len(ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> list[int]:
        return [1, 2, 3]


class FakeClient:
    """The smallest engine client: every request yields one token and ends."""

    info = ModelInfo(
        path=None, model_id="fake", config=None, tokenizer=FakeTokenizer(), vocab_size=100, max_model_len=64,
        eos_token_ids=frozenset(), is_demo=False,
    )  # fmt: skip

    async def generate(self, request_id, prompt_token_ids, params, cache_salt=None):
        yield TokenDelta(
            request_id=request_id, new_token_ids=[5], text="x", finished=True, finish_reason="length",
            num_prompt_tokens=len(prompt_token_ids),
        )  # fmt: skip

    async def check_ready(self) -> None: ...

    async def check_health(self) -> None: ...

    async def migrate(self, request_id, target_worker) -> list[dict]:
        return [{"outcome": "migrated"}]

    async def stats(self) -> dict:
        return {}

    async def shutdown(self) -> None: ...


ROUTES = {
    "completions": ("POST", "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 1}),
    "chat": ("POST", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}),
    "models": ("GET", "/v1/models", None),
    "model": ("GET", "/v1/models/fake", None),
    "admin": ("POST", "/admin/migrate", {"request_id": "cmpl-1"}),
    "metrics": ("GET", "/metrics", None),
    "health": ("GET", "/health", None),
    "ready": ("GET", "/ready", None),
}


def call(http: TestClient, route: str, key: str | None = None):
    method, path, body = ROUTES[route]
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http.request(method, path, json=body, headers=headers)


def app_for(auth: Auth) -> TestClient:
    app = create_app(FakeClient(), auth=auth)

    @app.get("/v1/salt", dependencies=[Depends(auth.api_route)])
    async def salt(request: Request) -> dict:
        return {"salt": request.state.cache_salt_default}

    return TestClient(app)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("PDSERVE_")]:
        monkeypatch.delenv(var)


@pytest.fixture(params=[False, True], ids=["metrics-open", "metrics-auth"])
def keyed(request, tmp_path, monkeypatch):
    """A server with every key source: config (API, admin), a key file, and the environment."""
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# the tenants' keys\n\n{FILE_KEY}\n")
    monkeypatch.setenv("PDSERVE_FRONTEND__API_KEYS", json.dumps([ENV_KEY]))
    frontend = {"api_key": API, "api_keys_file": str(keys_file), "admin_keys": [ADMIN], "metrics_auth": request.param}
    config = ServeConfig(frontend=frontend)
    assert config.frontend.api_keys == [ENV_KEY]  # the environment merged under the other keys
    with app_for(Auth.from_config(config.frontend)) as http:
        yield http, request.param


KINDS = {"missing": None, "wrong": "sk-nope", "api": API, "admin": ADMIN, "file": FILE_KEY, "env": ENV_KEY}
OPEN = dict.fromkeys(KINDS, 200)
V1 = {"missing": 401, "wrong": 401, "api": 200, "admin": 403, "file": 200, "env": 200}
EXPECTED = {
    "completions": V1,
    "chat": V1,
    "models": V1,
    "model": V1,
    "admin": {"missing": 401, "wrong": 401, "api": 403, "admin": 200, "file": 403, "env": 403},
    "metrics": OPEN,  # with metrics_auth: METRICS_AUTH
    "health": OPEN,
    "ready": OPEN,
}
METRICS_AUTH = {"missing": 401, "wrong": 401, "api": 200, "admin": 200, "file": 200, "env": 200}
CODES = {401: "invalid_api_key", 403: None}


@pytest.mark.parametrize("route", sorted(EXPECTED))
def test_route_by_key_kind(keyed, route):
    http, metrics_auth = keyed
    expected = METRICS_AUTH if route == "metrics" and metrics_auth else EXPECTED[route]
    got = {kind: call(http, route, key).status_code for kind, key in KINDS.items()}
    assert got == expected


def test_refusals_are_openai_errors(keyed):
    http, _ = keyed
    resp = call(http, "completions", "sk-nope")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json() == {
        "error": {"message": resp.json()["error"]["message"], "type": "invalid_request_error", "param": None,
                  "code": "invalid_api_key"}
    }  # fmt: skip
    assert call(http, "admin", API).json()["error"]["code"] == "admin_key_required"
    assert call(http, "completions", ADMIN).json()["error"]["code"] == "api_key_required"
    assert call(http, "completions", API).json()["choices"][0]["text"] == "x"
    for header in ("sk-api", "Basic sk-api", "Bearer "):  # not a bearer token
        assert http.get("/v1/models", headers={"Authorization": header}).status_code == 401


def test_every_v1_and_admin_route_needs_a_key(tmp_path):
    auth = Auth(api_keys=[API], admin_keys=[ADMIN])
    app = create_app(FakeClient(), auth=auth)
    guarded = [r for r in app.routes if r.path.startswith(("/v1/", "/admin/"))]
    assert {r.path for r in guarded} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/migrate"}
    with TestClient(app) as http:
        for route in guarded:
            for method in route.methods:
                assert http.request(method, route.path.replace("{model:path}", "m")).status_code == 401, route.path


def test_open_server_without_keys():
    with app_for(Auth()) as http:
        assert {route: call(http, route).status_code for route in EXPECTED} == dict.fromkeys(EXPECTED, 200)
        assert http.get("/v1/salt", headers={"Authorization": "Bearer anything"}).json() == {"salt": None}


def test_admin_is_disabled_with_api_keys_but_no_admin_key():
    with app_for(Auth(api_keys=[API])) as http:
        for key in (None, API, "sk-nope"):
            resp = call(http, "admin", key)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "admin_disabled"
            assert "frontend.admin_keys" in resp.json()["error"]["message"]
        assert call(http, "completions", API).status_code == 200


def test_admin_keys_alone_guard_only_admin():
    with app_for(Auth(admin_keys=[ADMIN])) as http:
        assert call(http, "completions").status_code == 200
        assert call(http, "admin").status_code == 401
        assert call(http, "admin", ADMIN).status_code == 200


def test_legacy_api_key_argument():
    with TestClient(create_app(FakeClient(), api_key=API)) as http:
        assert call(http, "completions", API).status_code == 200
        assert call(http, "completions").status_code == 401
        assert call(http, "admin", API).status_code == 403  # no admin key: /admin/* is disabled
    with pytest.raises(ValueError, match="not both"):
        create_app(FakeClient(), api_key=API, auth=Auth())


def rewrite(path, text: str) -> None:
    """Rewrite `path` so its stat changes even within the clock's resolution (as a Secret update does)."""
    before = os.stat(path).st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_key_file_rotation(tmp_path, caplog):
    keys = tmp_path / "keys"
    keys.write_text("sk-old\n")
    with app_for(Auth(api_keys_file=str(keys), admin_keys=[ADMIN])) as http:
        assert call(http, "completions", "sk-old").status_code == 200
        rewrite(keys, "# rotated\nsk-new\n")
        assert call(http, "completions", "sk-new").status_code == 200
        assert call(http, "completions", "sk-old").status_code == 401
        rewrite(keys, "sk-new\nsk-a sk-b\n")  # a bad file: the last good keys stay, and it is logged once
        assert call(http, "completions", "sk-new").status_code == 200
        assert call(http, "completions", "sk-new").status_code == 200
        assert [r.message for r in caplog.records].count(caplog.records[-1].message) == 1
        assert "line 2" in caplog.records[-1].message and "sk-b" not in caplog.records[-1].message
        rewrite(keys, "\n# nobody\n")  # an empty file admits nobody: a key file never fails open
        assert call(http, "completions", "sk-new").status_code == 401
        assert call(http, "completions").status_code == 401


def test_key_file_must_be_readable_at_start(tmp_path):
    with pytest.raises(ValueError, match="frontend.api_keys_file"):
        Auth(api_keys_file=str(tmp_path / "missing"))
    (tmp_path / "bad").write_text("k tenant=a tenant=b\n")
    with pytest.raises(ValueError, match=r"frontend\.admin_keys_file: .* line 1"):
        Auth(admin_keys_file=str(tmp_path / "bad"))


def test_every_key_is_compared_in_constant_time(tmp_path, monkeypatch):
    (tmp_path / "keys").write_text("sk-f1\nsk-f2\n")
    auth = Auth(api_keys=["sk-1", "sk-2", "sk-3"], api_keys_file=str(tmp_path / "keys"), admin_keys=["a-1", "a-2"])
    calls = []
    compare = secrets.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(secrets, "compare_digest", counting)
    with app_for(auth) as http:
        for key, status in (("sk-1", 200), ("sk-f2", 200), ("a-2", 403), ("sk-nope", 401)):
            calls.clear()
            assert call(http, "completions", key).status_code == status
            assert len(calls) == 7  # 5 API keys and 2 admin keys, whichever matched
            assert set(calls) == {(32, 32)}  # digests: the lengths of keys and tokens never show


def test_default_cache_salt_per_key(tmp_path):
    (tmp_path / "keys").write_text("sk-c tenant=acme\nsk-d\n")
    auth = Auth(api_keys=["sk-a", "sk-b tenant=acme"], api_keys_file=str(tmp_path / "keys"), admin_keys=[ADMIN])
    with app_for(auth) as http:
        salts = {k: http.get("/v1/salt", headers={"Authorization": f"Bearer {k}"}).json()["salt"] for k in
                 ("sk-a", "sk-b", "sk-c", "sk-d")}  # fmt: skip
    assert salts["sk-b"] == salts["sk-c"] == "tenant:acme"  # one tenant's keys share its cache
    assert len({salts["sk-a"], salts["sk-d"], salts["sk-b"]}) == 3  # other keys get their own
    assert all(s.startswith("key:") and "sk-" not in s for s in (salts["sk-a"], salts["sk-d"]))
    with app_for(Auth(api_keys=["sk-a", "sk-b tenant=acme"], tenant_salts=False)) as http:
        assert http.get("/v1/salt", headers={"Authorization": "Bearer sk-a"}).json() == {"salt": None}
        assert http.get("/v1/salt", headers={"Authorization": "Bearer sk-b"}).json() == {"salt": "tenant:acme"}


@pytest.mark.parametrize(
    "frontend, field",
    [
        ({"api_keys": ["sk-a", ""]}, "frontend.api_keys"),
        ({"admin_keys": ["  "]}, "frontend.admin_keys"),
        ({"api_key": ""}, "frontend.api_key"),
        ({"api_keys": ["sk-a tenant="]}, "frontend.api_keys"),
        ({"api_keys": ["sk-a owner=x"]}, "frontend.api_keys"),
        ({"api_keys_file": ""}, "frontend.api_keys_file"),
        ({"metrics_auth": True}, "frontend.metrics_auth"),
    ],
)
def test_config_refuses_bad_keys(frontend, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ServeConfig(frontend=frontend)


def test_auth_refuses_bad_keys():
    with pytest.raises(ValueError, match=r"frontend\.api_keys"):
        create_app(FakeClient(), api_key="")
    with pytest.raises(ValueError, match=r"frontend\.admin_keys: a key is also an API key"):
        Auth(api_keys=["k"], admin_keys=["k tenant=x"])
    with pytest.raises(ValueError, match=r"frontend\.metrics_auth"):
        Auth(metrics_auth=True)


def test_keys_from_flags_and_env(monkeypatch):
    from pdserve.cli import build_parser
    from pdserve.cli_flags import overrides
    from pdserve.config import load_config

    args = build_parser().parse_args(["config", "--frontend.api-keys", '["k1", "k2 tenant=t"]', "--api-key", "k0"])
    fe = load_config(None, overrides(args)).frontend
    assert (fe.api_key, fe.api_keys) == ("k0", ["k1", "k2 tenant=t"])
    args = build_parser().parse_args(["config", "--frontend.admin-keys", "k1"])
    with pytest.raises(ValueError, match=r"frontend\.admin_keys: expected a list in JSON"):
        overrides(args)
    monkeypatch.setenv("PDSERVE_FRONTEND__API_KEY", "sk-secret\n")  # as a Secret created from a file
    monkeypatch.setenv("PDSERVE_FRONTEND__ADMIN_KEYS", '["adm"]')
    with app_for(Auth.from_config(ServeConfig().frontend)) as http:
        assert call(http, "completions", "sk-secret").status_code == 200
        assert call(http, "admin", "adm").status_code == 200


class RaisingClient(FakeClient):
    def generate(self, request_id, prompt_token_ids, params, cache_salt=None):  # raises at the call, no generator
        raise TypeError("generate() broke before streaming")


def test_a_client_failing_at_the_call_fails_the_request_instead_of_hanging():
    with TestClient(create_app(RaisingClient()), raise_server_exceptions=False) as http:
        resp = http.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 1}, timeout=10)
        assert resp.status_code >= 500 and "error" in resp.json(), resp.text
