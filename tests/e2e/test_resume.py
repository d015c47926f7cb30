"""Background mode and reattach against the real ``dora run dataflow-stream.yml``, with raw httpx streaming.

The echo node paces its tokens (``ECHO_TOKEN_DELAY_S``, 0.02 s by default), so
a stream read here is live: the cuts below drop a real connection mid-answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from openai_stream_protocol import split_tokens
from openai_stream_protocol.testing import wait_until_async
from tests.dataflow import Dataflow
from tests.sse_events import Event, Parsed, parse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROMPT = " ".join(f"word{i}" for i in range(60)) + ",\n  and  the end. "
TOKENS = split_tokens(PROMPT)
# For the cuts: 200 tokens at the echo's 0.02 s is 4 s of answer, so even the last cut (40 events,
# under a second in) leaves most of it still to come and the first connection cannot see the end.
CUT_PROMPT = " ".join(f"part{i}" for i in range(200)) + " the end."
CUT_TOKENS = split_tokens(CUT_PROMPT)
READ_TIMEOUT_S = 30.0


def stream_url(flow: Dataflow, request_id: str) -> str:
    return f"{flow.base_url}/v1/chat/completions/{request_id}/stream"


async def start_background(client: httpx.AsyncClient, flow: Dataflow, prompt: str = PROMPT) -> dict[str, Any]:
    r = await client.post(
        flow.base_url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": prompt}], "background": True},
    )
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


async def read_events(
    client: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None, stop_after_content: int = 0
) -> Parsed:
    """Read SSE events live; with ``stop_after_content`` drop the connection after that many content events."""
    events: list[Event] = []
    data: list[str] = []
    event_id: str | None = None
    seen_content = 0

    async def consume() -> None:
        nonlocal data, event_id, seen_content
        async with client.stream("GET", url, headers=headers or {}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line == "":
                    if data:
                        event = Event("\n".join(data), event_id)
                        events.append(event)
                        if event.done:
                            return
                        if event.content:
                            seen_content += 1
                            if stop_after_content and seen_content >= stop_after_content:
                                return  # leaving the block closes the connection mid-stream
                    data, event_id = [], None
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line.startswith("id: "):
                    event_id = line[4:]

    await asyncio.wait_for(consume(), READ_TIMEOUT_S)
    return Parsed(events, None)


@pytest.mark.parametrize("cut", [1, 2, 5, 11, 23, 40])
@pytest.mark.parametrize("how", ["last-event-id", "starting_after"])
async def test_drop_a_live_stream_and_resume(echo_flow: Dataflow, cut: int, how: str) -> None:
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:
        body = await start_background(client, echo_flow, CUT_PROMPT)
        url = echo_flow.base_url + body["stream_url"]
        before = await read_events(client, url, stop_after_content=cut)
        # The first connection was really dropped mid-answer: `cut` content events, no finish, no [DONE].
        assert not before.done and sum(1 for e in before.events if e.content) == cut
        assert all(e.json()["choices"][0]["finish_reason"] is None for e in before.events)
        last = before.last_id
        assert last is not None and 0 <= int(last) < len(CUT_TOKENS) - 1
        # The id is the seq of the last chunk the event holds: the text so far is exactly the tokens up to it.
        assert before.text == "".join(CUT_TOKENS[: int(last) + 1]) and len(before.text) < len(CUT_PROMPT)
        status = (await client.get(f"{echo_flow.base_url}/v1/chat/completions/{body['id']}")).json()["status"]
        assert status in ("in_progress", "completed")  # dropping a reattach stream never cancels
        if how == "last-event-id":
            after = await read_events(client, url, headers={"Last-Event-ID": last})
        else:
            after = await read_events(client, f"{url}?starting_after={last}")
        assert after.done and after.text
        ids = [int(e.id) for e in after.events if e.id is not None]
        assert ids and ids[0] > int(last) and ids == sorted(set(ids))  # only what came after the cut, each once
        assert all("role" not in e.json()["choices"][0]["delta"] for e in after.events if not e.done)
        # The rest exactly once: every token is distinct, so a repeat or a gap would change the text.
        assert after.text == "".join(CUT_TOKENS[int(last) + 1 :])
        assert before.text + after.text == CUT_PROMPT
        reasons = [e.json()["choices"][0]["finish_reason"] for e in before.events + after.events if not e.done]
        assert reasons.count("stop") == 1 and reasons[-1] == "stop"


async def test_background_then_reattach_after_it_finished(echo_flow: Dataflow) -> None:
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:
        body = await start_background(client, echo_flow)
        assert body["object"] == "chat.completion" and body["status"] == "in_progress"
        assert body["stream_url"] == f"/v1/chat/completions/{body['id']}/stream"
        by_id = f"{echo_flow.base_url}/v1/chat/completions/{body['id']}"

        async def ended() -> dict[str, Any] | None:
            got: dict[str, Any] = (await client.get(by_id)).json()
            return None if got["status"] == "in_progress" else got

        # the echo takes about 1.3 s for this prompt
        got = await wait_until_async(ended, timeout_s=15, interval_s=0.05, what=f"{body['id']} to end")
        assert got["status"] == "completed" and got["choices"][0]["message"]["content"] == PROMPT
        url = stream_url(echo_flow, body["id"])
        whole = await read_events(client, url)
        assert whole.text == PROMPT and whole.done
        for n in (0, 7, 30, len(TOKENS) - 1, len(TOKENS)):
            rest = await read_events(client, url, headers={"Last-Event-ID": str(n)})
            assert rest.done and rest.text == "".join(TOKENS[n + 1 :])


async def test_three_live_subscribers_and_the_foreground_stream_agree(echo_flow: Dataflow) -> None:
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:

        async def foreground() -> tuple[str, str]:
            r = await client.post(
                echo_flow.base_url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": PROMPT}], "stream": True},
            )
            return r.headers["x-request-id"], parse(r.text).text

        body = await start_background(client, echo_flow)
        url = stream_url(echo_flow, body["id"])
        subscribers = await asyncio.gather(*(read_events(client, url) for _ in range(3)))
        for parsed in subscribers:
            assert parsed.done and parsed.text == PROMPT
            seqs = [e.seq for e in parsed.events if e.id is not None]
            assert seqs == sorted(set(seqs))
        request_id, text = await asyncio.wait_for(foreground(), READ_TIMEOUT_S)
        assert text == PROMPT
        reattached = await read_events(client, stream_url(echo_flow, request_id), headers={"Last-Event-ID": "4"})
        assert reattached.text == "".join(TOKENS[5:])


async def test_cancel_a_background_completion(echo_flow: Dataflow) -> None:
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:
        long_prompt = " ".join(f"t{i}" for i in range(1000))  # 20 s of echo: cancelled long before
        body = await start_background(client, echo_flow, long_prompt)
        url = stream_url(echo_flow, body["id"])
        before = await read_events(client, url, stop_after_content=3)
        r = await client.post(f"{echo_flow.base_url}/v1/chat/completions/{body['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert before.last_id is not None
        rest = await read_events(client, url, headers={"Last-Event-ID": before.last_id})
        assert rest.done and rest.events[-2].json()["error"]["code"] == "cancelled"
        assert len(before.text + rest.text) < len(long_prompt)
        got = (await client.get(f"{echo_flow.base_url}/v1/chat/completions/{body['id']}")).json()
        assert got["status"] == "cancelled"


async def test_unknown_id_is_404_on_the_real_server(echo_flow: Dataflow) -> None:
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:
        r = await client.get(stream_url(echo_flow, "chatcmpl-doesnotexist"), headers={"Last-Event-ID": "2"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
