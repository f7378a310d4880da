"""X-Request-Id: the client's (when it is a sane token) or a new one, on the response, in flock's log lines and on
the request sent to vLLM (which then names its own request by it), so one id follows a request everywhere."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
REQUEST_ID: ContextVar[str | None] = ContextVar("flock_request_id", default=None)
_SANE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def current() -> str | None:
    return REQUEST_ID.get()


class RequestIdMiddleware:
    """Plain ASGI (no per-request task or body copy, as Starlette's BaseHTTPMiddleware would add)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(HEADER.encode())
        rid = given.decode() if given is not None and _SANE.fullmatch(given) else f"flock-{uuid.uuid4().hex}"
        token = REQUEST_ID.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record ('-' outside a request), for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True
