"""The FastAPI app: OpenAI-compatible routes over an `EngineClient`, plus /health and /metrics.

`create_app` builds one app (with its own metrics registry unless given one); `serve` runs it with
uvicorn and shuts the engine client down on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.api.auth import Auth
from pdserve.api.chat import create_chat_completion
from pdserve.api.completions import create_completion
from pdserve.api.errors import APIError, error_response, install_handlers, internal_error
from pdserve.api.limits import BodyLimits
from pdserve.api.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    MigrationList,
    ModelCard,
    ModelList,
    ProbeStatus,
)
from pdserve.api.schemas import answers, body, install_schemas
from pdserve.api.serving import Admission, ServingContext, parse_body
from pdserve.api.sse import STATUS_KEY
from pdserve.config import RequestLimits
from pdserve.engine_client import EngineClient, ServiceUnavailable
from pdserve.metrics import Metrics

logger = logging.getLogger("pdserve.api")

STATS_TIMEOUT_S = 2.0  # a /metrics scrape never waits longer than this for the engine client's stats()
COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")


def create_app(
    client: EngineClient,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    auth: Auth | None = None,
    max_pending: int = 1024,
    limits: RequestLimits | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """An app serving `client`. `auth`: the key policy (`Auth.from_config`; default: open); `api_key`: a
    shorthand for an `Auth` with that one API key. `max_pending`: generation requests in flight at this
    server before new ones get 429. `limits`: what one request may ask for (`frontend.limits`)."""
    if auth is not None and api_key is not None:
        raise ValueError("create_app: pass api_key or auth, not both")
    auth = auth if auth is not None else Auth(api_keys=[] if api_key is None else [api_key])
    metrics = metrics if metrics is not None else Metrics()
    ctx = ServingContext(
        client=client,
        info=client.info,
        served_model_name=served_model_name or client.info.model_id,
        metrics=metrics,
        admission=Admission(max_pending, metrics),
        limits=limits if limits is not None else RequestLimits(),
    )
    created = int(time.time())
    app = FastAPI(title="pdserve", summary="OpenAI-compatible API of pdserve")
    app.state.client, app.state.metrics, app.state.ctx = client, metrics, ctx
    install_handlers(app)
    install_schemas(app, ctx.models)
    app.add_middleware(BodyLimits, limits=ctx.limits)
    app.add_middleware(_Guard, metrics=metrics)  # added last: the outermost

    app.state.auth = auth
    v1, admin = [Depends(auth.api_route)], [Depends(auth.admin_route)]  # every /v1/ and /admin/ route takes one

    @app.post(
        "/v1/completions", dependencies=v1, openapi_extra=body(ctx.models.completion),
        responses=answers(CompletionResponse, chunk=CompletionResponse),
    )  # fmt: skip
    async def completions(request: Request) -> Response:
        return await create_completion(ctx, request)

    @app.post(
        "/v1/chat/completions", dependencies=v1, openapi_extra=body(ctx.models.chat),
        responses=answers(ChatCompletionResponse, chunk=ChatCompletionChunk),
    )  # fmt: skip
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(ctx, request)

    def model_card() -> ModelCard:
        info = client.info
        return ModelCard(
            id=ctx.served_model_name, created=created, root=info.model_id, max_model_len=info.max_model_len
        )

    @app.get("/v1/models", dependencies=v1, responses=answers(errors=(401, 403)))
    async def models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}", dependencies=v1, responses=answers(errors=(401, 403, 404)))
    async def retrieve_model(model: str) -> ModelCard:
        ctx.check_model(model)
        return model_card()

    @app.post(
        "/admin/migrate", dependencies=admin, openapi_extra=body(ctx.models.migrate),
        responses=answers(MigrationList, errors=(400, 401, 403, 404, 408, 413, 415)),
    )  # fmt: skip
    async def admin_migrate(request: Request) -> Response:
        """Move a running request (every choice of it) to another worker, live: `request_id` is the id this
        API returned (cmpl-..., chatcmpl-...); `target_worker` is optional (default: the least loaded)."""
        req = await parse_body(request, ctx.models.migrate)
        try:
            records = await client.migrate(req.request_id, req.target_worker)
        except KeyError as e:
            raise APIError(404, str(e).strip("'\""), param="request_id", code="request_not_found") from None
        except ValueError as e:
            raise APIError(400, str(e), param="target_worker") from None
        return JSONResponse({"object": "list", "data": records})

    async def probe(check, word: str) -> Response:
        try:
            await check()
        except ServiceUnavailable as e:
            return error_response(APIError(503, f"{word}: {e}", code="service_unavailable"))
        except Exception as e:  # any failure of the probe means the answer is no
            logger.warning("%s probe failed: %r", word, e)
            return error_response(APIError(503, f"{word}: {type(e).__name__}: {e}", code="service_unavailable"))
        return JSONResponse({"status": "ok", "model": ctx.served_model_name})

    probe_answers = answers(ProbeStatus, errors=(503,))

    @app.get("/health", responses=probe_answers)
    async def health() -> Response:
        """Liveness: this process runs and reaches what it depends on (never a data-path probe)."""
        return await probe(client.check_health, "unhealthy")

    @app.get("/ready", responses=probe_answers)
    async def ready() -> Response:
        """Readiness: workers that can prefill and decode are ready."""
        return await probe(client.check_ready, "not ready")

    @app.get(
        "/metrics", dependencies=[Depends(auth.metrics_route)], response_class=PlainTextResponse,
        responses=answers(errors=(401,)),
    )  # fmt: skip
    async def prometheus() -> Response:
        try:
            stats = await asyncio.wait_for(client.stats(), STATS_TIMEOUT_S)
            if "workers" in stats:
                metrics.set_worker_stats(stats)
        except Exception as e:  # a scrape still returns the API's own metrics
            logger.warning("client.stats() failed: %r", e)
            metrics.set_worker_stats({"workers": []})  # no stale worker gauges: unknown is not healthy
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Guard:
    """Outermost middleware. Counts pdserve_requests_total{endpoint,status} for the counted paths, and
    answers an unhandled exception with a 500 error object itself (Starlette's error middleware would
    re-raise it, making the server drop the keep-alive connection). A failure after the response started
    is re-raised: the connection must be cut so the client sees a truncated response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in COUNTED_PATHS else "/v1/models" if path.startswith("/v1/models/") else None
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope.get("method"), path)
            if status is not None:
                status = 500
                raise
            await error_response(internal_error(exc))(scope, receive, send_and_note)
        finally:
            if endpoint is not None:
                status = scope.get("state", {}).get(STATUS_KEY, status or 500)
                self.metrics.requests.labels(endpoint, str(status)).inc()


def serve(app: FastAPI, host: str = "0.0.0.0", port: int = 8000, *, log_level: str = "info") -> None:
    """Run `app` with uvicorn until SIGINT/SIGTERM; the engine client is shut down during the graceful shutdown
    (in the app's lifespan, before uvicorn re-raises the signal). Returns normally after Ctrl-C."""
    import uvicorn

    client, inner = app.state.client, app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as state:
            try:
                yield state
            finally:
                await client.shutdown()

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", timeout_keep_alive=30)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it has already handled gracefully
        pass
