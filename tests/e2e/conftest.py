"""E2E fixtures: real uvicorn servers on free ports (background threads) over one shared LocalBackend.

Every server started here is stopped and its thread joined at teardown; sockets are bound by us (port 0)
so there is no port race.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from pdserve.api.app import create_app
from pdserve.config import EngineConfig
from pdserve.workers.local_backend import LocalBackend

NUM_KV_BLOCKS = 512  # 8192 tokens of 16: room for 32 concurrent streams and the long-prompt tests


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name=f"e2e-uvicorn-{self.port}", daemon=True
        )

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"


@contextlib.contextmanager
def serving(app) -> Iterator[ServerThread]:
    server = ServerThread(app).start()
    try:
        yield server
    finally:
        server.stop()


def engine_call(backend: LocalBackend, fn, timeout: float = 30):
    """Run `fn(engine)` on the backend's engine thread (the engine is not thread-safe)."""
    return backend.loop.submit(fn).result(timeout)


def wait_idle(backend: LocalBackend, timeout: float = 30) -> None:
    """Wait until the engine has no requests left, then assert no KV block is still referenced."""
    deadline = time.monotonic() + timeout
    while engine_call(backend, lambda e: bool(e.requests) or e.has_unfinished()):
        assert time.monotonic() < deadline, "engine did not become idle"
        time.sleep(0.05)
    engine_call(backend, lambda e: e.blocks.check_no_leak())


@pytest.fixture(scope="session", autouse=True)
def _no_threads_left_behind() -> Iterator[None]:
    yield
    names = ("e2e-uvicorn-", "pdserve-local-engine")
    left = [t.name for t in threading.enumerate() if t.name.startswith(names)]
    assert not left, f"threads left running after the e2e tests: {left}"


@pytest.fixture(scope="session")
def backend() -> Iterator[LocalBackend]:
    b = LocalBackend(EngineConfig(num_kv_blocks=NUM_KV_BLOCKS))
    yield b
    b.loop.stop()


@pytest.fixture(scope="session")
def server(backend) -> Iterator[ServerThread]:
    with serving(create_app(backend)) as s:
        yield s


@pytest.fixture(scope="session")
def model_name(backend) -> str:
    return backend.info.model_id


@pytest.fixture()
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def llm():
    """The offline API on its own engine: the oracle for greedy token/text identity."""
    from pdserve import LLM

    return LLM(None, num_kv_blocks=256)
