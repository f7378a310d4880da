"""Error responses documented on every endpoint of the OpenAPI document."""

from typing import Any

from service.protocol import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503)}
