"""The server's errors: one base (``ApiError``), raised (never returned), one class per status.

Every surface raises these; each renders them in its own shape (``api/surfaces.py``: an OpenAI
error object, or Anthropic's on /v1/messages). Two phases, as with Starlette's
``response_started``: before the headers go out the error chooses the HTTP status; after that the
same object is sent as an error event (``sse.error_event``, ``anthropic_errors.error_event``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class ApiError(Exception):
    """Base of every error an API surface answers with: HTTP status, OpenAI ``type`` and ``code``, ``param``."""

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


class InvalidRequest(ApiError):
    status, error_type, code = 400, "invalid_request_error", "invalid_value"


class Unauthorized(ApiError):
    status, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class ForbiddenOrigin(ApiError):
    """A browser page from an origin the CORS settings do not allow tried a state-changing request."""

    status, error_type, code = 403, "permission_error", "origin_not_allowed"


class NotFound(ApiError):
    status, error_type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class BodyTooLarge(ApiError):
    status, error_type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedMediaType(ApiError):
    """A POST body declared as something other than JSON (a form or ``text/plain`` needs no CORS preflight)."""

    status, error_type, code = 415, "invalid_request_error", "unsupported_media_type"


class MisdirectedRequest(ApiError):
    """A ``Host`` header outside the allow-list: what a DNS-rebinding page sends."""

    status, error_type, code = 421, "invalid_request_error", "host_not_allowed"


class TooManyRequests(ApiError):
    status, error_type, code = 429, "rate_limit_error", "too_many_requests"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class BackendUnavailable(ApiError):
    status, error_type, code = 503, "server_error", "backend_unavailable"


class Overloaded(ApiError):
    """Completions hold too many bytes over all (``max_total_bytes``): retry shortly."""

    status, error_type, code = 503, "server_error", "server_overloaded"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamTimeout(ApiError):
    status, error_type, code = 504, "timeout", "upstream_timeout"


class UpstreamError(ApiError):
    """The node ended the request with ``finish_reason: error``, or its chunks could not be put in order."""

    status, error_type, code = 502, "server_error", "upstream_error"


class Cancelled(ApiError):
    status, error_type, code = 499, "invalid_request_error", "cancelled"


class MethodNotAllowed(ApiError):
    """A method a route does not take; ``Allow`` names the ones it does."""

    status, error_type, code = 405, "invalid_request_error", "method_not_allowed"

    def __init__(self, message: str, *, allow: str = "POST", param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}
