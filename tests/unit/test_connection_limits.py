"""The read deadline and the connection cap (``connection_limits``) on a real uvicorn, configured as ``main`` does.

Raw sockets play the hostile clients (half the headers, half a body, nothing at all); httpx plays
everyone else, who must be served meanwhile. Timeouts are short (a fraction of a second) and
every wait is bounded by a generous multiple of them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
import uvicorn

from openai_stream_server.app import create_app
from openai_stream_server.main import uvicorn_config
from openai_stream_server.settings import Settings
from tests import raw_sockets
from tests.fakes import FakeBackend
from tests.live import LiveServer, metric
from tests.raw_sockets import HALF_HEADERS, status_of, still_open

pytestmark = pytest.mark.timeout(60)

READ_TIMEOUT_S = 0.4
WAIT_S = 15 * READ_TIMEOUT_S
"""A generous bound on how long a closed-by-deadline connection may take to close (a loaded machine)."""


def body(text: str, *, stream: bool = False) -> dict[str, object]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}


class ProductionServer(LiveServer):
    """``LiveServer`` with uvicorn configured as ``openai-stream-server`` runs it (``main.uvicorn_config``)."""

    def __init__(self, settings: Settings, backend: FakeBackend) -> None:
        super().__init__(create_app(settings, backend))
        self.server = uvicorn.Server(uvicorn_config(self.app, settings))

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def wait_open(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.open_connections() != count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.open_connections() == count


@contextmanager
def served(backend: FakeBackend | None = None, **settings: object) -> Iterator[ProductionServer]:
    options: dict[str, object] = {"host": "127.0.0.1", "port": 0, "request_read_timeout_s": READ_TIMEOUT_S}
    options.update(settings)
    with ProductionServer(Settings(**options), backend or FakeBackend()) as live:  # type: ignore[arg-type]
        yield live


def connect(live: ProductionServer, first_bytes: bytes = b"") -> socket.socket:
    return raw_sockets.connect(live.port, first_bytes, WAIT_S)


def read_until_closed(socks: list[socket.socket], timeout_s: float = WAIT_S) -> dict[socket.socket, bytes]:
    return raw_sockets.read_until_closed(socks, timeout_s)


# -- the read deadline -------------------------------------------------------------------


def test_half_sent_headers_get_408_and_close_while_everyone_else_is_served() -> None:
    with served(FakeBackend(delay_s=0.01)) as live:
        slow = [connect(live, HALF_HEADERS) for _ in range(50)]
        with httpx.Client(base_url=live.base_url, timeout=WAIT_S) as client:
            normal = client.post("/v1/chat/completions", json=body("plain answer"))
            with client.stream("POST", "/v1/chat/completions", json=body("streamed answer", stream=True)) as r:
                streamed = r.read().decode()
            closed = read_until_closed(slow)
            metrics = client.get("/metrics").text
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"] == "plain answer"
    assert "streamed" in streamed and streamed.rstrip().endswith("data: [DONE]")
    assert len(closed) == 50, f"{50 - len(closed)} half-open connections still open after {WAIT_S} s"
    assert {status_of(r) for r in closed.values()} == {408}
    error = json.loads(next(iter(closed.values())).partition(b"\r\n\r\n")[2])
    assert error["error"]["code"] == "request_timeout"
    assert metric(metrics, "oss_request_read_timeouts_total") == 50


def test_a_body_that_stops_halfway_gets_408_and_the_app_never_submits_it() -> None:
    backend = FakeBackend()
    with served(backend) as live:
        payload = json.dumps(body("never finished")).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock = connect(live, head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload[:10])
        closed = read_until_closed([sock])
    assert sock in closed and status_of(closed[sock]) == 408
    assert backend.submitted == []


def test_a_connection_that_sends_nothing_is_closed_without_an_answer() -> None:
    with served() as live:
        sock = connect(live)
        closed = read_until_closed([sock])
    assert closed == {sock: b""}


def test_a_stream_much_longer_than_the_read_deadline_is_not_cut_and_the_connection_is_reused() -> None:
    words = " ".join(f"w{i}" for i in range(20))
    with served(FakeBackend(delay_s=READ_TIMEOUT_S / 4)) as live:  # 20 tokens: ~5 deadlines
        with httpx.Client(base_url=live.base_url, timeout=WAIT_S) as client:
            with client.stream("POST", "/v1/chat/completions", json=body(words, stream=True)) as r:
                streamed = r.read().decode()
            again = client.post("/v1/chat/completions", json=body("second"))
            metrics = client.get("/metrics").text
    contents = [
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in streamed.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(contents) == words and streamed.rstrip().endswith("data: [DONE]")
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == "second"
    assert metric(metrics, "oss_request_read_timeouts_total") == 0


def test_a_request_pipelined_behind_a_long_stream_is_not_timed_while_the_stream_runs() -> None:
    """Half of a second request arrives behind a stream that lasts ~3 deadlines, the rest after ~2: both are answered."""
    words = " ".join(f"w{i}" for i in range(12))
    payload = json.dumps(body(words, stream=True)).encode()
    first = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(payload) + payload
    )
    second = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with served(FakeBackend(delay_s=READ_TIMEOUT_S / 4)) as live:
        sock = connect(live, first + second[:20])
        time.sleep(2 * READ_TIMEOUT_S)
        sock.sendall(second[20:])
        closed = read_until_closed([sock], timeout_s=4 * WAIT_S)
    assert sock in closed
    answers = closed[sock].split(b"HTTP/1.1 ")
    assert [a[:3] for a in answers[1:]] == [b"200", b"200"]
    assert b"data: [DONE]" in answers[1] and b'"status":"ok"' in answers[2]


# -- the connection cap ------------------------------------------------------------------


def test_at_the_cap_a_new_connection_closes_the_one_waiting_longest() -> None:
    with served(max_connections=10, request_read_timeout_s=60.0) as live:
        slow = []
        for i in range(10):
            slow.append(connect(live, HALF_HEADERS))
            live.wait_open(i + 1)  # accepted in this order
        with httpx.Client(base_url=live.base_url, timeout=WAIT_S) as client:
            answers = [client.post("/v1/chat/completions", json=body(f"fine {i}")) for i in range(5)]
            evicted = read_until_closed(slow[:1])
            metrics = client.get("/metrics").text
        assert [a.status_code for a in answers] == [200] * 5
        assert slow[0] in evicted and status_of(evicted[slow[0]]) == 408
        assert all(still_open(s) for s in slow[1:])  # the client's one kept-alive connection took one place
        assert metric(metrics, "oss_connections_evicted_total") == 1


def test_at_the_cap_with_every_connection_serving_a_request_a_new_one_gets_503() -> None:
    backend = FakeBackend(silent=True)  # requests stay in flight: their connections are serving, not waiting
    with served(backend, max_connections=3, header_grace_s=0.05, first_chunk_timeout_s=30.0) as live:
        with ExitStack() as held:
            for _ in range(3):
                client = held.enter_context(httpx.Client(base_url=live.base_url, timeout=WAIT_S))
                opened = held.enter_context(client.stream("POST", "/v1/chat/completions", json=body("held", stream=True)))
                assert opened.status_code == 200
            refused = connect(live)
            closed = read_until_closed([refused])
    assert refused in closed
    head, _, payload = closed[refused].partition(b"\r\n\r\n")
    assert status_of(head) == 503 and b"retry-after: 1" in head.lower()
    assert json.loads(payload)["error"]["code"] == "server_overloaded"
    assert len(backend.submitted) == 3
