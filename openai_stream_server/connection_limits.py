"""Limits on HTTP connections, applied before the app sees a request (docs/architecture.md, "Limits").

uvicorn reads a request's headers and body with no deadline: a client that sends half its
headers and then nothing keeps its connection (and a file descriptor) forever; 300 of them were
all still open after 90 s. ``LimitedHttpToolsProtocol`` is uvicorn's httptools protocol plus two
things:

- **A read deadline.** A request's headers must have arrived ``read_timeout_s`` after the
  connection opened (on a kept-alive connection: after the request's first byte), and its body
  ``read_timeout_s`` after the headers. Past it the client gets 408 and the connection closes
  (a connection that has sent no byte of a request is closed without a word). The deadline
  covers reading a request only: a response being written, a long SSE stream say, is never cut
  by it, and a pipelined request read behind one is timed again once that response has ended.
- **A cap on open connections.** A connection beyond ``max_connections`` first evicts the
  connection that has waited longest on its client (one still sending a request, or idle
  between two); only when every open connection is serving a request does the new one get 503
  and close. Half-open requests can therefore neither pile up nor keep anyone else out.

Idle kept-alive connections between requests are closed by uvicorn's own ``timeout_keep_alive``.
The class is made per server by ``limited_protocol`` (uvicorn instantiates the protocol class
itself, with its own arguments), so its limits, its waiting list and its counters are that
server's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import ApiError, Overloaded

logger = logging.getLogger(__name__)


class RequestTimeout(ApiError):
    """408: the request's headers or body did not arrive within ``--request-read-timeout-s``."""

    status, error_type, code = 408, "invalid_request_error", "request_timeout"


@dataclass
class ConnectionStats:
    """What the limits did, for ``/metrics`` (read when it renders; written on the loop thread only)."""

    read_timeouts: int = 0
    """Requests whose headers or body did not arrive in time (408 or a silent close)."""
    evicted: int = 0
    """Connections waiting on their client, closed to make room for a new one at the cap."""
    refused: int = 0
    """New connections answered 503 at the cap because every open one was serving a request."""


def _raw_response(error: ApiError) -> bytes:
    """The whole response for ``error``, written straight to the transport, then the connection closes."""
    body = error.to_json()
    head = [STATUS_LINE[error.status]]
    for name, value in {**error.headers(), "content-type": "application/json", "connection": "close"}.items():
        head.append(f"{name}: {value}\r\n".encode("latin-1"))
    head.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join(head) + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read deadline per request and a cap on open connections."""

    read_timeout_s: ClassVar[float] = 30.0
    """0: no deadline."""
    max_connections: ClassVar[int] = 0
    """0: no cap."""
    stats: ClassVar[ConnectionStats]
    waiting: ClassVar[dict[LimitedHttpToolsProtocol, None]]
    """Open connections waiting on their client (for a request, its body, or idle), longest first: who the cap evicts."""

    _timed_out_response: ClassVar[bytes] = _raw_response(RequestTimeout("The request's headers or body did not arrive in time."))
    _refused_response: ClassVar[bytes] = _raw_response(Overloaded("Too many open connections; retry shortly."))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading = False
        """A request has begun arriving and is not complete yet."""
        self._body_since: float | None = None
        """When the headers of the request being read were complete (its body's deadline runs from here)."""

    # -- uvicorn's callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections and not self._evict_one():
            self.stats.refused += 1
            transport.write(self._refused_response)
            transport.close()
            return
        self._wait()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading, self._body_since = True, None
        if self._deadline is None:  # a request on a kept-alive connection; the first one keeps the connection's deadline
            self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The body's own deadline, without a second timer per request: the one running is moved on when it fires.
        self._body_since = self.loop.time()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading, self._body_since = False, None
        self._disarm()
        self.waiting.pop(self, None)  # read: it is the app's now (or queued behind one), no longer waiting on its client

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if not pipelined:  # else the next (pipelined) request is being served already
            self._wait()
        if self._reading:  # a request read behind the response, its reading paused meanwhile: time it afresh
            if self._body_since is not None:
                self._body_since = self.loop.time()
            self._disarm()
            self._arm()

    def handle_websocket_upgrade(self) -> None:  # not used (main.py sets ws="none"), but never time a handed-over transport
        self._disarm()
        self.waiting.pop(self, None)
        super().handle_websocket_upgrade()

    # -- the limits -------------------------------------------------------------

    def _wait(self) -> None:
        self.waiting.pop(self, None)
        self.waiting[self] = None  # to the end: the longest waiting is first

    def _arm(self, delay_s: float | None = None) -> None:
        if self.read_timeout_s:
            self._deadline = self.loop.call_later(delay_s or self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _busy(self) -> bool:
        """A response is under way (or an app is still working on a request) on this connection: never cut it."""
        cycle = self.cycle
        if self.pipeline:
            return True  # the request being read waits behind one being answered
        if cycle is None or cycle.response_complete:
            return False
        if self._body_since is None:
            return True  # the headers being read are a new request's: ``cycle`` is the one before it, still served
        return cycle.response_started  # the body being read is ``cycle``'s own; late unless the app answered already

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._busy():
            return  # a response is being written: never cut it (on_response_complete re-arms if a request is half read)
        if self._body_since is not None:
            left_s = self._body_since + self.read_timeout_s - self.loop.time()
            if left_s > 0:  # the headers came in time; the body has until its own deadline
                self._arm(left_s)
                return
        self.stats.read_timeouts += 1
        logger.debug("request read timed out after %g s; closing %s", self.read_timeout_s, self.client)
        self._close_waiting()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest on its client; False if every one is serving a request."""
        for victim in self.waiting:
            if victim is not self and not victim._busy():  # busy: the app answered before the whole body came
                self.stats.evicted += 1
                victim._close_waiting()
                return True
        return False

    def _close_waiting(self) -> None:
        """End a connection that is serving no response: 408 if a request had begun, else just close."""
        self._disarm()
        self.waiting.pop(self, None)
        cycle = self.cycle
        if self._reading:  # not busy (``_busy``): no response of this connection has begun and not ended
            if cycle is not None and not cycle.response_complete:
                # The app may be waiting for the body: it gets http.disconnect, and whatever it sends is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(self._timed_out_response)
        self.transport.close()


def limited_protocol(read_timeout_s: float, max_connections: int) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for one server (``uvicorn.Config(http=...)``), with its own waiting list and counters."""
    attrs = {
        "read_timeout_s": read_timeout_s,
        "max_connections": max_connections,
        "stats": ConnectionStats(),
        "waiting": {},
    }
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), attrs)
