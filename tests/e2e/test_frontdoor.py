"""Two server processes, three echo replicas and Redis, from the generator's YAML under ``dora run``.

docs/architecture.md, "Several server processes": both servers listen on one port (``SO_REUSEPORT``),
every replica answers each server on an output of its own, completions are shared through the
Redis store (``tests/redis_server.py`` starts one on a free port). A connection reaches one server
process and keeps it while it is kept alive: ``pinned`` opens connections until one reaches the
server asked for, and the cross-server tests run their two halves on two such connections. The last
test SIGKILLs one server process while streams run on both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest

from benchmarks.scenarios import burst, stream_ids
from openai_stream_protocol import split_tokens
from openai_stream_protocol.testing import wait_until, wait_until_async
from tests.frontdoor import FrontDoorFlow
from tests.live import metric
from tests.redis_server import RedisServer, running_redis
from tests.sse_events import Event

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SERVERS = ["openai-stream-server-1", "openai-stream-server-2"]
REPLICAS = ["echo-stream-1", "echo-stream-2", "echo-stream-3"]
LONG = " ".join(f"word{i}" for i in range(120)) + " the end."  # 6 s of echo at 0.05 s a token
TOKENS = split_tokens(LONG)
READ_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[FrontDoorFlow]:
    node_env = {"ECHO_TOKEN_DELAY_S": "0.05", "ECHO_LOG_LEVEL": "DEBUG"}
    with FrontDoorFlow(tmp_path_factory.mktemp("frontdoor"), redis_server.url, node_env=node_env) as flow:
        yield flow


@asynccontextmanager
async def pinned(flow: FrontDoorFlow, server: str, attempts: int = 100) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose one kept-alive connection reached ``server`` (new connections until one does)."""
    for _ in range(attempts):
        client = httpx.AsyncClient(
            base_url=flow.base_url, timeout=READ_TIMEOUT_S, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        try:
            try:
                reached = (await client.get("/health")).json()["server"]["name"]
            except httpx.TransportError:
                continue  # a server process going away takes its queued connections with it
            if reached == server:
                yield client
                return
        finally:
            await client.aclose()
    raise AssertionError(f"no connection reached {server} in {attempts} tries")


async def same_server(client: httpx.AsyncClient) -> str:
    """The server the pinned client's connection reaches now (checked after each half of a test)."""
    return str((await client.get("/health")).json()["server"]["name"])


async def read_sse(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    stop_after_content: int = 0,
    events: list[Event] | None = None,
    **kwargs: Any,
) -> tuple[list[Event], str | None]:
    """SSE events until ``[DONE]``, ``stop_after_content`` content events, or the connection breaks (then the error).

    ``events``: a list to append them to as they come (another task may watch it).
    """
    events = [] if events is None else events
    data: list[str] = []
    event_id: str | None = None

    async def consume() -> None:
        nonlocal data, event_id
        async with client.stream(method, url, **kwargs) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line == "" and data:
                    event = Event("\n".join(data), event_id)
                    events.append(event)
                    data, event_id = [], None
                    if event.done or (stop_after_content and sum(1 for e in events if e.content) >= stop_after_content):
                        return
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line.startswith("id: "):
                    event_id = line[4:]

    try:
        await asyncio.wait_for(consume(), READ_TIMEOUT_S)
    except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
        return events, f"{type(exc).__name__}: {exc}"
    return events, None


def text_of(events: list[Event]) -> str:
    return "".join(e.content for e in events)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


# -- spread ------------------------------------------------------------------------------


def completions(metrics: str) -> float:
    return metric(metrics, "oss_completions_total", default=0.0)


def served(metrics: str, replica: str) -> float:
    return metric(metrics, f'oss_replica_served_total{{replica="{replica}"}}', default=0.0)


def test_300_streams_are_exact_and_spread_over_both_servers_and_every_replica(flow: FrontDoorFlow) -> None:
    before = flow.scrape_each()
    # One connection per stream (the harness's lean client): the kernel spreads connections, not requests.
    result = asyncio.run(burst(flow.port, 300, 12, 1, stream_ids(), timeout_s=120))
    integrity = result["integrity"]
    assert integrity["exact"] and integrity["streams"] == 300, integrity
    after = flow.scrape_each()
    by_server = {s: completions(after[s]) - completions(before[s]) for s in SERVERS}
    assert sum(by_server.values()) == 300
    assert all(n >= 75 for n in by_server.values()), by_server  # each server at least a quarter
    by_replica = {r: sum(served(after[s], r) - served(before[s], r) for s in SERVERS) for r in REPLICAS}
    assert sum(by_replica.values()) == 300 and all(n > 0 for n in by_replica.values()), by_replica
    for s in SERVERS:  # each server used every replica
        assert all(served(after[s], r) > served(before[s], r) for r in REPLICAS), (s, by_replica)


# -- across servers ------------------------------------------------------------------------


async def test_a_stream_cut_on_one_server_resumes_on_the_other_exactly(flow: FrontDoorFlow) -> None:
    async with pinned(flow, SERVERS[0]) as a, pinned(flow, SERVERS[1]) as b:
        r = await a.post("/v1/chat/completions", json=chat(LONG, background=True))
        assert r.status_code == 202, r.text
        request_id = r.json()["id"]
        assert await same_server(a) == SERVERS[0]  # dropping the stream below closes its connection: checked before
        first, _ = await read_sse(a, "GET", f"/v1/chat/completions/{request_id}/stream", stop_after_content=10)
        last = [e.id for e in first if e.id is not None][-1]
        assert await same_server(b) == SERVERS[1]  # leaving a stream at [DONE] closes its connection: checked before
        rest, error = await read_sse(b, "GET", f"/v1/chat/completions/{request_id}/stream", headers={"Last-Event-ID": last})
    assert error is None and rest[-1].done
    assert text_of(first) + text_of(rest) == LONG
    seqs = [e.seq for e in first + rest if e.seq is not None]
    assert seqs == sorted(set(seqs))


async def test_a_cancel_sent_to_one_server_stops_the_generation_of_the_other(flow: FrontDoorFlow) -> None:
    async with pinned(flow, SERVERS[0]) as a, pinned(flow, SERVERS[1]) as b:
        r = await a.post("/v1/chat/completions", json=chat(LONG, background=True))
        request_id = r.json()["id"]
        await asyncio.sleep(0.5)
        cancelled = await b.post(f"/v1/chat/completions/{request_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        line = f"request {request_id} cancelled"  # echo-stream's debug line: the replica stopped generating
        await wait_until_async(lambda: line in flow.log_path.read_text(errors="replace"), 10, what="the replica's cancel")
        status = (await b.get(f"/v1/chat/completions/{request_id}")).json()["status"]
        assert (await same_server(a), await same_server(b)) == (SERVERS[0], SERVERS[1])
    assert status == "cancelled"


async def test_a_previous_response_id_made_on_one_server_continues_on_the_other(flow: FrontDoorFlow) -> None:
    async with pinned(flow, SERVERS[1]) as a, pinned(flow, SERVERS[0]) as b:
        first = openai.AsyncOpenAI(base_url=flow.base_url + "/v1", api_key="unused", http_client=a, max_retries=0)
        second = openai.AsyncOpenAI(base_url=flow.base_url + "/v1", api_key="unused", http_client=b, max_retries=0)
        made = await first.responses.create(model="m", input="remember the word kiwi", instructions="be brief")
        assert made.status == "completed"
        follow_up = await second.responses.create(model="m", input="which word?", previous_response_id=made.id)
        listed = await second.responses.input_items.list(made.id)
        assert (await same_server(a), await same_server(b)) == (SERVERS[1], SERVERS[0])
    assert follow_up.status == "completed" and follow_up.output_text == "which word?"
    assert [item.content[0].text for item in listed.data] == ["remember the word kiwi"]  # type: ignore[union-attr]


# -- one server process killed -------------------------------------------------------------


class Stream:
    """One POST stream on a connection pinned to a server, and what became of it."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.events: list[Event] = []
        self.cut: str | None = None
        """How the POST stream broke (None: it ended with [DONE])."""
        self.reattached: list[Event] = []
        self.reattach_error: str | None = None

    @property
    def request_id(self) -> str:
        return str(self.events[0].json()["id"])


async def run_stream(flow: FrontDoorFlow, stream: Stream) -> None:
    async with pinned(flow, stream.server) as client:
        body = chat(LONG, stream=True)
        _, stream.cut = await read_sse(client, "POST", "/v1/chat/completions", events=stream.events, json=body)


async def reattach(flow: FrontDoorFlow, stream: Stream) -> None:
    async with httpx.AsyncClient(base_url=flow.base_url, timeout=READ_TIMEOUT_S) as client:
        url = f"/v1/chat/completions/{stream.request_id}/stream"
        stream.reattached, stream.reattach_error = await read_sse(client, "GET", url)


def test_a_killed_server_process_leaves_the_other_untouched_and_its_clients_reattach(flow: FrontDoorFlow) -> None:
    victim, survivor = SERVERS
    pid = flow.node_pid(victim)
    assert pid is not None
    streams = [Stream(server) for server in SERVERS for _ in range(10)]

    async def scenario() -> None:
        tasks = [asyncio.ensure_future(run_stream(flow, s)) for s in streams]
        await wait_until_async(lambda: all(len(text_of(s.events)) > 20 for s in streams), 30, what="every stream to run")
        await asyncio.sleep(1.0)  # every stream is some way into its 6 s answer
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(*tasks)
        # The victim's clients reconnect (the kernel sends them to a live process) and reattach from the start.
        await asyncio.gather(*(reattach(flow, s) for s in streams if s.server == victim))
        print(f"the reattached streams ended {time.monotonic() - killed_at:.1f} s after the kill")

    asyncio.run(scenario())
    for s in streams:
        if s.server == survivor:  # untouched: whole, exact, one finish, [DONE]
            assert s.cut is None and s.events[-1].done and text_of(s.events) == LONG, (s.request_id, s.cut)
            continue
        assert s.cut is not None and 0 < len(text_of(s.events)) < len(LONG)  # cut off mid-answer
        # What the victim had logged to the store, then an error event and [DONE].
        assert s.reattach_error is None and s.reattached[-1].done, s.reattach_error
        logged = text_of(s.reattached)
        assert logged and LONG.startswith(logged) and len(logged) < len(LONG), [e.data[:200] for e in s.reattached]
        error = s.reattached[-2].json()["error"]
        assert error["code"] == "server_restarted", error
        print(f"{s.request_id}: {len(text_of(s.events))} characters received before the kill, {len(logged)} logged")
    # The generations bound to the dead process were cancelled downstream (echo-stream logs what it stopped).
    victims = {s.request_id for s in streams if s.server == victim}
    log = flow.log_path.read_text(errors="replace").splitlines()
    stopped = " ".join(line for line in log if f"server {victim} is gone" in line)
    assert victims <= set(stopped.split()), stopped
    # dora's restart policy brings it back on the same port, as a new process.
    wait_until(lambda: flow.node_pid(victim) not in (None, pid), 30, what="the killed server to be restarted")
    wait_until(lambda: victim in flow.answering(), 30, what="the restarted server to answer on the port")
    response = httpx.post(flow.base_url + "/v1/chat/completions", json=chat("after the restart"), timeout=30)
    assert response.json()["choices"][0]["message"]["content"] == "after the restart"
