"""Image URLs: no way into the node's own network (SSRF), redirects re-checked, fixed client messages, caps.

Everything runs against a real HTTP server on 127.0.0.1. To have a first
hop that the policy allows on a machine with only loopback, ``FakeNetwork``
resolves ``public.example`` to a public address and connects that address
to the local server: the check sees a public address, the bytes stay local.
"""

from __future__ import annotations

import http.server
import logging
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from qwenvl_helpers import LocalServer, Route, png_bytes, serve_bytes
from qwenvl_stream.fetch import MAX_REDIRECTS, UrlFetcher, is_refused_address, system_resolve
from qwenvl_stream.images import ImageError, ImageLimits, ImageLoader, load_image
from qwenvl_stream.settings import Settings

from tests.requirements import missing

pytestmark = pytest.mark.timeout(60)

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=4_000_000, timeout_s=5.0)
NOT_ALLOWED = "image URL not allowed"
FAILED = "image fetch failed"
PUBLIC_HOST = "public.example"
PUBLIC_IP = "93.184.215.14"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as local:
        local.routes["/ok.png"] = serve_bytes(png_bytes((16, 16)))
        yield local


def message_of(source: str, limits: ImageLimits = LIMITS, fetcher: UrlFetcher | None = None) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, limits, fetcher)
    return str(info.value)


class FakeNetwork:
    """``public.example`` (or every name, with ``answers``) resolves to chosen addresses; ``PUBLIC_IP`` dials the local server."""

    def __init__(self, port: int, answers: Sequence[Sequence[str]] = ()) -> None:
        self.port = port
        self.answers = list(answers)
        self.resolved: list[str] = []
        self.dialed: list[str] = []

    def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        if host != PUBLIC_HOST:
            return system_resolve(host, port)
        if self.answers:
            return list(self.answers.pop(0) if len(self.answers) > 1 else self.answers[0])
        return [PUBLIC_IP]

    def dial(self, address: str, port: int, timeout_s: float) -> socket.socket:
        self.dialed.append(address)
        assert address == PUBLIC_IP, f"dialed {address}"
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)

    def fetcher(self) -> UrlFetcher:
        return UrlFetcher(resolve=self.resolve, dial=self.dial)


def public_url(server: LocalServer, path: str) -> str:
    return server.url(path, host=PUBLIC_HOST)


def redirect_to(location: str) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def test_a_loopback_url_is_refused_by_default_and_fetched_with_the_setting(server: LocalServer) -> None:
    url = server.url("/ok.png")
    assert message_of(url) == NOT_ALLOWED
    assert message_of(server.url("/ok.png", host="localhost")) == NOT_ALLOWED
    assert ImageLoader.from_settings(Settings()).fetcher.allow_private is False
    with pytest.raises(ImageError, match=f"^{NOT_ALLOWED}$"):
        ImageLoader.from_settings(Settings())([url])
    assert server.hits == []  # refused before any connection

    allowing = Settings.from_env({"QWENVL_ALLOW_PRIVATE_URLS": "1"})
    assert allowing.allow_private_urls is True
    assert [image.size for image in ImageLoader.from_settings(allowing)([url])] == [(16, 16)]
    assert server.paths() == ["/ok.png"]


@pytest.mark.parametrize("raw", ["maybe", "2"])
def test_a_bad_allow_private_urls_value_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="QWENVL_ALLOW_PRIVATE_URLS"):
        Settings.from_env({"QWENVL_ALLOW_PRIVATE_URLS": raw})


def test_a_public_host_is_fetched_from_the_checked_address_with_its_own_host_header(server: LocalServer) -> None:
    network = FakeNetwork(server.port)
    server.routes["/hop"] = redirect_to("/ok.png")  # relative, to the same public host
    assert load_image(public_url(server, "/hop"), LIMITS, network.fetcher()).size == (16, 16)
    assert server.hits == [("/hop", f"{PUBLIC_HOST}:{server.port}"), ("/ok.png", f"{PUBLIC_HOST}:{server.port}")]
    assert network.resolved == [PUBLIC_HOST, PUBLIC_HOST]  # each hop resolved once and checked
    assert network.dialed == [PUBLIC_IP, PUBLIC_IP]


