"""The middleware stack, in one place: request counter -> CORS -> guard -> API key -> routes.

Every middleware here is pure ASGI and wraps ``send`` only to look at the response start;
``SseResponse`` sends each event past them on the server's own ``send`` (``RAW_SEND``, put in
the scope by ``RawSendApp``; docs/architecture.md, "Architecture").
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.surfaces import surface_of
from .gateway.keygate import KeyGate
from .gateway.keys import KeyRing
from .gateway.ratelimit import RATE_LIMIT_HEADERS
from .guard import ApiKeyMiddleware, RequestGuard
from .metrics import Metrics
from .settings import Settings
from .sse_response import RAW_SEND


class RawSendApp(Starlette):
    """Starlette that leaves the server's own ``send`` in the scope, for ``SseResponse``'s body messages.

    Every middleware here wraps ``send`` only to look at the response start; ``SseResponse`` sends the
    start through them and each event past them (~1.5 us per event; see ``sse_response``).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


class RequestCounter:
    """Counts the API surfaces' answers by surface (``api/surfaces.py``) and status; looks only at the response start."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        surface = surface_of(scope["path"]) if scope["type"] == "http" else None
        if surface is None:
            await self.app(scope, receive, send)
            return
        label = surface.name

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"]), label).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def middleware_stack(settings: Settings, metrics: Metrics, keys: KeyRing | None = None) -> list[Middleware]:
    """The stack, outermost first. CORS sits outside the guard so that an allowed origin's page can
    read the 415/421/401 it gets."""
    stack = [Middleware(RequestCounter, metrics=metrics)]
    if settings.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Api-Key", "Anthropic-Version"],
                expose_headers=["X-Request-Id", "Retry-After", *RATE_LIMIT_HEADERS],  # a page can read its limits
            )
        )
    stack.append(
        Middleware(
            RequestGuard,
            bound_host=settings.host,
            allowed_hosts=settings.allowed_hosts,
            cors_origins=settings.cors_origins,
        )
    )
    if keys is not None:  # named keys with limits and ownership (docs/team.md)
        stack.append(
            Middleware(KeyGate, ring=keys, metrics=metrics, single_key=settings.api_key, public_metrics=settings.public_metrics)
        )
    elif settings.api_key:
        stack.append(Middleware(ApiKeyMiddleware, api_key=settings.api_key, public_metrics=settings.public_metrics))
    return stack
