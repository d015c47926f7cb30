"""Debian's nginx, configured by ``docs/nginx.conf``, in front of two server processes (docs/deploy.md, "Several server
processes").

The two servers are the generator's, each on its own port (``--separate-ports``), as they would be on two hosts, and
share a Redis store; nginx (``tests/nginx_server.py``) balances them with no affinity. Streams must come through
whole and unbuffered, both servers must serve, and a stream started through nginx must resume through nginx whichever
server each request reaches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from openai_stream_protocol import split_tokens
from openai_stream_protocol.testing import wait_until_async
from tests.frontdoor import FrontDoorFlow
from tests.live import metric
from tests.nginx_server import NginxServer
from tests.redis_server import running_redis
from tests.sse_events import Event

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ANSWER = " ".join(f"w{i}" for i in range(40)) + " end."  # 2 s of echo at 0.05 s a token
TOKENS = split_tokens(ANSWER)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FrontDoorFlow, NginxServer]]:
    work = tmp_path_factory.mktemp("nginx-frontdoor")
    with running_redis(work / "redis") as redis:
        node_env = {"ECHO_TOKEN_DELAY_S": "0.05"}
        with FrontDoorFlow(work / "flow", redis.url, node_env=node_env, separate_ports=True) as flow:
            upstreams = [flow.first_port + i for i in range(len(flow.servers))]  # type: ignore[operator]
            with NginxServer(work / "nginx", upstreams) as nginx:
                yield flow, nginx


class Timed:
    """One stream read through nginx: its events and when each arrived."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.arrivals: list[float] = []
        self.sent_at = 0.0


async def stream_through(client: httpx.AsyncClient, url: str) -> Timed:
    timed = Timed()
    body = {"model": "m", "messages": [{"role": "user", "content": ANSWER}], "stream": True}
    timed.sent_at = time.monotonic()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                timed.events.append(Event(line[6:]))
                timed.arrivals.append(time.monotonic())
    return timed


def text_of(events: list[Event]) -> str:
    return "".join(e.content for e in events)


def completions_by_server(flow: FrontDoorFlow) -> dict[str, float]:
    return {name: metric(text, "oss_completions_total", default=0.0) for name, text in flow.scrape_each().items()}


def test_streams_through_nginx_are_whole_unbuffered_and_reach_both_servers(
    balanced: tuple[FrontDoorFlow, NginxServer],
) -> None:
    flow, nginx = balanced
    before = completions_by_server(flow)

    async def scenario() -> list[Timed]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(stream_through(client, nginx.url) for _ in range(40))))

    streams = asyncio.run(scenario())
    for timed in streams:
        assert text_of(timed.events) == ANSWER and timed.events[-1].done
        # Unbuffered: the events came as the echo paced them, not in a lump at the end: the first content event
        # in the first half of the stream's time, and the rest at many different moments.
        first = next(at for at, e in zip(timed.arrivals, timed.events, strict=True) if e.content)
        assert first - timed.sent_at < 0.5 * (timed.arrivals[-1] - timed.sent_at), nginx.log()
        assert len({round(at, 2) for at in timed.arrivals}) > len(TOKENS) // 4
    after = completions_by_server(flow)
    served = {name: after[name] - before.get(name, 0.0) for name in after}
    assert sum(served.values()) == 40 and all(n >= 10 for n in served.values()), served  # no affinity: both serve


async def test_a_stream_resumes_through_nginx_whichever_server_each_request_reaches(
    balanced: tuple[FrontDoorFlow, NginxServer],
) -> None:
    flow, nginx = balanced
    body = {"model": "m", "messages": [{"role": "user", "content": ANSWER}], "background": True}
    async with httpx.AsyncClient(base_url=nginx.url, timeout=60) as client:
        created = await client.post("/v1/chat/completions", json=body)
        assert created.status_code == 202, created.text
        request_id, url = created.json()["id"], created.json()["stream_url"]
        cut: list[Event] = []
        async with client.stream("GET", url) as r:  # drop the connection after a few events
            assert r.status_code == 200, (r.status_code, await r.aread(), nginx.upstreams_of(request_id))
            event_id = None
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    cut.append(Event(line[6:], event_id))
                    if sum(1 for e in cut if e.content) >= 5:
                        break
        assert any(e.id for e in cut), [(e.id, e.data[:80]) for e in cut]
        last = [e.id for e in cut if e.id is not None][-1]
        rest: list[Event] = []
        async with client.stream("GET", url, headers={"Last-Event-ID": last}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    rest.append(Event(line[6:]))

        async def final_record() -> dict[str, Any]:  # the owner's final record follows its last event within a flush
            body: dict[str, Any] = (await client.get(f"/v1/chat/completions/{request_id}")).json()
            return body if body["status"] != "in_progress" else {}

        final = await wait_until_async(final_record, 10, what="the completion to read completed on both servers")
    assert text_of(cut) + text_of(rest) == ANSWER and rest[-1].done
    assert final["status"] == "completed" and final["choices"][0]["message"]["content"] == ANSWER
    # nginx sent this completion's requests to both servers (round robin, no affinity).
    assert nginx.upstreams_of(request_id) == {f"127.0.0.1:{p}" for p in (flow.first_port, flow.first_port + 1)}  # type: ignore[operator]
