"""A guarded http(s) GET for image URLs, so that a client cannot make the node reach into its own network.

- Only ``http`` and ``https``. Every hop (the URL, then each redirect, at
  most ``MAX_REDIRECTS``) is resolved once, every address the name resolves
  to is checked (loopback, private, link-local, multicast, reserved,
  unspecified and shared addresses are refused, IPv4 inside IPv6 included),
  and the connection goes to the checked address itself: the ``Host``
  header, TLS SNI and the certificate check still use the URL's host name.
  A DNS answer that changes between the check and the connect (rebinding)
  therefore never reaches a refused address.
- ``allow_private`` lifts the address check (a trusted network, tests);
  the scheme check stays.
- One deadline bounds the whole fetch: name resolution, each connect, the
  TLS handshake, sending the request, and every read of headers and body,
  so a server that trickles bytes cannot hold a fetch past ``timeout_s``.
- Proxies from the environment are not used.

Exceptions carry details for the log only; ``images.py`` turns them into
the fixed messages the client sees.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_SIZE = 64 * 1024
_USER_AGENT = "qwenvl-stream (dora-rs node)"

Resolve = Callable[[str, int], Sequence[str]]
"""``(host, port)`` → the addresses (IP strings) the host name resolves to."""
Dial = Callable[[str, int, float], socket.socket]
"""``(address, port, timeout_s)`` → a connected TCP socket."""

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NotAllowed(Exception):
    """Refused by policy before any connection: scheme, malformed URL or address."""


class FetchFailed(Exception):
    """A network, TLS, HTTP or time-limit failure."""


class TooLarge(Exception):
    """The body is larger than ``max_bytes``."""


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def tcp_dial(address: str, port: int, timeout_s: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout_s)


def is_refused_address(address: str | _IPAddress) -> bool:
    """Whether an address is anything but a public unicast one."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # reaches exactly that IPv4 address
            return is_refused_address(ip.ipv4_mapped)
        embedded = ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and is_refused_address(embedded):
            return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _target(url: str) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise NotAllowed(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise NotAllowed(f"scheme {scheme!r}")
    host = parts.hostname
    if not host:
        raise NotAllowed("no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the image fetch ran out of time")
    return left


@functools.cache
def _default_tls() -> ssl.SSLContext:
    return ssl.create_default_context()


@dataclass(frozen=True, slots=True)
class UrlFetcher:
    """Fetches one URL under the policy above; ``resolve`` and ``dial`` are the seams tests replace."""

    allow_private: bool = False
    resolve: Resolve = system_resolve
    dial: Dial = tcp_dial
    max_redirects: int = MAX_REDIRECTS
    tls: ssl.SSLContext | None = None

    def get(self, url: str, *, max_bytes: int, timeout_s: float) -> bytes:
        """The body of a ``200`` answer; raises ``NotAllowed``, ``FetchFailed`` or ``TooLarge``."""
        deadline = time.monotonic() + timeout_s
        for _ in range(self.max_redirects + 1):
            target = _target(url)
            addresses = self._checked_addresses(target, deadline)
            location = self._get_once(target, addresses, max_bytes, deadline)
            if isinstance(location, bytes):
                return location
            url = urllib.parse.urljoin(url, location)
        raise FetchFailed(f"more than {self.max_redirects} redirects")

    def _checked_addresses(self, target: _Target, deadline: float) -> list[str]:
        try:
            addresses = [str(ipaddress.ip_address(target.host))]
        except ValueError:
            addresses = self._resolve_within(target, deadline)
        if not addresses:
            raise FetchFailed(f"{target.host!r} resolved to no address")
        if not self.allow_private:
            refused = [a for a in addresses if is_refused_address(a)]
            if refused:
                raise NotAllowed(f"{target.host!r} resolves to {refused!r}")
        return addresses

    def _resolve_within(self, target: _Target, deadline: float) -> list[str]:
        # getaddrinfo has no timeout of its own: run it aside and stop waiting at the deadline.
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["addresses"] = list(self.resolve(target.host, target.port))
            except Exception as exc:
                result["error"] = exc

        thread = threading.Thread(target=run, name="qwenvl-resolve", daemon=True)
        thread.start()
        try:
            thread.join(_remaining(deadline))
        except TimeoutError as exc:
            raise FetchFailed(str(exc)) from None
        if thread.is_alive():
            raise FetchFailed(f"resolving {target.host!r} ran out of time")
        if "error" in result:
            raise FetchFailed(f"resolving {target.host!r}: {result['error']!r}") from None
        return list(result["addresses"])

    def _get_once(self, target: _Target, addresses: list[str], max_bytes: int, deadline: float) -> bytes | str:
        """The body of a ``200``, or the ``Location`` of a redirect (a str)."""
        tls = (self.tls or _default_tls()) if target.scheme == "https" else None
        connection: _PinnedConnection | None = None
        try:
            connection = _PinnedConnection(target, addresses, self.dial, deadline, tls)
            connection.request("GET", target.path, headers={"User-Agent": _USER_AGENT, "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in _REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise FetchFailed(f"HTTP {response.status} without a Location")
                return location
            if response.status != 200:
                raise FetchFailed(f"HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise TooLarge(f"Content-Length {int(length)}")
            body = bytearray()
            while len(body) <= max_bytes:
                piece = response.read(min(_READ_SIZE, max_bytes + 1 - len(body)))
                if not piece:
                    break
                body += piece
            if len(body) > max_bytes:
                raise TooLarge(f"more than {max_bytes} bytes")
            return bytes(body)
        except (NotAllowed, FetchFailed, TooLarge):
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise FetchFailed(repr(exc)) from None
        finally:
            if connection is not None:
                connection.close_all()


class _PinnedConnection(http.client.HTTPConnection):
    """Connects to one of the already checked addresses, never to what the host name resolves to later."""

    def __init__(self, target: _Target, addresses: list[str], dial: Dial, deadline: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(target.host, target.port)
        self.default_port = 443 if tls is not None else 80  # the Host header omits the scheme's own port
        self._addresses = addresses
        self._dial = dial
        self._deadline = deadline
        self._tls = tls
        self._raw: socket.socket | None = None

    def connect(self) -> None:
        errors: list[str] = []
        for address in self._addresses:
            try:
                sock = self._dial(address, self.port, _remaining(self._deadline))
            except TimeoutError:
                raise
            except OSError as exc:
                errors.append(f"{address}: {exc!r}")
                continue
            self._raw = sock
            if self._tls is not None:
                # CPython bounds the whole handshake by the socket's timeout, not each step.
                sock.settimeout(_remaining(self._deadline))
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
                self._raw = sock
            self.sock = _DeadlineSocket(sock, self._deadline)
            return
        raise FetchFailed(f"could not connect: {'; '.join(errors)}")

    def close_all(self) -> None:
        self.close()
        if self._raw is not None:
            self._raw.close()
            self._raw = None


class _DeadlineSocket:
    """What ``http.client`` sees as its socket: every send and read waits at most until the deadline.

    ``close`` leaves the real socket open (a response may still be reading
    from it after ``http.client`` drops the connection); ``close_all`` on the
    connection closes it.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_remaining(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        pass


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)
