"""The API-key check with a key file: who is asking, whether they are within their limits, and OpenAI's headers.

Takes the place of ``guard.ApiKeyMiddleware`` when ``--api-keys-file`` is set (docs/team.md). The same
routes are protected and the key is read from the same places (``Authorization: Bearer``, ``x-api-key``,
``?api_key=`` on a reattach stream); ``--api-key``, when also set, is one more key, named ``default``,
with no limits. A POST that opens a completion counts against the key's limits for as long as it is
answered; every answer to a key with limits carries the ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api.surfaces import SURFACES, error_shape
from ..errors import ApiError, Unauthorized
from ..metrics import Metrics
from .keys import ApiKey, KeyRing
from .owner import CURRENT_KEY, KeyContext
from .ratelimit import RateLimited, RateLimiter

SINGLE_KEY_NAME = "default"
_OPENING_PATHS = frozenset(s.prefix for s in SURFACES)


def presented_key(scope: Scope) -> bytes:
    """The key a request carries, where ``ApiKeyMiddleware`` looks for it; empty when none."""
    headers = dict(scope["headers"])
    scheme, _, credentials = bytes(headers.get(b"authorization", b"")).partition(b" ")
    if scheme.lower() == b"bearer" and credentials.strip(b" "):
        return credentials.strip(b" ")
    x_api_key = headers.get(b"x-api-key")
    if x_api_key:
        return bytes(x_api_key)
    if scope["method"] == "GET" and scope["path"].endswith("/stream"):
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        return query.get("api_key", [""])[0].encode()
    return b""


class KeyGate:
    """Several named keys with limits; a refused request gets 401 or 429 in its route's error shape."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        ring: KeyRing,
        metrics: Metrics,
        single_key: str | None = None,
        public_metrics: bool = False,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.app = app
        self.ring = ring
        self.single_key = single_key.encode() if single_key else None
        self.public_metrics = public_metrics
        self.limiter = limiter or RateLimiter()
        self.requests = Counter(
            "oss_key_requests",
            "Requests by API key name and outcome (ok, unauthorized, rate_limited)",
            ["key", "outcome"],
            registry=metrics.registry,
        )
        self._ok: dict[str, Any] = {}
        """Each key name's ``ok`` child of the counter: ``labels()`` costs more than the rest of the check."""

    def _protected(self, scope: Scope) -> bool:
        if scope["method"] == "OPTIONS":
            return False
        path: str = scope["path"]
        return path.startswith("/v1") or (path == "/metrics" and not self.public_metrics)

    def _key(self, scope: Scope) -> ApiKey | None:
        presented = presented_key(scope)
        if self.single_key is not None and presented and hmac.compare_digest(presented, self.single_key):
            return ApiKey(SINGLE_KEY_NAME)
        return self.ring.lookup(presented)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(scope):
            await self.app(scope, receive, send)
            return
        key = self._key(scope)
        if key is None:
            self.requests.labels("", "unauthorized").inc()
            error: ApiError = Unauthorized(f"Missing or wrong API key: send {error_shape(scope['path']).key_hint}.")
            await error_shape(scope["path"]).response(error, None)(scope, receive, send)
            return
        opens = scope["method"] == "POST" and scope["path"] in _OPENING_PATHS
        try:
            usage = self.limiter.admit(key, opens=opens)
        except RateLimited as refused:
            self.requests.labels(key.name, "rate_limited").inc()
            usage = self.limiter.usage[key.name]
            response = error_shape(scope["path"]).response(refused, None)
            response.raw_headers += self.limiter.headers(usage)
            await response(scope, receive, send)
            return
        counted = self._ok.get(key.name)
        if counted is None:
            counted = self._ok[key.name] = self.requests.labels(key.name, "ok")
        counted.inc()
        context = KeyContext(key.name, usage, key=key)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *self.limiter.headers(usage)]
            await send(message)

        token = CURRENT_KEY.set(context)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            CURRENT_KEY.reset(token)
            if opens:
                tokens = sum(state.log.usage["total_tokens"] for state in context.opened)
                self.limiter.close(usage, tokens)
