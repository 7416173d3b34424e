"""An HTTP frontend as a detached Ray actor (the way Ray Serve runs its proxies): the OpenAI app over a
`ClusterClient` that finds the controller by name. It holds no deployment state, so killing it loses
only the requests it was serving (their streams close, which aborts them on their workers), and the
controller starts a new one on the same port.

Frontend i listens on `frontend.port + i` on whichever node Ray places it (`pdserve status` lists its URL);
on several nodes, put a load balancer (or a Kubernetes Service) in front of them.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from pdserve.config import ServeConfig

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class FrontendActor:
    def __init__(self, config: dict, index: int) -> None:
        self.config = ServeConfig.model_validate(config)
        self.index = index
        self.port = self.config.frontend.port + index if self.config.frontend.port else 0
        self._url: str | None = None
        self._server = None
        self._client = None
        self._closed = asyncio.Event()

    async def start(self) -> str:
        if self._url is not None:
            return self._url
        import socket

        import uvicorn

        from pdserve.api.app import create_app
        from pdserve.api.auth import Auth
        from pdserve.cluster.client import connect_client
        from pdserve.metrics import Metrics

        fe = self.config.frontend
        metrics, auth = Metrics(), Auth.from_config(fe)  # a missing key file fails the start before connecting
        self._client = await connect_client(self.config, metrics)
        app = create_app(
            self._client, served_model_name=fe.served_model_name, auth=auth, metrics=metrics,
            max_pending=fe.max_pending, limits=fe.limits,
        )  # fmt: skip
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((fe.host, self.port))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if task.done():
                task.result()  # raises why it stopped
            await asyncio.sleep(0.02)
        host = ray.util.get_node_ip_address() if fe.host in ("0.0.0.0", "::") else fe.host
        self._url = f"http://{host}:{port}"
        log.info("frontend %d serving on %s", self.index, self._url)
        return self._url

    async def url(self) -> str | None:
        return self._url

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def ping(self) -> bool:
        return True

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._client is not None:
            await self._client.shutdown()
        self._closed.set()
