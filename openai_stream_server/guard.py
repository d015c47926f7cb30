"""What keeps a web page from driving a server on the user's own machine, and the API key.

Any page a user visits can ``fetch("http://127.0.0.1:8000/v1/chat/completions",
{method: "POST", body})``: with ``Content-Type: text/plain`` the browser sends it
without a CORS preflight, and a page whose name an attacker re-points at
127.0.0.1 (DNS rebinding) is even same-origin. Local model servers answer this
the way Ollama does, and so does ``RequestGuard``, before any route runs
(docs/architecture.md, "HTTP API"):

1. ``Host`` outside the allow-list: 421. A rebinding page always sends its own
   name; localhost, loopback addresses, --host and --allowed-hosts pass (any
   port), and on a server bound to 0.0.0.0 or :: any IP address does too.
2. ``Origin`` on a POST, PUT, PATCH or DELETE that is neither the server's own
   (the demo page) nor allowed by --cors-origins: 403. No ``Origin`` (curl, the
   SDKs) passes; ``Origin: null`` (sandboxed frames, ``file:``) does not.
3. A POST whose ``Content-Type`` is not ``application/json``: 415. A missing
   one passes (``curl -d`` without ``-H``); the body is still parsed as JSON.

Both middlewares here are pure ASGI: they look at the scope only and never
touch the response, so SSE streams pass through unbuffered.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .api.surfaces import error_shape
from .errors import ApiError, ForbiddenOrigin, MisdirectedRequest, Unauthorized, UnsupportedMediaType

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BIND_ALL = frozenset({"0.0.0.0", "::", ""})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a header, as the latin-1 text the wire carried; None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def split_host(authority: str) -> tuple[str, int | None] | None:
    """``Host``/``Origin`` authority -> (lower-case name or bare IP, port); None when it is not one.

    ``[::1]:8000`` -> (``::1``, 8000); ``Example.COM.`` -> (``example.com``, None).
    """
    authority = authority.strip().lower()
    port_text = ""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, colon, port_text = authority.partition(":")
        if colon and (not port_text or ":" in port_text):
            return None  # an unbracketed IPv6 literal or a stray colon
    host = host.rstrip(".")
    if port_text and not (port_text.isascii() and port_text.isdigit() and int(port_text) < 65536):
        return None
    if not host or not host.isascii() or not all(c.isalnum() or c in "-._:" for c in host):
        return None
    return host, int(port_text) if port_text else None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class HostAllowList:
    """Which ``Host`` names this server answers to (the rules are the ``allowed_hosts`` setting's docstring)."""

    def __init__(self, bound_host: str, extra: Iterable[str]) -> None:
        extra = tuple(extra)
        self.any_host = "*" in extra
        self.any_ip = bound_host.strip("[]") in _BIND_ALL
        self.names = {"localhost"}
        self.suffixes: list[str] = []
        for entry in (bound_host, *extra):
            entry = entry.strip().lower()
            if entry.startswith("*."):
                entry = entry[1:]
            if entry.startswith(".") and len(entry) > 1:
                self.suffixes.append(entry.rstrip("."))
                self.names.add(entry[1:].rstrip("."))
                continue
            parsed = split_host(entry) or split_host(f"[{entry}]")  # ``::1`` as well as ``[::1]``
            if parsed is not None:
                self.names.add(parsed[0])

    def allows(self, host: str) -> bool:
        """``host`` as :func:`split_host` returns it."""
        if self.any_host or host in self.names or host.endswith(tuple(self.suffixes)):
            return True
        ip = _ip(host)
        return ip is not None and (ip.is_loopback or self.any_ip)


class RequestGuard:
    """Host allow-list (421), foreign ``Origin`` on state-changing methods (403), non-JSON POST (415)."""

    def __init__(self, app: ASGIApp, *, bound_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = HostAllowList(bound_host, allowed_hosts)
        origins = {o.strip().lower().rstrip("/") for o in cors_origins}
        self.any_origin = "*" in origins
        self.origins = origins - {"*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                await _error_response(scope, error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> ApiError | None:
        host_header = _header(scope, b"host")
        host = None if host_header is None else split_host(host_header)
        if host_header is not None and (host is None or not self.hosts.allows(host[0])):
            # Not a browser's doing when absent (HTTP/1.0, raw clients): a rebinding page always sends it.
            return MisdirectedRequest(
                f"This server does not answer to the host {host_header[:100]!r}; start it with --allowed-hosts to add names.",
                param="Host",
            )
        method = scope["method"]
        if method in _STATE_CHANGING:
            origin = _header(scope, b"origin")
            if origin is not None and not self._origin_allowed(origin, host):
                return ForbiddenOrigin(
                    f"Requests from the web page origin {origin[:100]!r} are not allowed; list it in --cors-origins to allow it.",
                    param="Origin",
                )
        if method == "POST":
            content_type = _header(scope, b"content-type")
            if content_type is not None and content_type.split(";")[0].strip().lower() != "application/json":
                return UnsupportedMediaType(
                    f"The request body must be JSON: send 'Content-Type: application/json', not {content_type[:100]!r}.",
                    param="Content-Type",
                )
        return None

    def _origin_allowed(self, origin: str, host: tuple[str, int | None] | None) -> bool:
        origin = origin.strip().lower()
        if origin in self.origins:  # ``null`` only when listed
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:  # ``http://[::1`` and other authorities urllib refuses
            return False
        if parts.scheme not in _DEFAULT_PORTS or not parts.netloc or parts.path not in ("", "/"):
            return False
        if self.any_origin:
            return True
        if host is None:
            return False
        origin_host = split_host(parts.netloc)
        if origin_host is None:
            return False
        # Same origin: the page was served by this very host:port. A Host without a port means the
        # default port of the scheme the browser used, so compare with the Origin's default port
        # (this also holds behind a proxy that terminates TLS and forwards plain HTTP).
        default = _DEFAULT_PORTS[parts.scheme]
        return (origin_host[0], origin_host[1] or default) == (host[0], host[1] or default)


class ApiKeyMiddleware:
    """Every /v1 route (and /metrics unless ``public_metrics``) needs ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

    ``EventSource`` cannot send headers, so the reattach stream (a GET ending in
    ``/stream``) also takes the key as ``?api_key=``. /health and the demo page
    stay open: the page asks for the key itself.
    """

    def __init__(self, app: ASGIApp, api_key: str, public_metrics: bool = False) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.public_metrics = public_metrics

    def _protected(self, scope: Scope) -> bool:
        if scope["method"] == "OPTIONS":  # CORS preflights carry no credentials
            return False
        path: str = scope["path"]
        return path.startswith("/v1") or (path == "/metrics" and not self.public_metrics)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, credentials = bytes(headers.get(b"authorization", b"")).partition(b" ")
        # The scheme is case-insensitive (RFC 9110, 11.1): clients send ``bearer <key>`` too.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(b" "), self.api_key):
            return True
        x_api_key = headers.get(b"x-api-key")  # the anthropic SDK's header; any route takes it
        if x_api_key is not None and hmac.compare_digest(bytes(x_api_key), self.api_key):
            return True
        if scope["method"] == "GET" and scope["path"].endswith("/stream"):
            query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
            key = query.get("api_key", [""])[0].encode()
            return hmac.compare_digest(key, self.api_key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._protected(scope) and not self._authorized(scope):
            error = Unauthorized(f"Missing or wrong API key: send {error_shape(scope['path']).key_hint}.")
            await _error_response(scope, error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _error_response(scope: Scope, error: ApiError) -> Response:
    """The refusal in the shape of the route's API (``api/surfaces.py``): Anthropic's on /v1/messages, OpenAI's elsewhere."""
    return error_shape(scope["path"]).response(error, None)