@pytest.mark.parametrize(
    "location",
    [
        pytest.param("http://127.0.0.1:{port}/ok.png", id="ipv4-loopback"),
        pytest.param("http://localhost:{port}/ok.png", id="localhost"),
        pytest.param("http://[::1]:{port}/ok.png", id="ipv6-loopback"),
        pytest.param("http://[::ffff:127.0.0.1]:{port}/ok.png", id="ipv4-mapped-loopback"),
        pytest.param("http://169.254.169.254/latest/meta-data/", id="cloud-metadata"),
        pytest.param("file:///etc/passwd", id="file-scheme"),
    ],
)
def test_a_redirect_from_an_allowed_url_to_a_refused_one_is_refused(server: LocalServer, location: str) -> None:
    network = FakeNetwork(server.port)
    server.routes["/redirect"] = redirect_to(location.format(port=server.port))
    assert message_of(public_url(server, "/redirect"), fetcher=network.fetcher()) == NOT_ALLOWED
    assert server.paths() == ["/redirect"]  # the redirect's target was never requested


def test_redirects_are_bounded(server: LocalServer) -> None:
    network = FakeNetwork(server.port)
    server.routes["/loop"] = redirect_to("/loop")
    assert message_of(public_url(server, "/loop"), fetcher=network.fetcher()) == FAILED
    assert server.paths() == ["/loop"] * (MAX_REDIRECTS + 1)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.mark.parametrize(
    "cert_name, ok",
    [pytest.param(PUBLIC_HOST, True, id="right-name"), pytest.param("other.example", False, id="wrong-name")],
)
def test_https_connects_to_the_checked_address_but_verifies_the_url_host(tmp_path: Path, cert_name: str, ok: bool) -> None:
    if shutil.which("openssl") is None:
        missing("the openssl command makes the test certificate: apt-get install -y openssl")
    cert, key = self_signed(tmp_path, cert_name)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    with LocalServer(tls=server_tls) as server:
        server.routes["/ok.png"] = serve_bytes(png_bytes((16, 16)))
        network = FakeNetwork(server.port)
        fetcher = UrlFetcher(resolve=network.resolve, dial=network.dial, tls=ssl.create_default_context(cafile=str(cert)))
        url = public_url(server, "/ok.png")
        if ok:
            assert url.startswith("https://") and load_image(url, LIMITS, fetcher).size == (16, 16)
            assert server.hits == [("/ok.png", f"{PUBLIC_HOST}:{server.port}")]
        else:
            assert message_of(url, fetcher=fetcher) == FAILED  # the certificate is checked against the URL's name
            assert server.hits == []
        assert network.dialed == [PUBLIC_IP]


def test_dns_rebinding_cannot_reach_a_refused_address(server: LocalServer) -> None:
    # The first answer is public, every later one loopback: connecting by name after the check would reach 127.0.0.1.
    network = FakeNetwork(server.port, answers=[[PUBLIC_IP], ["127.0.0.1"]])
    assert load_image(public_url(server, "/ok.png"), LIMITS, network.fetcher()).size == (16, 16)
    assert network.resolved == [PUBLIC_HOST] and network.dialed == [PUBLIC_IP]


def test_every_resolved_address_is_checked(server: LocalServer) -> None:
    network = FakeNetwork(server.port, answers=[[PUBLIC_IP, "10.0.0.7"]])
    assert message_of(public_url(server, "/ok.png"), fetcher=network.fetcher()) == NOT_ALLOWED
    assert network.dialed == [] and server.hits == []


def refuse_to_dial(address: str, port: int, timeout_s: float) -> socket.socket:
    raise AssertionError(f"dialed {address}:{port}")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://10.1.2.3/a.png", id="private-10"),
        pytest.param("http://172.16.0.1/a.png", id="private-172"),
        pytest.param("http://192.168.1.1/a.png", id="private-192"),
        pytest.param("http://100.64.0.1/a.png", id="shared-100-64"),
        pytest.param("http://127.0.0.2:8080/a.png", id="loopback-127-0-0-2"),
        pytest.param("http://169.254.169.254/latest/meta-data/", id="link-local-metadata"),
        pytest.param("http://224.0.0.1/a.png", id="multicast"),
        pytest.param("http://240.0.0.1/a.png", id="reserved"),
        pytest.param("http://0.0.0.0/a.png", id="unspecified"),
        pytest.param("http://2130706433/a.png", id="decimal-loopback"),
        pytest.param("https://[::1]/a.png", id="ipv6-loopback"),
        pytest.param("http://[::]/a.png", id="ipv6-unspecified"),
        pytest.param("http://[fe80::1%25eth0]/a.png", id="ipv6-link-local"),
        pytest.param("http://[fc00::1]/a.png", id="ipv6-unique-local"),
        pytest.param("http://[ff02::1]/a.png", id="ipv6-multicast"),
        pytest.param("http://[::ffff:10.0.0.1]/a.png", id="ipv4-mapped-private"),
        pytest.param("http://[::ffff:169.254.169.254]/a.png", id="ipv4-mapped-link-local"),
        pytest.param("http://[2002:7f00:1::]/a.png", id="6to4-loopback"),
        pytest.param("http://[64:ff9b::a00:1]/a.png", id="nat64-private"),
        pytest.param("ftp://example.com/a.png", id="ftp-scheme"),
        pytest.param("gopher://example.com/a.png", id="gopher-scheme"),
        pytest.param("http:///a.png", id="no-host"),
        pytest.param("http://example.com:99999/a.png", id="bad-port"),
    ],
)
def test_urls_into_the_local_network_are_refused_without_connecting(url: str) -> None:
    fetcher = UrlFetcher(dial=refuse_to_dial)
    assert message_of(url, ImageLimits(1000, 1000, timeout_s=1.0), fetcher) == NOT_ALLOWED


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "::ffff:1.1.1.1"])
def test_public_addresses_pass_the_check(address: str) -> None:
    assert not is_refused_address(address)


