"""``--store redis://``: two server processes against one Redis serve each other's completions (docs/store.md).

Two dataflows (A and B), each a server node and an echo node, both with ``--store`` naming one
``redis-server`` the module starts on a free port (``tests/redis_server.py``). The echo paces its
tokens (0.05 s) and logs every cancel it acts on, so a completion started on A is still streaming
when B reads, reattaches to or cancels it. The last test kills Redis during the run and starts it
again on the same port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from openai_stream_protocol import split_tokens
from openai_stream_protocol.testing import wait_until
from tests.dataflow import ROOT, SERVER_NODE, Dataflow
from tests.e2e.test_resume import read_events
from tests.redis_server import RedisServer, running_redis

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

LONG = " ".join(f"word{i}" for i in range(120)) + " the end."  # 6 s of echo
TOKENS = split_tokens(LONG)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def redis_flow(workdir: Path, server: RedisServer) -> Dataflow:
    env = {
        SERVER_NODE: {"OPENAI_STREAM_SERVER_STORE": server.url},
        "echo-stream": {"ECHO_TOKEN_DELAY_S": "0.05", "ECHO_LOG_LEVEL": "DEBUG"},
    }
    return Dataflow(ROOT / "dataflow-stream.yml", workdir, env=env)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[tuple[Dataflow, Dataflow]]:
    with redis_flow(tmp_path_factory.mktemp("a"), redis_server) as a, redis_flow(tmp_path_factory.mktemp("b"), redis_server) as b:
        yield a, b


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def background(flow: Dataflow, prompt: str = LONG) -> str:
    r = httpx.post(
        f"{flow.base_url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": prompt}], "background": True},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def content(flow: Dataflow, request_id: str) -> str:
    r = httpx.get(f"{flow.base_url}/v1/chat/completions/{request_id}", timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"] or "")


async def test_a_stream_cut_on_a_resumes_on_b_exactly(pair: tuple[Dataflow, Dataflow]) -> None:
    a, b = pair
    request_id = background(a)
    async with httpx.AsyncClient(timeout=30) as client:
        first = await read_events(client, f"{a.base_url}/v1/chat/completions/{request_id}/stream", stop_after_content=10)
        assert first.last_id is not None and not any(e.done for e in first.events)
        rest = await read_events(
            client, f"{b.base_url}/v1/chat/completions/{request_id}/stream", headers={"Last-Event-ID": first.last_id}
        )
    assert first.text + rest.text == LONG
    assert rest.events[-1].done
    seqs = [e.seq for e in first.events + rest.events if e.seq is not None]
    assert seqs == sorted(set(seqs))  # nothing twice


def test_starting_after_on_b_for_a_response_made_on_a(pair: tuple[Dataflow, Dataflow]) -> None:
    a, b = pair
    created = sdk(a).responses.create(model="m", input=LONG, background=True)
    wait_until(lambda: sdk(a).responses.retrieve(created.id).output_text, 20, what="text on A")
    events = list(sdk(b).responses.retrieve(created.id, stream=True, starting_after=3))
    assert events[0].sequence_number == 4
    assert [e.sequence_number for e in events] == list(range(4, 4 + len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == LONG  # type: ignore[union-attr]


def test_cancel_sent_to_b_stops_the_generation_on_a(pair: tuple[Dataflow, Dataflow]) -> None:
    a, b = pair
    request_id = background(a)
    wait_until(lambda: content(a, request_id), 20, what="text on A")
    r = httpx.post(f"{b.base_url}/v1/chat/completions/{request_id}/cancel", timeout=10)
    assert r.status_code == 200, r.text
    line = f"request {request_id} cancelled"
    wait_until(lambda: line in a.log_path.read_text(errors="replace"), 10, what="A's echo to log the cancel")
    wait_until(
        lambda: httpx.get(f"{a.base_url}/v1/chat/completions/{request_id}", timeout=10).json()["status"] == "cancelled",
        10,
        what="the completion on A to read cancelled",
    )
    assert line not in b.log_path.read_text(errors="replace")  # it went to A's replica, not B's


def test_previous_response_id_made_on_a_continues_on_b(pair: tuple[Dataflow, Dataflow]) -> None:
    a, b = pair
    first = sdk(a).responses.create(model="m", input="remember the word kiwi", instructions="be brief")
    assert first.status == "completed"
    follow_up = sdk(b).responses.create(model="m", input="which word?", previous_response_id=first.id)
    assert follow_up.status == "completed" and follow_up.output_text == "which word?"
    listed = sdk(b).responses.input_items.list(first.id)
    assert [item.content[0].text for item in listed.data] == ["remember the word kiwi"]  # type: ignore[union-attr]


def test_delete_on_b_is_404_on_a(pair: tuple[Dataflow, Dataflow]) -> None:
    a, b = pair
    created = sdk(a).responses.create(model="m", input="short lived")
    wait_until(lambda: sdk(b).responses.retrieve(created.id).output_text == "short lived", 10, what="B to read it")
    r = httpx.delete(f"{b.base_url}/v1/responses/{created.id}", timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] is True
    wait_until(
        lambda: httpx.get(f"{a.base_url}/v1/responses/{created.id}", timeout=10).status_code == 404,
        10,
        what="A to forget the deleted response",
    )
    assert httpx.get(f"{b.base_url}/v1/responses/{created.id}", timeout=10).status_code == 404


def test_redis_lost_then_back(pair: tuple[Dataflow, Dataflow], redis_server: RedisServer) -> None:
    a, b = pair
    before = sdk(a).chat.completions.create(model="m", messages=[{"role": "user", "content": "before"}])
    # from Redis (B never saw it), once A's final record is there: a moment after A answered
    wait_until(lambda: content(b, before.id) == "before", 10, what="B to read A's completion")
    redis_server.kill()
    try:
        health = wait_until(
            lambda: (h := httpx.get(f"{a.base_url}/health", timeout=10).json())["status"] == "degraded" and h,
            15,
            what="A's /health to say degraded",
        )
        assert f"127.0.0.1:{redis_server.port}" in str(health)
        during = sdk(a).chat.completions.create(model="m", messages=[{"role": "user", "content": "during"}])
        assert during.choices[0].message.content == "during"  # served from A's memory
        assert content(a, during.id) == "during"
        r = httpx.get(f"{b.base_url}/v1/chat/completions/{before.id}", timeout=10)  # only Redis had it for B
        assert r.status_code == 503 and "store" in r.json()["error"]["message"]
        r = httpx.get(f"{b.base_url}/v1/chat/completions/{before.id}/stream", timeout=10)
        assert r.status_code == 503
    finally:
        redis_server.start()  # the same port, empty
    wait_until(lambda: httpx.get(f"{a.base_url}/health", timeout=10).json()["status"] == "ok", 15, what="A healthy again")
    wait_until(lambda: httpx.get(f"{b.base_url}/health", timeout=10).json()["status"] == "ok", 15, what="B healthy again")
    # what A served while Redis was gone was written once it came back
    wait_until(
        lambda: httpx.get(f"{b.base_url}/v1/chat/completions/{during.id}", timeout=10).status_code == 200,
        15,
        what="the record written during the outage to reach Redis",
    )
    assert content(b, during.id) == "during"
