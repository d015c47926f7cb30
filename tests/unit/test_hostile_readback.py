"""A hostile answer size read back cannot freeze the event loop.

A node (or a client that makes it answer so) can fill one completion with 20,000 tool-call
argument pieces of 400 B. Every read of that completion gathers them on the event loop: a GET
of the retained chat completion, the non-stream /v1/messages answer (whose tool input is the
arguments parsed), and a chat stream re-attached from the start. Joined by repeated
concatenation (quadratic) that took seconds per read, with every other client waiting; read
linearly it costs about what one JSON pass over the same 8 MB costs.

Each test measures the loop's longest stall (a 1 ms ticker on the same loop) while the read
runs, against ``linear_pass_s``: one ``json.loads`` + ``json.dumps`` of the arguments, the least
any read must do. The bound, 50 of those, is far from a linear read (1 or 2 here) and far below a
quadratic one (hundreds here).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import pytest

from openai_stream_protocol import Chunk, ToolCallDelta
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(120)

PIECES = 20_000
PIECE = "x" * 400
STALL_RATIO = 50
"""The loop may stall at most this many linear passes over the arguments while a read runs."""

T = TypeVar("T")


def arguments() -> str:
    """Valid JSON (the Messages surface parses it), PIECES pieces long."""
    return '{"a": "' + PIECE * (PIECES - 2) + '"}'


def argument_chunks(request_id: str) -> list[Chunk]:
    text = arguments()
    pieces = [text[:7], *(PIECE for _ in range(PIECES - 2)), text[-2:]]
    assert "".join(pieces) == text
    chunks = [Chunk(request_id, 0, pieces[0], tool_call=ToolCallDelta(0, "call_big", "lookup"))]
    chunks += [Chunk(request_id, seq, piece, tool_call=ToolCallDelta(0)) for seq, piece in enumerate(pieces[1:], 1)]
    chunks.append(Chunk(request_id, PIECES, "", fin=True, finish_reason="tool_calls"))
    return chunks


def linear_pass_s() -> float:
    text = arguments()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        json.dumps(json.loads(text))
        best = min(best, time.perf_counter() - started)
    return best


async def longest_stall(work: Awaitable[T]) -> tuple[T, float]:
    """``work``'s result, and the longest the loop went without running a 1 ms ticker meanwhile."""
    stalls: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - started)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.01)
    try:
        result = await work
    finally:
        done = True
        await ticker
    return result, max(stalls)


def assert_no_freeze(stall_s: float, what: str) -> None:
    linear = linear_pass_s()
    assert stall_s < STALL_RATIO * linear, (
        f"{what}: the loop stalled {stall_s * 1000:.0f} ms, {stall_s / linear:.0f} linear passes over the arguments"
    )


@asynccontextmanager
async def hostile_app() -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend]]:
    settings = Settings(sweep_interval_s=0.02, max_retained_bytes=256 * 1024 * 1024)
    async with make_client(settings, FakeBackend(silent=True)) as (client, backend):
        client.timeout = httpx.Timeout(60)
        yield client, backend


async def answered_in_background(client: httpx.AsyncClient, backend: FakeBackend) -> str:
    """A chat completion whose answer is the hostile call, ended and retained."""
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}], "background": True})
    assert r.status_code == 202, r.text
    request_id: str = r.json()["id"]
    backend.deliver(argument_chunks(request_id))
    return request_id


async def test_getting_a_retained_completion_with_hostile_tool_calls_does_not_freeze_the_loop() -> None:
    async with hostile_app() as (client, backend):
        request_id = await answered_in_background(client, backend)
        r, stall = await longest_stall(client.get(f"/v1/chat/completions/{request_id}"))
    assert r.status_code == 200
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["id"] == "call_big" and call["function"]["arguments"] == arguments()
    assert_no_freeze(stall, "GET of the retained completion")


async def test_reattaching_to_a_completion_with_hostile_tool_calls_does_not_freeze_the_loop() -> None:
    async with hostile_app() as (client, backend):
        request_id = await answered_in_background(client, backend)
        r, stall = await longest_stall(client.get(f"/v1/chat/completions/{request_id}/stream"))
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    gathered = "".join(
        call["function"].get("arguments") or ""
        for event in events
        for choice in event["choices"]
        for call in choice["delta"].get("tool_calls") or ()
    )
    assert gathered == arguments()
    assert_no_freeze(stall, "re-attached chat stream")


async def test_a_non_stream_message_with_hostile_tool_input_does_not_freeze_the_loop() -> None:
    async with hostile_app() as (client, backend):

        async def answered() -> httpx.Response:
            body: dict[str, Any] = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "go"}]}
            posting = asyncio.ensure_future(client.post("/v1/messages", json=body))
            for _ in range(1000):  # bounded: the request reaches the backend within a few loop turns
                if backend.submitted:
                    break
                await asyncio.sleep(0.001)
            backend.deliver(argument_chunks(backend.submitted[-1].request_id))
            return await posting

        r, stall = await longest_stall(answered())
    assert r.status_code == 200, r.text
    block = r.json()["content"][0]
    assert block["type"] == "tool_use" and block["input"] == json.loads(arguments())
    assert_no_freeze(stall, "non-stream /v1/messages answer")
