"""OpenAI error objects, raised (never returned) and rendered in one place.

Two phases, as with Starlette's ``response_started``: before the headers go
out the error chooses the HTTP status; after that the same object is sent as
a ``data:`` event followed by ``[DONE]`` (see ``sse.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class ChatCompletionError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ChatCompletionError):
    status, error_type, code = 400, "invalid_request_error", "invalid_value"


class Unauthorized(ChatCompletionError):
    status, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class ForbiddenOrigin(ChatCompletionError):
    """A browser page from an origin the CORS settings do not allow tried a state-changing request."""

    status, error_type, code = 403, "permission_error", "origin_not_allowed"


class NotFound(ChatCompletionError):
    status, error_type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class BodyTooLarge(ChatCompletionError):
    status, error_type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedMediaType(ChatCompletionError):
    """A POST body declared as something other than JSON (a form or ``text/plain`` needs no CORS preflight)."""

    status, error_type, code = 415, "invalid_request_error", "unsupported_media_type"


class MisdirectedRequest(ChatCompletionError):
    """A ``Host`` header outside the allow-list: what a DNS-rebinding page sends."""

    status, error_type, code = 421, "invalid_request_error", "host_not_allowed"


class TooManyRequests(ChatCompletionError):
    status, error_type, code = 429, "rate_limit_error", "too_many_requests"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class BackendUnavailable(ChatCompletionError):
    status, error_type, code = 503, "server_error", "backend_unavailable"


class Overloaded(ChatCompletionError):
    """Completions hold too many bytes over all (``max_total_bytes``): retry shortly."""

    status, error_type, code = 503, "server_error", "server_overloaded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamTimeout(ChatCompletionError):
    status, error_type, code = 504, "timeout", "upstream_timeout"


class UpstreamError(ChatCompletionError):
    """The node ended the request with ``finish_reason: error``, or its chunks could not be put in order."""

    status, error_type, code = 502, "server_error", "upstream_error"


class Cancelled(ChatCompletionError):
    status, error_type, code = 499, "invalid_request_error", "cancelled"
