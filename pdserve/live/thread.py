"""The HTTP app served by uvicorn on 127.0.0.1 in a daemon thread (the socket is bound here, port 0: no port
race; `stop()` joins the thread), and the engine-side checks on an in-process `LocalClient`."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


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


def engine_call(backend, fn, timeout: float = 30):
    """Run `fn(engine)` on a `LocalClient`'s engine thread (the engine is not thread-safe)."""
    # `engine_thread` in the tree being rewritten now (workers/), `loop` before it
    thread = getattr(backend, "engine_thread", None) or backend.loop
    return thread.submit(fn).result(timeout)


def wait_idle(backend, timeout: float = 30) -> None:
    """Wait until a `LocalClient`'s engine has no requests left, then assert no KV block is still referenced."""
    deadline = time.monotonic() + timeout
    while engine_call(backend, lambda e: bool(e.requests) or e.has_unfinished()):
        assert time.monotonic() < deadline, "engine did not become idle"
        time.sleep(0.05)
    engine_call(backend, lambda e: e.blocks.check_no_leak())
