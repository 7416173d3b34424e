"""Load for live tests: closed-loop clients on a deployment's HTTP API that keep every failure, a free
port, and a polling wait."""

from __future__ import annotations

import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """`concurrency` loops streaming completions until stopped; every non-200 or broken stream is kept."""

    def __init__(self, url: str, concurrency: int, prompt_words: int = 8, max_tokens: int = 48) -> None:
        self.url, self.stop, self.done, self.failures = url, threading.Event(), 0, []
        self.prompt_words, self.max_tokens = prompt_words, max_tokens
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(concurrency)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                # a fresh first word: no two prompts share a cached prefix, so every prompt is prefilled
                prompt = f"{i}x{self.done} " + "load the pools " * (self.prompt_words // 3 + 1)
                body = {"model": "pdserve-demo", "prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True}
                try:
                    r = client.post(f"{self.url}/v1/completions", json=body)
                    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != self.max_tokens:
                        self.failures.append(r.text[:300])
                    self.done += 1
                except Exception as e:  # a dropped connection is a failure too
                    self.failures.append(repr(e))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def wait(predicate, timeout_s: float, what: str, context=lambda: None):
    """Poll `predicate` until it is truthy; on timeout, fail with `context()` (what the test saw)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}: {context()}"
        time.sleep(0.5)
    return value
