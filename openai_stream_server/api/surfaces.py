"""The API surfaces this server has, and what each one is: its name, its paths, its ids, its error shape.

The one table that the request counter (its ``surface`` label), the guard and the API-key check (the
shape of their refusals) and every surface's routes (ids, by-id lookups, error answers) consult
(docs/architecture.md, "API surfaces"). Adding a surface adds a row here and a package beside this
module; nothing else keeps a list of them. Importing this costs no route module.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.responses import JSONResponse, Response

from .. import anthropic_errors, sse
from ..errors import ApiError


def openai_error_response(error: ApiError, request_id: str | None = None) -> JSONResponse:
    """An OpenAI error object with the error's status and headers (``X-Request-Id`` when known)."""
    headers = error.headers()
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


@dataclass(frozen=True, slots=True)
class ErrorShape:
    """How a surface writes an ``ApiError``: as an HTTP answer, and as the event a failed stream ends with."""

    name: str
    response: Callable[[ApiError, str | None], Response]
    """The answer before any header went out (the error's status; ``X-Request-Id`` when the id is known)."""
    event: Callable[[ApiError], bytes]
    """The SSE event after the headers went out."""
    key_hint: str
    """How a request refused for its API key is told to send one."""


OPENAI_ERRORS = ErrorShape("openai", openai_error_response, sse.error_event, "'Authorization: Bearer <key>'")
ANTHROPIC_ERRORS = ErrorShape("anthropic", anthropic_errors.error_response, anthropic_errors.error_event, "'x-api-key: <key>'")


@dataclass(frozen=True, slots=True)
class SurfaceSpec:
    """One API surface: everything about it that is not a route or a rendering."""

    name: str
    """The ``surface`` label of ``oss_requests_total`` and ``oss_completions_total``, and ``StreamState.surface``."""
    prefix: str
    """Its routes: this path and every path under it."""
    id_prefix: str
    """Its ids are this followed by ``id_bytes`` random bytes in hex."""
    id_bytes: int
    errors: ErrorShape
    noun: str = "completion"
    """What a by-id 404 says it did not find."""
    id_param: str = "id"
    """The ``param`` a by-id 404 names."""
    id_pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    """What ``new_id`` makes (any length up to 64 hex digits): a path id must match it before any lookup,
    header or log line, because an id with a control or non-ASCII character cannot go into
    ``X-Request-Id`` (that was a 500)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_pattern", re.compile(re.escape(self.id_prefix) + "[0-9a-f]{1,64}"))

    def new_id(self) -> str:
        return self.id_prefix + secrets.token_hex(self.id_bytes)

    def owns(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    def valid_id(self, raw: str) -> str | None:
        """``raw`` if it is an id this surface could have made, else None."""
        return raw if self.id_pattern.fullmatch(raw) else None


CHAT = SurfaceSpec("chat", "/v1/chat/completions", "chatcmpl-", 12, OPENAI_ERRORS)
COMPLETIONS = SurfaceSpec("completions", "/v1/completions", "cmpl-", 12, OPENAI_ERRORS)
RESPONSES = SurfaceSpec("responses", "/v1/responses", "resp_", 24, OPENAI_ERRORS, noun="response", id_param="response_id")
MESSAGES = SurfaceSpec("messages", "/v1/messages", "msg_", 12, ANTHROPIC_ERRORS, noun="message")

SURFACES = (CHAT, COMPLETIONS, RESPONSES, MESSAGES)


def surface_of(path: str) -> SurfaceSpec | None:
    """The API surface a path belongs to, or None (health, metrics, models, the demo page)."""
    for surface in SURFACES:
        if surface.owns(path):
            return surface
    return None


def error_shape(path: str) -> ErrorShape:
    """The error shape of the surface a path belongs to; OpenAI's for every other path."""
    surface = surface_of(path)
    return OPENAI_ERRORS if surface is None else surface.errors
