"""Memory bounds against the real ``dora run`` dataflow, with ``tests/nodes/hog.py`` as the model node.

A node flooding empty chunks, or sending ``seq`` far ahead, ends its own request with an error event
(the per-request byte limit counts a per-chunk overhead and held chunks) and the server goes on
serving. With a small ``max_total_bytes``, requests beyond it get 503 with ``Retry-After`` once the
retained completions are gone, and new requests succeed again once the big ones are over.
Timeouts that would otherwise end these requests are set far beyond each test's own bound, so only
the byte limits can end them; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openai_stream_server.state import LOGGED_CHUNK_OVERHEAD_BYTES
from tests.dataflow import ROOT, SERVER_NODE, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TEST_NODE_YML = ROOT / "tests" / "e2e" / "dataflows" / "test-node.yml"
BOUND_S = 30.0  # each request of these tests ends (or is read) within this, else the test fails
FAR_S = "600"  # idle and gap timeouts: far beyond BOUND_S


def hog_flow(workdir: Path, server_env: dict[str, str]) -> Dataflow:
    def use_hog(spec: dict[str, Any]) -> dict[str, Any]:
        for entry in spec["nodes"]:
            if entry["id"] == "model":
                entry["path"] = str(ROOT / "tests" / "nodes" / "hog.py")
        return spec

    env = {
        SERVER_NODE: {"OPENAI_STREAM_SERVER_IDLE_TIMEOUT_S": FAR_S, "OPENAI_STREAM_SERVER_GAP_TIMEOUT_S": FAR_S, **server_env},
        "model": {"CANCEL_LOG": str(workdir / "cancels.txt")},
    }
    return Dataflow(TEST_NODE_YML, workdir, env=env, transform=use_hog)


def cancels(flow: Dataflow) -> list[str]:
    path = flow.workdir / "cancels.txt"
    return path.read_text().split() if path.exists() else []


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = BOUND_S) -> bool:
    """Poll ``check`` until it holds (bounded in count and so in time)."""
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


def body(text: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}


async def read_stream(response: httpx.Response) -> list[str]:
    """Every ``data:`` payload to the end of the stream."""
    return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def echo_works(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body("still serving", stream=False))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "still serving"


# -- one request that grows -----------------------------------------------------------

LIMIT = 65_536  # max_completion_bytes here: 1,024 empty chunks at 64 bytes each


@pytest.fixture(scope="module")
def capped_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    workdir = tmp_path_factory.mktemp("hog-capped")
    with hog_flow(workdir, {"OPENAI_STREAM_SERVER_MAX_COMPLETION_BYTES": str(LIMIT)}) as flow:
        yield flow


async def test_a_flood_of_empty_chunks_ends_that_request_and_the_server_serves_on(capped_flow: Dataflow) -> None:
    flow = capped_flow
    async with httpx.AsyncClient(base_url=flow.base_url, timeout=BOUND_S) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body("flood")) as r:
            assert r.status_code == 200
            request_id = r.headers["x-request-id"]
            events = await asyncio.wait_for(read_stream(r), BOUND_S)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "completion_too_large" and f"exceeded {LIMIT} bytes" in error["message"]
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["active_streams"] == 0
        # What is left of it is retained: within its limit, plus the one chunk that crossed it.
        assert health.json()["held_bytes"] <= LIMIT + LOGGED_CHUNK_OVERHEAD_BYTES
        await echo_works(client)

    async def told_to_stop() -> bool:
        return request_id in cancels(flow)

    assert await eventually(told_to_stop), flow.log()


def test_seq_far_ahead_ends_that_request_with_an_error_event(capped_flow: Dataflow) -> None:
    """seq 1..2000 without seq 0 (2 MB to hold, fewer chunks than max_buffered_chunks): the byte limit ends it."""
    flow = capped_flow
    client = openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=BOUND_S)
    with pytest.raises(openai.APIError) as failure:
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ahead 2000 1000"}], stream=True)
        for _ in stream:
            pass
    assert isinstance(failure.value.body, dict) and failure.value.body.get("code") == "completion_too_large", failure.value
    health = httpx.get(flow.base_url + "/health", timeout=BOUND_S).json()
    assert health["status"] == "ok" and health["active_streams"] == 0 and health["held_bytes"] <= 2 * LIMIT
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "after that"}])
    assert reply.choices[0].message.content == "after that"


# -- many requests against the total bound -----------------------------------------------

TOTAL = 262_144  # max_total_bytes: new requests are refused from three quarters of it (196,608)
HOLD = "hold 20 2000"  # 20 chunks of 2,000 bytes (2,064 held each): 41,280 bytes per request
HOLD_TEXT = 20 * 2000
BIG = "big 20 1000"  # the same shape, finished: 21,280 bytes retained


async def read_until(lines: AsyncIterator[str], chars: int) -> None:
    """Read a stream until ``chars`` characters of content have arrived (events are coalesced).

    The caller keeps ``lines``: an ``aiter_lines()`` dropped half-read is finalised, and that closes the connection.
    """
    got = 0
    async for line in lines:
        if line.startswith("data: {"):
            payload = json.loads(line[6:])
            assert "error" not in payload, payload
            choices = payload.get("choices") or [{}]
            got += len(choices[0].get("delta", {}).get("content") or "")
            if got >= chars:
                return


async def test_at_the_total_bound_retained_go_first_then_503_then_service_resumes(tmp_path: Path) -> None:
    with hog_flow(tmp_path, {"OPENAI_STREAM_SERVER_MAX_TOTAL_BYTES": str(TOTAL)}) as flow:
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=BOUND_S) as client:
            retained = []
            for _ in range(2):
                r = await client.post("/v1/chat/completions", json=body(BIG, stream=False))
                assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["content"]) == 20_000
                retained.append(r.headers["x-request-id"])

            async def found(request_id: str) -> bool:
                return (await client.get(f"/v1/chat/completions/{request_id}")).status_code == 200

            assert [await found(i) for i in retained] == [True, True]

            holding: list[tuple[Any, AsyncIterator[str]]] = []  # open streams (and their readers), closed at the end
            refused: httpx.Response | None = None
            retained_when_refused: list[bool] = []
            try:
                for _ in range(12):  # bounded: 7 requests of 41 kB pass 196 kB
                    context = client.stream("POST", "/v1/chat/completions", json=body(HOLD))
                    r = await asyncio.wait_for(context.__aenter__(), BOUND_S)
                    if r.status_code == 503:
                        refused = r
                        await r.aread()
                        retained_when_refused = [await found(i) for i in retained]
                        await context.__aexit__(None, None, None)
                        break
                    assert r.status_code == 200, await r.aread()
                    lines = r.aiter_lines()
                    holding.append((context, lines))
                    await asyncio.wait_for(read_until(lines, HOLD_TEXT), BOUND_S)  # held now: the next one sees it
                assert refused is not None, "never refused"
                assert refused.headers.get("retry-after") == "1"
                assert json.loads(refused.content)["error"]["code"] == "server_overloaded"
                assert retained_when_refused == [False, False]  # the retained ones were evicted first
                health = (await client.get("/health")).json()
                assert health["active_streams"] == len(holding) >= 4  # none of those in flight was failed
                assert health["held_bytes"] <= TOTAL
            finally:
                for context, _ in holding:  # the clients leave: the server cancels them
                    await context.__aexit__(None, None, None)

            async def all_ended() -> bool:
                return (await client.get("/health")).json()["active_streams"] == 0

            assert await eventually(all_ended)
            for _ in range(3):  # what they left retained gives way to new requests
                await echo_works(client)
            metrics = (await client.get("/metrics")).text
        assert "oss_held_bytes" in metrics
