"""Hostile requests against a real HTTP server: each gets its exact 4xx with an OpenAI error object (never a
5xx or a traceback), the server keeps serving, and its memory stays bounded."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pdserve.api.app import create_app
from pdserve.config import RequestLimits
from pdserve.live.thread import serving

pytestmark = pytest.mark.e2e

M = "<model>"  # replaced by the served model name
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
LIMITS = RequestLimits(body_timeout_s=1.0)
MiB = 2**20


def raw(text: str) -> bytes:
    return text.encode()


def nested(depth: int, open_: str, close: str, leaf: str = "") -> str:
    return open_ * depth + leaf + close * depth


def chunks(total: int, size: int = 64 * 1024):
    """A body httpx sends chunked (no Content-Length): only counting while reading can stop it."""
    for _ in range(total // size):
        yield b" " * size


CASES = [
    # (id, path, body: dict, raw bytes or an iterator of chunks, content type, status, param or code)
    ("10 MB body", CMPL, b'{"model": "<model>", "prompt": "' + b"a" * 10_000_000 + b'"}', None, 413,
     "request_too_large"),
    ("10 MB chunked body", CMPL, "chunks", None, 413, "request_too_large"),
    ("100k nested lists in prompt", CMPL, raw('{"model": "<model>", "prompt": ' + nested(100_000, "[", "]") + "}"),
     None, 400, None),
    ("100k nested objects", CMPL, raw('{"model": "<model>", "prompt": "x", "user": '
     + nested(100_000, '{"a": ', "}", "1") + "}"), None, 400, None),
    ("invalid UTF-8", CMPL, b'{"model": "<model>", "prompt": "\xff\xfe\xc3("}', None, 400, None),
    ("lone surrogate in prompt", CMPL, raw('{"model": "<model>", "prompt": "\\ud800"}'), None, 400, None),
    ("lone surrogate as a key", CMPL, raw('{"model": "<model>", "prompt": "x", "\\udfff": 1}'), None, 400, None),
    ("NUL in model name", CMPL, {"model": M + "\x00", "prompt": "x"}, None, 400, "model"),
    ("NUL in the prompt", CMPL, {"model": M, "prompt": "a\x00b"}, None, 400, "prompt"),
    ("NUL in a batched prompt", CMPL, {"model": M, "prompt": ["ok", "a\x00"]}, None, 400, "prompt[1]"),
    ("NUL in a chat message", CHAT, {"model": M, "messages": [{"role": "user", "content": "\x00"}]}, None, 400,
     "messages[0].content"),
    ("NUL in the user field", CMPL, {"model": M, "prompt": "x", "user": "u\x00"}, None, 400, "user"),
    ("NUL in a key", CMPL, {"model": M, "prompt": "x", "\x00": 1}, None, 400, None),
    ("NaN temperature", CMPL, raw('{"model": "<model>", "prompt": "x", "temperature": NaN}'), None, 400, None),
    ("1e999 temperature", CMPL, raw('{"model": "<model>", "prompt": "x", "temperature": 1e999}'), None, 400, None),
    ("n = 10^6", CMPL, {"model": M, "prompt": "x", "n": 10**6}, None, 400, "n"),
    ("prompts x n over max_n", CMPL, {"model": M, "prompt": ["x"] * 100, "n": 100}, None, 400, "n"),
    ("max_tokens = 10^12", CMPL, {"model": M, "prompt": "x", "max_tokens": 10**12}, None, 400, "max_tokens"),
    ("chat max_completion_tokens = 10^12", CHAT, {"model": M, "messages": MSGS, "max_completion_tokens": 10**12},
     None, 400, "max_completion_tokens"),
    ("10^4 stop strings", CMPL, {"model": M, "prompt": "x", "stop": ["s"] * 10**4}, None, 400, "stop"),
    ("stop string of 10^5 chars", CHAT, {"model": M, "messages": MSGS, "stop": "s" * 10**5}, None, 400, "stop"),
    ("logprobs -1", CMPL, {"model": M, "prompt": "x", "logprobs": -1}, None, 400, "logprobs"),
    ("logprobs 10^9", CMPL, {"model": M, "prompt": "x", "logprobs": 10**9}, None, 400, "logprobs"),
    ("logprobs 2^70", CMPL, {"model": M, "prompt": "x", "logprobs": 2**70}, None, 400, "logprobs"),
    ("top_logprobs -1", CHAT, {"model": M, "messages": MSGS, "logprobs": True, "top_logprobs": -1}, None, 400,
     "top_logprobs"),
    ("top_logprobs 10^9", CHAT, {"model": M, "messages": MSGS, "logprobs": True, "top_logprobs": 10**9}, None, 400,
     "top_logprobs"),
    ("10^5 stop_token_ids", CMPL, {"model": M, "prompt": "x", "stop_token_ids": list(range(10**5))}, None, 400,
     "stop_token_ids"),
    ("stop_token_id 2^64", CMPL, {"model": M, "prompt": "x", "stop_token_ids": [2**64]}, None, 400,
     "stop_token_ids[0]"),
    ("stop_token_id -2^63-1", CMPL, {"model": M, "prompt": "x", "stop_token_ids": [-(2**63) - 1]}, None, 400,
     "stop_token_ids[0]"),
    ("stop_token_id of 5000 digits", CMPL, raw('{"model": "<model>", "prompt": "x", "stop_token_ids": ['
     + "9" * 5000 + "]}"), None, 400, None),
    ("token ids outside the vocabulary", CMPL, {"model": M, "prompt": [5, 10**6]}, None, 400, "prompt"),
    ("negative token id", CMPL, {"model": M, "prompt": [5, -1]}, None, 400, "prompt"),
    ("token id 2^64 in a batch", CMPL, {"model": M, "prompt": [[5], [2**64]]}, None, 400, "prompt"),
    ("text/plain", CMPL, {"model": M, "prompt": "x"}, "text/plain", 415, "unsupported_media_type"),
    ("form data", CHAT, raw("model=x&messages=y"), "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("10^4 messages", CHAT, {"model": M, "messages": MSGS * 10**4}, None, 400, "prompt"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(backend):
    """A server with a short body timeout, and its process's memory before the table."""
    with serving(create_app(backend, limits=LIMITS)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        http.post(CMPL, json={"model": backend.info.model_id, "prompt": "warm", "max_tokens": 2}).raise_for_status()
        yield srv, http, rss_bytes()


def rss_bytes() -> int:
    """This process's resident memory (the server runs in a thread of it)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def fill(body, model: str):
    if isinstance(body, dict):
        return json.dumps({k: v.replace(M, model) if isinstance(v, str) else v for k, v in body.items()}).encode()
    if body == "chunks":
        return chunks(10_000_000)
    return body.replace(M.encode(), model.encode())


def assert_error_object(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text[:500]
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize(("path", "body", "ctype", "status", "expect"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_request_gets_its_4xx(hostile, model_name, path, body, ctype, status, expect):
    _, http, _ = hostile
    headers = {"content-type": ctype or "application/json"}
    started = time.monotonic()
    resp = http.post(path, content=fill(body, model_name), headers=headers)
    err = assert_error_object(resp, status)
    if expect is not None:
        assert expect in (err["param"], err["code"]), err
    if status in (408, 413):
        assert resp.headers["connection"] == "close"
    assert time.monotonic() - started < 30


def test_a_prompt_with_every_other_control_character_is_text(hostile, model_name):
    """NUL is refused (above; a stop string may hold one: test_generation.py's test_stop_strings); the other
    C0 controls are characters like any other, echoed as valid JSON."""
    _, http, _ = hostile
    prompt = "".join(map(chr, range(1, 32)))
    resp = http.post(CMPL, json={"model": model_name, "prompt": prompt, "max_tokens": 2, "echo": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"].startswith(prompt)


def test_encoding_a_long_prompt_does_not_stall_the_server(hostile, model_name):
    """A 2 MB prompt takes seconds to tokenize (then gets 400: it exceeds the context); meanwhile the event
    loop answers probes at once, because encoding runs on the tokenizer's own thread."""
    srv, http, _ = hostile
    prompt = "the quick brown fox jumps over the lazy dog " * 50_000
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(http.post, CMPL, json={"model": model_name, "prompt": prompt})
        time.sleep(0.3)  # the body is in and being encoded
        started = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=30) as other:
            assert other.get("/health").status_code == 200
        probe_s = time.monotonic() - started
        still_encoding = not big.done()
        assert_error_object(big.result(), 400)
    assert still_encoding, "the prompt was encoded too fast for this test to mean anything"
    assert probe_s < 1.0, f"/health took {probe_s:.2f} s while a prompt was being encoded"


def test_a_body_sent_too_slowly_gets_408_and_the_connection_closes(hostile):
    srv, _, _ = hostile
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        head = f"POST {CMPL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head.encode())
        started = time.monotonic()
        answer = b""
        try:
            for _ in range(40):  # one byte every 0.1 s: the body would take 10 s
                sock.sendall(b" ")
                time.sleep(0.1)
        except OSError:  # the server closed while we were still sending
            pass
        while chunk := sock.recv(65536):
            answer += chunk
        elapsed = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer
    assert b"connection: close" in rest.lower()
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert LIMITS.body_timeout_s <= elapsed < LIMITS.body_timeout_s + 5


def raw_exchange(port: int, head: str, body: bytes = b"") -> tuple[bytes, float]:
    """Send `head` (and `body`) on a fresh connection; (everything the server sent until it closed, seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - started


def test_an_oversize_body_announced_with_expect_100_continue_is_refused_unread(hostile):
    """The client waits for '100 Continue' before sending 1 GB: it gets the 413 at once instead."""
    srv, _, _ = hostile
    head = f"POST {CMPL} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\nExpect: 100-continue\r\n\r\n"
    answer, elapsed = raw_exchange(srv.port, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer and elapsed < LIMITS.body_timeout_s


def test_still_serving_with_bounded_memory_after_the_table(hostile, model_name):
    _, http, rss_before = hostile
    assert http.get("/ready").status_code == 200
    resp = http.post(CMPL, json={"model": model_name, "prompt": "still here", "max_tokens": 3})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    grown = rss_bytes() - rss_before
    assert grown < 200 * MiB, f"the server's memory grew by {grown / MiB:.0f} MiB over the hostile table"
