"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}. Clients never see a traceback."""

from __future__ import annotations

import difflib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import PoolError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.message, code=exc.code, param=exc.param, type_=exc.type),
                        status_code=exc.status, headers=exc.headers)


def unavailable(message: str, retry_after_s: int = 2) -> APIError:
    return APIError(503, message, code="backend_unavailable", headers={"Retry-After": str(retry_after_s)})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def unknown_path_message(app: FastAPI, method: str, path: str) -> str:
    """'No route ...; did you mean POST /v1/chat/completions?' with the closest path the app serves."""
    served = {r.path: sorted(getattr(r, "methods", None) or ()) for r in app.routes if isinstance(r, APIRoute)}
    near = difflib.get_close_matches(path, list(served), n=1, cutoff=0.5)
    hint = f"; did you mean {'/'.join(served[near[0]]) or method} {near[0]}?" if near else "; see GET /openapi.json"
    return f"no endpoint {method} {path}{hint}"


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    count = on_error or (lambda kind: None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        count(exc.code or exc.type)
        return error_response(exc)

    @app.exception_handler(PoolError)
    async def _pool_error(request: Request, exc: PoolError) -> JSONResponse:
        count(exc.code)
        return JSONResponse(error_body(exc.status, exc.message, code=exc.code, param=exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        count("invalid_request")
        return JSONResponse(error_body(400, message, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(f"http_{exc.status_code}")
        message, code = str(exc.detail), None
        if exc.status_code == 404 and exc.detail == "Not Found":
            message, code = unknown_path_message(app, request.method, request.url.path), "unknown_path"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        return JSONResponse(error_body(exc.status_code, message, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        count("internal")
        return JSONResponse(error_body(500, "internal error; see the gateway log", code="internal_error"),
                            status_code=500)
