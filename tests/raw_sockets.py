"""Raw TCP clients for what no HTTP library sends: half a request, then nothing (tests of ``connection_limits``)."""

from __future__ import annotations

import selectors
import socket
import time

HALF_HEADERS = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: "
"""A request cut off in the middle of a header line."""


def connect(port: int, first_bytes: bytes = b"", timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def read_until_closed(socks: list[socket.socket], timeout_s: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it; a socket still open at the deadline is left out."""
    got = {s: b"" for s in socks}
    closed: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    got[s] += data
                else:
                    closed[s] = got[s]
                    sel.unregister(s)
    return closed


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    return int(response.split(b" ", 2)[1])


def still_open(sock: socket.socket) -> bool:
    """Neither closed nor reset by the server (nothing is read)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
