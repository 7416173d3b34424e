"""E2E fixtures: one shared LocalClient on the demo model, a server over it, clients, the offline oracle."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from pdserve.api.app import create_app
from pdserve.config import EngineConfig
from pdserve.live.thread import ServerThread, serving
from pdserve.workers.local_client import LocalClient

NUM_KV_BLOCKS = 512  # 8192 tokens of 16: room for 32 concurrent streams and the long-prompt tests


@pytest.fixture(scope="session", autouse=True)
def _no_threads_left_behind() -> Iterator[None]:
    yield
    names = ("e2e-uvicorn-", "pdserve-local-engine")
    left = [t.name for t in threading.enumerate() if t.name.startswith(names)]
    assert not left, f"threads left running after the e2e tests: {left}"


@pytest.fixture(scope="session")
def backend() -> Iterator[LocalClient]:
    b = LocalClient(EngineConfig(num_kv_blocks=NUM_KV_BLOCKS))
    yield b
    b.engine_thread.stop()


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
