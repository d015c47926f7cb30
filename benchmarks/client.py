"""A lean HTTP/1.1 + SSE load client on raw asyncio protocols.

Why not httpx: it spends 6-7 ms of client CPU per request at 64 concurrent
(docs/architecture.md, Facts measured), so on a 2-core machine it, not the server,
would be measured. This client writes the request bytes by hand, parses the
status line, headers, ``Content-Length`` or chunked framing and the SSE
``data:`` lines itself in ``data_received``, and takes one wall-clock stamp
per socket read (every event in that read shares it). Connections are kept
alive and reused by one worker at a time.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"


@dataclass(slots=True)
class Response:
    """One answer as the client saw it; times are ``time.time()`` (the node's clock, for added delay)."""

    sent_at: float = 0.0
    status: int = 0
    body: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    # streaming only: one entry per content event
    arrivals: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    stamps: list[float | None] = field(default_factory=list)
    """``x_sent_at`` of each content event (the oldest chunk in it), when the server relays it."""
    events: int = 0
    role_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False
    """``data: [DONE]`` seen (streams) or the whole body read (JSON)."""

    @property
    def content(self) -> str:
        return "".join(self.texts)


class _Protocol(asyncio.Protocol):
    """Parses one response at a time: head, then a fixed-length or chunked body, SSE events on the fly."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sse = bytearray()
        self.response: Response | None = None
        self.stream = False
        self.waiter: asyncio.Future[Response] | None = None
        self.state = "idle"  # idle | head | length | chunk-size | chunk-data | chunk-trailer
        self.remaining = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            assert self.response is not None
            self.response.error = self.response.error or f"connection lost ({exc or 'closed by peer'})"
            self.waiter.set_result(self.response)

    def begin(self, request: bytes, stream: bool) -> asyncio.Future[Response]:
        assert self.transport is not None and self.state == "idle"
        self.response = Response(sent_at=time.time())
        self.stream = stream
        self.state = "head"
        self.sse.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf
        buf += data
        response = self.response
        if response is None:
            return
        pos = 0
        while True:
            state = self.state
            if state == "head":
                end = buf.find(_HEAD_END, pos)
                if end < 0:
                    break
                self._head(bytes(buf[pos:end]))
                pos = end + 4
            elif state == "length":
                take = min(self.remaining, len(buf) - pos)
                self._body(bytes(buf[pos : pos + take]), now)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._finish()
                    break
                if pos >= len(buf):
                    break
            elif state == "chunk-size":
                end = buf.find(_CRLF, pos)
                if end < 0:
                    break
                size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.state = "chunk-trailer"
                else:
                    self.remaining = size
                    self.state = "chunk-data"
            elif state == "chunk-data":
                if len(buf) - pos < self.remaining + 2:
                    break
                self._body(bytes(buf[pos : pos + self.remaining]), now)
                pos += self.remaining + 2
                self.state = "chunk-size"
            elif state == "chunk-trailer":
                end = buf.find(_CRLF, pos)
                if end < 0:
                    break
                empty = end == pos  # the blank line that ends the (usually empty) trailer section
                pos = end + 2
                if empty:
                    self._finish()
                    break
            else:  # idle: bytes after a response (none expected)
                pos = len(buf)
                break
        del buf[:pos]

    def _head(self, head: bytes) -> None:
        response = self.response
        assert response is not None
        lines = head.split(_CRLF)
        response.status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        response.headers = headers
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            self.state = "chunk-size"
        else:
            self.remaining = int(headers.get(b"content-length", b"0"))
            self.state = "length"
            if self.remaining == 0:
                self._finish()

    def _body(self, data: bytes, now: float) -> None:
        response = self.response
        assert response is not None
        if not (self.stream and response.status == 200):
            response.body += data
            return
        sse = self.sse
        sse += data
        start = 0
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            self._event(bytes(sse[start:end]), now)
            start = end + 2
        del sse[:start]

    def _event(self, block: bytes, now: float) -> None:
        response = self.response
        assert response is not None
        for line in block.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comment pings (": ping") and id: lines
            payload = line[5:].lstrip(b" ")
            if payload == b"[DONE]":
                response.done = True
                continue
            response.events += 1
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                response.error = f"bad event: {payload[:200]!r}"
                continue
            if "error" in obj:
                response.error = str(obj["error"].get("message"))
                continue
            choices = obj.get("choices") or ()
            if not choices:
                continue
            choice = choices[0]
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if delta.get("role") is not None and not text:
                response.role_at = now
            elif text:
                response.arrivals.append(now)
                response.texts.append(text)
                response.stamps.append(obj.get("x_sent_at"))
            if choice.get("finish_reason") is not None:
                response.finish_reason = choice["finish_reason"]

    def _finish(self) -> None:
        self.state = "idle"
        response, waiter = self.response, self.waiter
        self.response, self.waiter = None, None
        assert response is not None and waiter is not None
        if not self.stream or response.status != 200:
            response.done = True
        if not waiter.done():
            waiter.set_result(response)


class Connection:
    """One keep-alive HTTP/1.1 connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._protocol: _Protocol | None = None

    async def _ensure(self) -> _Protocol:
        if self._protocol is None or self._protocol.lost:
            loop = asyncio.get_running_loop()
            _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
            self._protocol = protocol
        return self._protocol

    async def post(self, path: str, body: dict[str, Any], *, stream: bool, timeout_s: float) -> Response:
        payload = orjson.dumps(body)
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if stream else 'application/json'}\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        protocol = await self._ensure()
        waiter = protocol.begin(request, stream)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            response = protocol.response or Response()
            response.error = f"timed out after {timeout_s:g} s"
            self.close()
            return response

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


_WORD = re.compile(r"s(\d+)t(\d+)$")


def prompt_for(stream_id: int, tokens: int) -> str:
    """A prompt whose every word names its stream and position: ``s7t0 s7t1 ...``.

    The echo answers it back word by word, so any lost, repeated or foreign
    word in the reassembled answer is found and attributed.
    """
    return " ".join(f"s{stream_id}t{i}" for i in range(tokens))


@dataclass(slots=True)
class Integrity:
    streams: int = 0
    ok: int = 0
    lost: int = 0
    duplicated: int = 0
    crossed: int = 0
    malformed: int = 0
    failed: int = 0
    """Streams with a non-200 status, an error event, no finish reason or no ``[DONE]``."""
    errors: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.streams > 0 and self.ok == self.streams and not (self.lost or self.duplicated or self.crossed)

    def add(self, stream_id: int, tokens: int, content: str, *, failed: str | None = None) -> None:
        """Count one answer against the prompt it should echo (``prompt_for(stream_id, tokens)``)."""
        self.streams += 1
        if failed is not None:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(failed)
        if content == prompt_for(stream_id, tokens):
            if failed is None:
                self.ok += 1
            return
        seen: set[int] = set()
        for word in content.split():
            match = _WORD.match(word)
            if match is None:
                self.malformed += 1
            elif int(match.group(1)) != stream_id:
                self.crossed += 1
            elif int(match.group(2)) in seen:
                self.duplicated += 1
            else:
                seen.add(int(match.group(2)))
        self.lost += tokens - len(seen)

    def as_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "ok": self.ok,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "crossed": self.crossed,
            "malformed": self.malformed,
            "failed": self.failed,
            "errors": self.errors,
            "exact": self.exact,
        }
