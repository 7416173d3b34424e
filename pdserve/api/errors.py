"""OpenAI-style error objects and the exception handlers that turn every failure into one.

Bad input is always a 4xx naming the offending parameter; a 500 only ever means a bug (logged with its
traceback by the app's outermost middleware, which also answers it, so the connection stays usable).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.engine_client import Overloaded, ServiceUnavailable

logger = logging.getLogger("pdserve.api")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
# Fields whose type is a union: pydantic reports one error per branch, so name the accepted shapes instead.
_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _TYPES.get(status) or _default_type(status)


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_validation_errors(errors: list[dict], prefix: tuple = ()) -> APIError:
    """A 400 naming the first offending field of a pydantic error list (`prefix`: loc parts to drop)."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = list(first.get("loc", ()))[len(prefix) :]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail})" if detail else "invalid JSON body")
    if not loc:
        return bad_request("the request body must be a JSON object")
    for i, part in enumerate(loc):
        if part in _UNION_HINTS and kind != "missing":
            path = _path(loc[: i + 1])
            inner = _constraint_error(errors, len(prefix), loc[: i + 1])
            if inner is None:
                return bad_request(f"{path} {_UNION_HINTS[part]}", param=path)
            where = list(inner["loc"])[len(prefix) :]
            del where[i + 1]  # the union branch's tag (e.g. "list[str]")
            return bad_request(f"{_path(where)}: {inner.get('msg', 'invalid value')}", param=path)
    path = _path(loc)
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {path}", param=path)
    if kind == "missing":
        return bad_request(f"{path} is required", param=path)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad_request(f"{path}: {message}", param=path)


def _constraint_error(errors: list[dict], skip: int, union: list) -> dict | None:
    """The first error under the union at `union` that is no branch's type mismatch: the input has that
    branch's shape but breaks one of its limits (too long, out of range), which says more than the shapes."""
    for e in errors:
        loc = list(e.get("loc", ()))[skip:]
        if loc[: len(union)] == union and len(loc) > len(union) and not e.get("type", "").endswith("_type"):
            return e
    return None


def _path(loc: list) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_errors(list(exc.errors()), prefix=("body",)))

    @app.exception_handler(pydantic.ValidationError)
    async def _validation(request: Request, exc: pydantic.ValidationError) -> JSONResponse:
        return error_response(from_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error_response(overloaded_error(exc))

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return error_response(APIError(503, f"the model service is unavailable: {exc}", code="service_unavailable"))


def internal_error(exc: BaseException) -> APIError:
    """A bug: the client gets a 500 error object, the log gets the traceback (see `app._Guard`)."""
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", code="internal_error")


def overloaded_error(exc: Overloaded) -> APIError:
    retry = str(max(1, round(exc.retry_after)))
    return APIError(exc.status, f"server overloaded: {exc}", code="overloaded", headers={"Retry-After": retry})
