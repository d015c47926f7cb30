"""Background mode, reattach (``Last-Event-ID`` / ``starting_after``), fan-out and GET by id (docs/architecture.md, HTTP API)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from openai_stream_protocol import Chunk, split_tokens
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.sse_events import Parsed, parse
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(60)

TEXT = " ".join(f"w{i}," for i in range(40)) + "\n  the end. "
TOKENS = split_tokens(TEXT)
FIN_SEQ = len(TOKENS)  # the fake's finish marker: an empty chunk after the last token
MESSAGES = [{"role": "user", "content": TEXT}]


async def start_background(client: httpx.AsyncClient, content: str = TEXT) -> str:
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "background": True})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def reattach(client: httpx.AsyncClient, request_id: str, *, last_event_id: int | None = None, **params: Any) -> Parsed:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    r = await client.get(f"/v1/chat/completions/{request_id}/stream", headers=headers, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"] == request_id
    return parse(r.text)


async def wait_status(client: httpx.AsyncClient, request_id: str, status: str) -> dict[str, Any]:
    for _ in range(500):
        body: dict[str, Any] = (await client.get(f"/v1/chat/completions/{request_id}")).json()
        if body.get("status") == status:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"{request_id} never reached {status}: {body}")


def check_resumed(parsed: Parsed, after: int) -> None:
    """Exactly the chunks after ``after``, every event numbered, then the finish chunk (if not seen) and [DONE]."""
    assert parsed.done
    assert parsed.text == "".join(TOKENS[after + 1 :])
    numbered = [e for e in parsed.events if not e.done]
    if after < 0:  # from the start: the role chunk first, without an id
        role = numbered.pop(0)
        assert role.id is None and role.json()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e.id is not None and int(e.id) == e.seq and e.seq > after for e in numbered)
    assert [e.seq for e in numbered] == sorted({e.seq for e in numbered})  # strictly increasing
    assert all("role" not in e.json()["choices"][0]["delta"] for e in numbered)
    reasons = [e.json()["choices"][0]["finish_reason"] for e in numbered]
    if after <= FIN_SEQ:
        assert reasons and reasons[-1] == "stop" and reasons.count("stop") == 1
        assert numbered[-1].json()["usage"]["completion_tokens"] == len(TOKENS)
    else:  # the client already saw the finish chunk: only [DONE]
        assert numbered == []


async def test_background_answers_202_at_once_with_the_stream_url() -> None:
    async with make_client(backend=FakeBackend(silent=True)) as (client, backend):
        r = await client.post("/v1/chat/completions", json={"model": "gpt-x", "messages": MESSAGES, "background": True})
        body = r.json()
        assert r.status_code == 202
        request_id = body["id"]
        assert request_id.startswith("chatcmpl-") and r.headers["x-request-id"] == request_id
        assert body["object"] == "chat.completion" and body["status"] == "in_progress" and body["model"] == "gpt-x"
        assert body["stream_url"] == f"/v1/chat/completions/{request_id}/stream"
        assert isinstance(body["created"], int)
        metadata = backend.submitted[0].metadata
        assert metadata["request_id"] == request_id and metadata["stream"] is True
        assert backend.cancelled == []  # nobody watching is not a disconnect


async def test_background_completion_finishes_with_nobody_watching() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, backend):
        request_id = await start_background(client)
        body = await wait_status(client, request_id, "completed")
        assert body["choices"][0]["message"]["content"] == TEXT and body["choices"][0]["finish_reason"] == "stop"
        assert backend.cancelled == []
        check_resumed(await reattach(client, request_id), -1)


async def test_reattach_from_the_start_has_the_role_chunk_and_retry() -> None:
    async with make_client() as (client, _):
        request_id = await start_background(client)
        await wait_status(client, request_id, "completed")
        r = await client.get(f"/v1/chat/completions/{request_id}/stream")
        assert r.text.startswith("retry: 1000\n\n")
        parsed = parse(r.text)
        assert parsed.retry_ms == 1000
        first = parsed.events[0]
        assert first.id is None and first.json()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        check_resumed(parsed, -1)
        assert parse((await client.get(f"/v1/chat/completions/{request_id}/stream?starting_after=-1")).text).events[0] == first


async def test_retry_block_can_be_turned_off() -> None:
    async with make_client(Settings(sweep_interval_s=0.02, sse_retry_ms=0)) as (client, _):
        request_id = await start_background(client)
        await wait_status(client, request_id, "completed")
        r = await client.get(f"/v1/chat/completions/{request_id}/stream")
        assert "retry:" not in r.text and r.text.startswith("data: ")


@pytest.mark.parametrize("how", ["last-event-id", "starting_after"])
async def test_resume_at_every_cut_point_of_a_retained_completion(how: str) -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, _):
        request_id = await start_background(client)
        await wait_status(client, request_id, "completed")
        for after in range(-1, FIN_SEQ + 2):
            if how == "last-event-id":
                parsed = await reattach(client, request_id, last_event_id=after)
            else:
                parsed = await reattach(client, request_id, starting_after=after)
            check_resumed(parsed, after)
            assert "".join(TOKENS[: after + 1]) + parsed.text == TEXT


async def test_resume_from_each_event_actually_read_gives_the_full_answer() -> None:
    """Cut a real event sequence after each event, as a dropped EventSource would, and resume with its id."""
    async with make_client(backend=FakeBackend(delay_s=0.002)) as (client, _):
        request_id = await start_background(client)
        full = await reattach(client, request_id)  # attached while in flight: one event per token or a few
        assert full.text == TEXT
        numbered = [e for e in full.events if e.id is not None]
        assert len(numbered) >= 2
        for i, event in enumerate(full.events):
            if event.id is None:
                continue
            before = "".join(e.content for e in full.events[: i + 1])
            rest = await reattach(client, request_id, last_event_id=int(event.id))
            assert before + rest.text == TEXT
            assert all(int(e.id) > int(event.id) for e in rest.events if e.id is not None)


async def test_resume_while_the_completion_is_still_in_flight() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.003)) as (client, _):
        request_id = await start_background(client)
        cuts = list(range(-1, FIN_SEQ + 1, 3))
        header_reads = [reattach(client, request_id, last_event_id=n) for n in cuts]
        query_reads = [reattach(client, request_id, starting_after=n) for n in cuts]
        results = await asyncio.wait_for(asyncio.gather(*header_reads, *query_reads), 30)
        for after, parsed in zip(cuts + cuts, results, strict=True):
            check_resumed(parsed, after)


async def test_last_event_id_wins_over_starting_after() -> None:
    """An EventSource opened on ``?starting_after=N`` reconnects to the same URL with a newer ``Last-Event-ID``."""
    async with make_client() as (client, _):
        request_id = await start_background(client)
        await wait_status(client, request_id, "completed")
        check_resumed(await reattach(client, request_id, last_event_id=20, starting_after=5), 20)


@pytest.mark.parametrize(
    "headers, params",
    [
        pytest.param({"Last-Event-ID": "abc"}, {}, id="header-not-a-number"),
        pytest.param({}, {"starting_after": "x1"}, id="query-not-a-number"),
        pytest.param({}, {"starting_after": "-2"}, id="below-minus-one"),
    ],
)
async def test_bad_resume_point_is_400(headers: dict[str, str], params: dict[str, str]) -> None:
    async with make_client() as (client, _):
        request_id = await start_background(client)
        r = await client.get(f"/v1/chat/completions/{request_id}/stream", headers=headers, params=params)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "starting_after"


async def test_close_stream_after_events_then_resume_until_done() -> None:
    """The test-only cut (``close_stream_after_events``) ends streams without [DONE]; resuming by id completes them."""
    settings = Settings(sweep_interval_s=0.02, close_stream_after_events=4)
    async with make_client(settings, FakeBackend(delay_s=0.002)) as (client, _):
        request_id = await start_background(client)
        text, last, rounds = "", None, 0
        while rounds < 200:
            rounds += 1
            parsed = await reattach(client, request_id, last_event_id=None if last is None else int(last))
            text += parsed.text
            last = parsed.last_id or last
            if parsed.done:
                break
            assert len(parsed.events) <= 4
        assert parsed.done and text == TEXT and rounds > 1


async def test_three_subscribers_receive_the_identical_sequence() -> None:
    async with make_client(backend=FakeBackend(silent=True)) as (client, backend):
        request_id = await start_background(client)
        readers = [asyncio.ensure_future(client.get(f"/v1/chat/completions/{request_id}/stream")) for _ in range(3)]
        await deliver_one_by_one(client, backend, request_id, subscribers=3)
        bodies = [r.text for r in await asyncio.wait_for(asyncio.gather(*readers), 30)]
    assert bodies[0] == bodies[1] == bodies[2]
    parsed = parse(bodies[0])
    assert parsed.text == TEXT and parsed.done
    assert [e.content for e in parsed.events if e.id is not None][: len(TOKENS)] == TOKENS


async def test_a_foreground_stream_and_two_reattached_subscribers_agree() -> None:
    async with make_client(backend=FakeBackend(silent=True)) as (client, backend):
        post = asyncio.ensure_future(client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}))
        await wait_until_async(lambda: backend.submitted, what="the POST to reach the backend")
        request_id = backend.submitted[0].request_id
        readers = [asyncio.ensure_future(client.get(f"/v1/chat/completions/{request_id}/stream")) for _ in range(2)]
        await deliver_one_by_one(client, backend, request_id, subscribers=3)
        foreground, *reattached = await asyncio.wait_for(asyncio.gather(post, *readers), 30)
    assert foreground.headers["x-request-id"] == request_id
    assert "id:" not in foreground.text  # the POST stream never carries ids (docs/architecture.md, HTTP API)
    texts = [parse(r.text).text for r in (foreground, *reattached)]
    assert texts == [TEXT, TEXT, TEXT]
    assert reattached[0].text == reattached[1].text
    for r in (foreground, *reattached):
        assert [e.content for e in parse(r.text).events if e.content] == TOKENS  # every chunk its own event


def sse_events_written(client: httpx.AsyncClient) -> float:
    """``oss_sse_events_total``: content events written so far by every stream of the app."""
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("oss_sse_events_total") or 0.0  # type: ignore[no-any-return]


async def deliver_one_by_one(client: httpx.AsyncClient, backend: FakeBackend, request_id: str, *, subscribers: int) -> None:
    """Deliver each token only once every subscriber has written the one before as its own event, then the finish.

    So no subscriber gets two tokens coalesced into one event, whatever the machine's speed.
    """
    for seq, token in enumerate(TOKENS):
        backend.deliver([Chunk(request_id, seq, token)])
        written = subscribers * (seq + 1)
        await wait_until_async(
            lambda written=written: sse_events_written(client) == written,  # type: ignore[misc]
            what=f"{subscribers} subscribers to write seq {seq} as an event each",
        )
    backend.deliver([Chunk(request_id, FIN_SEQ, "", fin=True, finish_reason="stop")])


# -- GET by id, cancel, unknown ids --------------------------------------------------------


async def test_get_by_id_reports_in_progress_then_cancelled() -> None:
    async with make_client(backend=FakeBackend(silent=True)) as (client, backend):
        request_id = await start_background(client)
        backend.deliver([Chunk(request_id, 0, "partial")])
        body = (await client.get(f"/v1/chat/completions/{request_id}")).json()
        assert body["status"] == "in_progress" and body["choices"][0]["message"]["content"] == "partial"
        assert body["choices"][0]["finish_reason"] is None and body["id"] == request_id
        r = await client.post(f"/v1/chat/completions/{request_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert backend.cancelled == [request_id]
        body = (await client.get(f"/v1/chat/completions/{request_id}")).json()
        assert body["status"] == "cancelled" and body["error"]["code"] == "cancelled"
        assert body["choices"][0]["message"]["content"] == "partial"
        parsed = await reattach(client, request_id, last_event_id=0)
        assert parsed.done and parsed.events[0].json()["error"]["code"] == "cancelled"
        again = await client.post(f"/v1/chat/completions/{request_id}/cancel")  # idempotent
        assert again.status_code == 200 and again.json()["status"] == "cancelled" and backend.cancelled == [request_id]


async def test_get_by_id_reports_completed() -> None:
    async with make_client() as (client, _):
        request_id = await start_background(client)
        body = await wait_status(client, request_id, "completed")
        assert body["choices"][0]["message"] == {"role": "assistant", "content": TEXT, "refusal": None}
        assert body["usage"]["completion_tokens"] == len(TOKENS) and "error" not in body


async def test_get_by_id_reports_failed() -> None:
    def fail_half_way(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return chunks[:3] + [Chunk(rid, 3, "", fin=True, finish_reason="error", error="the model fell over")]

    async with make_client(backend=FakeBackend(plan=fail_half_way)) as (client, _):
        request_id = await start_background(client)
        body = await wait_status(client, request_id, "failed")
        assert body["error"]["message"] == "the model fell over"
        assert body["choices"][0]["message"]["content"] == "".join(TOKENS[:3])
        parsed = await reattach(client, request_id)
        assert parsed.text == "".join(TOKENS[:3]) and parsed.done
        assert parsed.events[-2].json()["error"]["message"] == "the model fell over"


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("GET", "/v1/chat/completions/chatcmpl-nope", id="get"),
        pytest.param("GET", "/v1/chat/completions/chatcmpl-nope/stream", id="stream"),
        pytest.param("POST", "/v1/chat/completions/chatcmpl-nope/cancel", id="cancel"),
    ],
)
async def test_unknown_id_is_a_404_error_object(method: str, path: str) -> None:
    async with make_client() as (client, _):
        r = await client.request(method, path, headers={"Last-Event-ID": "3"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == "not_found" and error["type"] == "invalid_request_error" and error["param"] == "id"
    assert "chatcmpl-nope" in error["message"]