def test_the_client_never_sees_the_remote_error_and_the_log_escapes_user_input(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    def error(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(500, "SECRET-REASON")
        handler.send_header("Content-Length", "18")
        handler.end_headers()
        handler.wfile.write(b"SECRET-BODY\n<html>")

    def garbage(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"SECRET-STATUS-LINE\r\n\r\n")

    server.routes["/error"] = error
    server.routes["/garbage"] = garbage
    local = UrlFetcher(allow_private=True)
    caplog.set_level(logging.WARNING, logger="qwenvl_stream")
    for path in ("/error", "/garbage"):
        assert message_of(server.url(path), fetcher=local) == FAILED
    assert message_of(server.url("/ok.png\nINJECTED line")) == NOT_ALLOWED
    assert server.paths() == ["/error", "/garbage"]
    records = [r for r in caplog.records if r.name.startswith("qwenvl_stream")]
    assert len(records) == 3 and all(r.levelno == logging.WARNING for r in records)
    assert all("\n" not in r.getMessage() for r in records)
    assert "\\nINJECTED" in records[-1].getMessage()


def test_the_size_cap_holds_with_and_without_a_content_length(server: LocalServer) -> None:
    def stream(claimed: int | None) -> Route:
        def route(handler: http.server.BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            if claimed is not None:
                handler.send_header("Content-Length", str(claimed))
            handler.end_headers()
            try:
                for _ in range(200):  # up to 200 KiB, or until the client hangs up
                    handler.wfile.write(b"x" * 1024)
            except OSError:
                pass

        return route

    server.routes["/claims-too-much"] = stream(10**9)
    server.routes["/no-length"] = stream(None)
    local = UrlFetcher(allow_private=True)
    small = ImageLimits(max_bytes=4096, max_pixels=10**6, timeout_s=5)
    assert message_of(server.url("/claims-too-much"), small, local) == "image is larger than the 4096 bytes allowed"
    assert message_of(server.url("/no-length"), small, local) == "image is larger than the 4096 bytes allowed"


class Trickle:
    """A route that sends one byte every 20 ms (in a header or in the body), until ``total`` or the client hangs up."""

    def __init__(self, where: str, stop: threading.Event, total: int = 400) -> None:
        self.where = where
        self.stop = stop
        self.total = total
        self.sent = 0
        self.done = threading.Event()

    def __call__(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        try:
            handler.send_response(200)
            if self.where == "body":
                handler.send_header("Content-Length", str(self.total))
                handler.end_headers()
            else:
                handler.wfile.write(b"X-Slow: ")
            handler.wfile.flush()
            for _ in range(self.total):
                if self.stop.wait(0.02):
                    break
                handler.wfile.write(b"a")
                handler.wfile.flush()
                self.sent += 1
        except OSError:
            pass
        finally:
            self.done.set()


@pytest.mark.parametrize("where", ["body", "headers"])
def test_the_time_cap_bounds_the_whole_fetch_even_when_bytes_keep_trickling(server: LocalServer, where: str) -> None:
    slow = Trickle(where, server.stop)
    server.routes["/slow"] = slow
    local = UrlFetcher(allow_private=True)
    # Each byte comes well within the timeout: only a deadline for the whole fetch stops it early.
    assert message_of(server.url("/slow"), ImageLimits(10**6, 10**6, timeout_s=0.5), local) == FAILED
    assert slow.done.wait(10)  # the server saw the client hang up ...
    assert slow.sent < slow.total  # ... before it had sent everything


def test_a_name_that_never_resolves_is_bounded_by_the_time_cap() -> None:
    release = threading.Event()

    def hang(host: str, port: int) -> list[str]:
        release.wait(30)
        return [PUBLIC_IP]

    try:
        fetcher = UrlFetcher(resolve=hang, dial=refuse_to_dial)
        assert message_of("http://slow-dns.example/a.png", ImageLimits(1000, 1000, timeout_s=0.3), fetcher) == FAILED
    finally:
        release.set()
