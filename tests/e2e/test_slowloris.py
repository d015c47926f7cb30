"""Slowloris against the real ``dora run dataflow-stream.yml``: half-open requests neither pile up nor block anyone.

Clients that send half their headers and then nothing get 408 and are closed after the read
deadline (``--request-read-timeout-s``, short here); past ``--max-connections`` the ones waiting
longest are closed at once. Meanwhile a plain request and a stream through the echo node succeed.
Every wait is bounded by a generous multiple of the deadline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.dataflow import ROOT, Dataflow
from tests.live import metric
from tests.raw_sockets import HALF_HEADERS, connect, read_until_closed, status_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

READ_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 80
WAIT_S = 10 * READ_TIMEOUT_S


@pytest.fixture(scope="module")
def limited_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    env = {
        "openai-stream-server": {
            "OPENAI_STREAM_SERVER_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
            "OPENAI_STREAM_SERVER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        }
    }
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("slowloris-flow"), env=env) as flow:
        yield flow


def ask(client: httpx.Client, text: str) -> tuple[str, str]:
    """A plain answer and a streamed one, through the echo node."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    plain = client.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200, plain.text
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    streamed = "".join(json.loads(line)["choices"][0]["delta"].get("content") or "" for line in lines[:-1])
    return plain.json()["choices"][0]["message"]["content"], streamed


def test_half_sent_headers_get_408_while_a_plain_request_and_a_stream_are_served(limited_flow: Dataflow) -> None:
    slow = [connect(limited_flow.port, HALF_HEADERS) for _ in range(50)]
    with httpx.Client(base_url=limited_flow.base_url, timeout=WAIT_S) as client:
        assert ask(client, "served meanwhile") == ("served meanwhile", "served meanwhile")
        closed = read_until_closed(slow, WAIT_S)
        metrics = client.get("/metrics").text
    assert len(closed) == 50, f"{50 - len(closed)} of 50 half-open connections still open after {WAIT_S} s"
    assert {status_of(response) for response in closed.values()} == {408}
    assert metric(metrics, "oss_request_read_timeouts_total") >= 50


def test_past_the_cap_the_longest_waiting_are_closed_and_the_server_still_answers(limited_flow: Dataflow) -> None:
    slow = [connect(limited_flow.port, HALF_HEADERS) for _ in range(2 * MAX_CONNECTIONS)]
    with httpx.Client(base_url=limited_flow.base_url, timeout=WAIT_S) as client:
        assert ask(client, "still answering") == ("still answering", "still answering")
        closed = read_until_closed(slow, WAIT_S)
        metrics = client.get("/metrics").text
    assert len(closed) == len(slow)
    assert metric(metrics, "oss_connections_evicted_total") >= MAX_CONNECTIONS
