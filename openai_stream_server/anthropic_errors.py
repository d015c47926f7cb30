"""Errors in the Anthropic Messages API's shape, for every answer on /v1/messages paths.

The server raises one kind of error (``errors.ApiError``) whatever the surface; on
/v1/messages it is written as Anthropic writes its errors, ``{"type": "error", "error": {"type",
"message"}}``, with the same HTTP status. The anthropic SDK picks its exception class by status
(``anthropic._error_classes.make_status_error``: 400 ``BadRequestError`` ... 529
``OverloadedError``), so the status is what matters to a client; ``type`` follows Anthropic's list
(docs/architecture.md, "Anthropic Messages API"). ``api/surfaces.py`` names this the /v1/messages
error shape, which the guard and the API-key middleware use too, so that a refused request on that
route is Anthropic-shaped as well.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

from .errors import ApiError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status: the listed ones, else by class (4xx / 5xx)."""
    return _TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_message(error: ApiError) -> str:
    """The message, led by the field it names (``messages.0.content: ...``) unless it already is."""
    param = error.param
    if param and not error.message.startswith(param + ":"):
        return f"{param}: {error.message}"
    return error.message


def error_dict(error: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(error.status), "message": error_message(error)}}


def error_event(error: ApiError) -> bytes:
    """The ``event: error`` a stream ends with when it fails after its headers went out."""
    return b"event: error\ndata: " + orjson.dumps(error_dict(error)) + b"\n\n"


def error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    """The error with its status and headers (``Retry-After``; ``X-Request-Id`` and ``request-id`` when known)."""
    headers = error.headers()
    if request_id is not None:
        headers["X-Request-Id"] = request_id
        headers["request-id"] = request_id
    return JSONResponse(error_dict(error), status_code=error.status, headers=headers)
