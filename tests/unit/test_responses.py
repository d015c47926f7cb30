"""/v1/responses over httpx.ASGITransport with the in-process FakeBackend."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import openai
import pydantic
import pytest
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent

from openai_stream_protocol import Chunk, split_tokens
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

TEXT = "Hello   there,\n general  Kenobi "
TOKENS = split_tokens(TEXT)
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)

HEAD_TYPES = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TAIL_TYPES = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@dataclass(frozen=True)
class Named:
    """One SSE block: its ``event:`` name, its ``data:`` JSON and the raw block."""

    event: str
    data: dict[str, Any]
    raw: str


def named_events(body: str) -> list[Named]:
    """The ``event:`` + ``data:`` blocks of a stream; every block must have both, and nothing else but pings."""
    out = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and line != ": ping"]
        if not lines:
            continue
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        out.append(Named(lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :]), "\n".join(lines)))
    return out


def check_well_formed(events: list[Named], pieces: int, terminal: str) -> None:
    """Names match types, numbers run 0.., and the types come in the documented order."""
    assert [e.event for e in events] == [e.data["type"] for e in events]
    assert [e.data["sequence_number"] for e in events] == list(range(len(events)))
    assert [e.event for e in events] == HEAD_TYPES + ["response.output_text.delta"] * pieces + TAIL_TYPES + [terminal]


def delta_text(events: list[Named]) -> str:
    return "".join(e.data["delta"] for e in events if e.event == "response.output_text.delta")


async def test_stream_events_are_well_formed_and_numbered_one_per_piece() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, backend):
        r = await client.post("/v1/responses", json={"model": "m", "input": TEXT, "stream": True, "metadata": {"k": "v"}})
        request = backend.submitted[0]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "id:" not in r.text and "[DONE]" not in r.text
    events = named_events(r.text)
    # One delta per piece: every token, then the finish chunk's empty text.
    check_well_formed(events, len(TOKENS) + 1, "response.completed")
    assert delta_text(events) == TEXT and events[4 + len(TOKENS)].data["delta"] == ""
    for e in events:  # each event parses as the SDK's own (validating) models
        STREAM_EVENT.validate_python(e.data)
    response_id = r.headers["x-request-id"]
    assert response_id.startswith("resp_") and request.request_id == response_id
    assert request.metadata["stream"] is True
    item_ids = {e.data.get("item_id") or e.data["item"]["id"] for e in events[2:-1]}
    assert item_ids == {"msg_" + response_id[len("resp_") :]}
    assert events[0].data["response"]["status"] == "in_progress" and events[0].data["response"]["output"] == []
    final = SdkResponse.model_validate(events[-1].data["response"])
    assert final.id == response_id and final.status == "completed" and final.output_text == TEXT
    assert final.metadata == {"k": "v"} and final.model == "m" and final.store is True
    assert final.usage is not None and final.usage.output_tokens == len(TOKENS)
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens
    assert events[-2].data["item"]["status"] == "completed"


async def test_non_stream_response_object_and_retrieve() -> None:
    body = {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": TEXT}]}],
        "instructions": "be brief",
        "temperature": 0.5,
        "top_p": 0.9,
        "max_output_tokens": 100,
        "metadata": {"user": "u1"},
        "unknown_field": {"ignored": True},
    }
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json=body)
        got = await client.get(f"/v1/responses/{r.json()['id']}")
        request = backend.submitted[0]
    assert r.status_code == 200
    response = SdkResponse.model_validate(r.json())
    assert response.object == "response" and response.status == "completed" and response.output_text == TEXT
    assert (response.instructions, response.temperature, response.top_p, response.max_output_tokens) == (
        "be brief",
        0.5,
        0.9,
        100,
    )
    assert response.background is False and response.error is None and response.incomplete_details is None
    assert got.status_code == 200 and got.json() == r.json()
    assert request.texts[0] == "<|system|>\nbe brief"  # instructions come first, as a system part
    assert (request.metadata["max_tokens"], request.metadata["temperature"], request.metadata["stream"]) == (100, 0.5, False)


async def test_image_and_role_parts_reach_the_backend() -> None:
    body = {
        "input": [
            {"role": "developer", "content": "dev"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "earlier"}]},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                ],
            },
        ]
    }
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json=body)
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "What is this?"
    assert backend.submitted[0].texts == [
        "<|system|>\ndev",
        "<|assistant|>\nearlier",
        "<|user|>\n<|im_start|>\nWhat is this?",
        "<|user|>\n<|vision_start|>\ndata:image/png;base64,iVBORw0KGgo=",
    ]


async def test_resume_gives_the_same_events_with_the_same_numbers() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.002)) as (client, _):
        r = await client.post("/v1/responses", json={"input": TEXT, "stream": True, "background": True})
        response_id = r.headers["x-request-id"]
        original = named_events(r.text)
        url = f"/v1/responses/{response_id}"
        replay = named_events((await client.get(url, params={"stream": "true"})).text)
        cuts = {}
        for after in (-1, 0, 3, 4, 7, len(original) - 2, len(original) - 1, len(original) + 5):
            cuts[after] = named_events((await client.get(url, params={"stream": "true", "starting_after": after})).text)
    check_well_formed(original, len(TOKENS) + 1, "response.completed")
    assert original[0].data["response"]["status"] == "queued"  # a background response opens queued
    assert [e.raw for e in replay] == [e.raw for e in original]
    for after, events in cuts.items():
        assert [e.raw for e in events] == [e.raw for e in original if e.data["sequence_number"] > after], after


async def test_resume_while_live_continues_with_the_same_numbers() -> None:
    backend = FakeBackend(silent=True)
    async with make_client(backend=backend) as (client, _):
        r = await client.post("/v1/responses", json={"input": TEXT, "background": True})
        assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["background"] is True
        response_id = r.json()["id"]
        backend.deliver([Chunk(response_id, i, t) for i, t in enumerate(TOKENS[:3])])
        in_progress = (await client.get(f"/v1/responses/{response_id}")).json()
        assert in_progress["status"] == "in_progress" and in_progress["usage"] is None
        assert in_progress["output"][0]["content"][0]["text"] == "".join(TOKENS[:3])
        resumed = asyncio.ensure_future(
            client.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": 5})
        )
        state = client.app.state.registry.get(response_id)  # type: ignore[attr-defined]
        await wait_until_async(lambda: state._waiters, what="the resumed reader to wait on the state")  # the rest comes after
        rest = [Chunk(response_id, i, t) for i, t in enumerate(TOKENS) if i >= 3]
        backend.deliver([*rest, Chunk(response_id, len(TOKENS), "", fin=True, finish_reason="stop")])
        live = named_events((await asyncio.wait_for(resumed, 10)).text)
        full = named_events((await client.get(f"/v1/responses/{response_id}", params={"stream": "true"})).text)
    assert [e.data["sequence_number"] for e in live] == list(range(6, len(full)))
    assert [e.raw for e in live] == [e.raw for e in full[6:]]
    assert delta_text(live) == "".join(TOKENS[2:])  # piece i is event 4 + i: after 5 comes piece 2


async def test_max_output_tokens_gives_incomplete() -> None:
    async with make_client() as (client, _):
        streamed = await client.post("/v1/responses", json={"input": TEXT, "max_output_tokens": 2, "stream": True})
        plain = await client.post("/v1/responses", json={"input": TEXT, "max_output_tokens": 2})
    events = named_events(streamed.text)
    check_well_formed(events, 3, "response.incomplete")
    for body in (events[-1].data["response"], plain.json()):
        response = SdkResponse.model_validate(body)
        assert response.status == "incomplete" and response.output_text == "".join(TOKENS[:2])
        assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
        assert body["output"][0]["status"] == "incomplete"


def _fail_after(n: int):  # type: ignore[no-untyped-def]
    """A plan: ``n`` tokens, then the node reports an error."""

    def plan(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return [*chunks[:n], Chunk(rid, n, "", fin=True, finish_reason="error", error="the model broke")]

    return plan


async def test_failure_after_the_headers_ends_with_response_failed() -> None:
    async with make_client(backend=FakeBackend(plan=_fail_after(2))) as (client, _):
        r = await client.post("/v1/responses", json={"input": TEXT, "stream": True})
        got = await client.get(f"/v1/responses/{r.headers['x-request-id']}")
    assert r.status_code == 200
    events = named_events(r.text)
    check_well_formed(events, 3, "response.failed")
    failed = events[-1].data["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "upstream_error", "message": "the model broke"}
    assert failed["output"][0]["content"][0]["text"] == "".join(TOKENS[:2]) and failed["output"][0]["status"] == "incomplete"
    assert got.json()["status"] == "failed" and got.json()["error"]["code"] == "upstream_error"


async def test_failure_before_the_first_chunk_is_an_http_error() -> None:
    async with make_client(backend=FakeBackend(plan=_fail_after(0))) as (client, _):
        streamed = await client.post("/v1/responses", json={"input": TEXT, "stream": True})
        plain = await client.post("/v1/responses", json={"input": TEXT})
    async with make_client(backend=FakeBackend(fail_submit=True)) as (client, _):
        refused = await client.post("/v1/responses", json={"input": TEXT, "stream": True})
    for r in (streamed, plain):
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
        assert r.headers["x-request-id"].startswith("resp_")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "backend_unavailable"


async def test_cancel_a_background_response() -> None:
    backend = FakeBackend(silent=True)
    async with make_client(backend=backend) as (client, _):
        r = await client.post("/v1/responses", json={"input": TEXT, "background": True})
        response_id = r.json()["id"]
        backend.deliver([Chunk(response_id, 0, TOKENS[0])])
        cancelled = await client.post(f"/v1/responses/{response_id}/cancel")
        again = await client.post(f"/v1/responses/{response_id}/cancel")
        events = named_events((await client.get(f"/v1/responses/{response_id}", params={"stream": "true"})).text)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled"
    assert again.json()["status"] == "cancelled"
    assert backend.cancelled == [response_id]  # once, however often it is asked
    # No response.cancelled event exists: the stream ends with response.failed, whose response says cancelled.
    check_well_formed(events, 1, "response.failed")
    assert events[-1].data["response"]["status"] == "cancelled" and delta_text(events) == TOKENS[0]


async def test_previous_response_id_continues_the_conversation() -> None:
    async with make_client() as (client, backend):
        first = await client.post("/v1/responses", json={"input": "one two", "instructions": "first rules"})
        second = await client.post(
            "/v1/responses",
            json={"input": "three", "previous_response_id": first.json()["id"], "instructions": "second rules"},
        )
        third = await client.post("/v1/responses", json={"input": "four", "previous_response_id": second.json()["id"]})
    assert second.status_code == 200 and second.json()["previous_response_id"] == first.json()["id"]
    assert second.json()["output"][0]["content"][0]["text"] == "three"
    # The earlier input (less its instructions) and answer come before the new input; new instructions first.
    assert backend.submitted[1].texts == [
        "<|system|>\nsecond rules",
        "<|user|>\n<|im_start|>\none two",
        "<|assistant|>\none two",
        "<|user|>\n<|im_start|>\nthree",
    ]
    assert backend.submitted[2].texts == [
        "<|user|>\n<|im_start|>\none two",
        "<|assistant|>\none two",
        "<|user|>\n<|im_start|>\nthree",
        "<|assistant|>\nthree",
        "<|user|>\n<|im_start|>\nfour",
    ]
    # The server's estimate (the fake reports none) counts the whole conversation: 2 + 2 + 1 + 1 + 1 words.
    assert (first.json()["usage"]["input_tokens"], third.json()["usage"]["input_tokens"]) == (4, 7)


@pytest.mark.parametrize("previous", ["resp_0123abcd", "not-an-id", "chatcmpl-abc"])
async def test_unknown_previous_response_id_is_404(previous: str) -> None:
    async with make_client() as (client, backend):
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        if previous == "chatcmpl-abc":
            previous = chat.json()["id"]  # a retained id of another surface is no response
        r = await client.post("/v1/responses", json={"input": "x", "previous_response_id": previous})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    assert len(backend.submitted) == 1


async def test_delete_forgets_and_cancels() -> None:
    backend = FakeBackend(silent=True)
    async with make_client(backend=backend) as (client, _):
        done = await client.post("/v1/responses", json={"input": "x", "background": True})
        done_id = done.json()["id"]
        backend.deliver([Chunk(done_id, 0, "x", fin=True, finish_reason="stop")])
        live = await client.post("/v1/responses", json={"input": "y", "background": True})
        live_id = live.json()["id"]
        deleted = [await client.delete(f"/v1/responses/{i}") for i in (done_id, live_id)]
        after = [await client.get(f"/v1/responses/{i}") for i in (done_id, live_id)]
        again = await client.delete(f"/v1/responses/{done_id}")
        chained = await client.post("/v1/responses", json={"input": "z", "previous_response_id": done_id})
        registry = client.app.state.registry  # type: ignore[attr-defined]
        held = registry.held_bytes
    assert [d.json() for d in deleted] == [{"id": i, "object": "response.deleted", "deleted": True} for i in (done_id, live_id)]
    assert backend.cancelled == [live_id]
    assert all(a.status_code == 404 and a.json()["error"]["param"] == "response_id" for a in after)
    assert again.status_code == 404 and chained.status_code == 404
    assert held == 0 and not registry.active and not registry.retained


async def test_store_false_is_not_retrievable_once_ended() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, _):
        plain = await client.post("/v1/responses", json={"input": TEXT, "store": False})
        streamed = await client.post("/v1/responses", json={"input": TEXT, "store": False, "stream": True})
        ids = [plain.json()["id"], streamed.headers["x-request-id"]]
        got = [await client.get(f"/v1/responses/{i}") for i in ids]
        chained = await client.post("/v1/responses", json={"input": "z", "previous_response_id": ids[0]})
        registry = client.app.state.registry  # type: ignore[attr-defined]
    assert plain.json()["store"] is False and plain.json()["output"][0]["content"][0]["text"] == TEXT
    assert delta_text(named_events(streamed.text)) == TEXT
    assert all(g.status_code == 404 for g in got) and chained.status_code == 404
    assert not registry.retained or all(i not in registry.retained for i in ids)


@pytest.mark.parametrize(
    "body, param",
    [
        pytest.param({}, "input", id="missing-input"),
        pytest.param({"input": []}, "input", id="empty-input"),
        pytest.param({"input": 5}, "input", id="input-not-text"),
        pytest.param({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role", id="unknown-role"),
        pytest.param({"input": [{"type": "function_call", "role": "user", "content": "x"}]}, "input[0].type", id="item-type"),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_file"}]}]},
            "input[0].content[1].type",
            id="part-type",
        ),
        pytest.param({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0]", id="no-text"),
        pytest.param(
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            "input[0]",
            id="system-image",
        ),
        pytest.param({"input": "x", "max_output_tokens": 0}, "max_output_tokens", id="max-output-tokens"),
        pytest.param({"input": "x", "max_output_tokens": "5"}, "max_output_tokens", id="max-output-tokens-string"),
        pytest.param({"input": "x", "temperature": 3}, "temperature", id="temperature"),
        pytest.param({"input": "x", "metadata": {"k": 1}}, "metadata", id="metadata-value"),
        pytest.param({"input": "x", "background": True, "store": False}, "store", id="background-needs-store"),
        pytest.param({"input": "x", "stream": "yes"}, "stream", id="stream-not-bool"),
    ],
)
async def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert not backend.submitted


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST-cancel"])
@pytest.mark.parametrize(
    "response_id, echoed",
    [
        pytest.param("resp_0123", "resp_0123", id="unknown"),  # this server's shape: named in the answer
        # Malformed (docs/architecture.md, "Security"): never put in a header or a log line.
        pytest.param("resp_XYZ", None, id="not-hex"),
        pytest.param("chatcmpl-0123", None, id="another-surface"),
        pytest.param("resp_%0Aevil", None, id="line-break"),
    ],
)
async def test_unknown_or_malformed_ids_are_404(method: str, response_id: str, echoed: str | None) -> None:
    async with make_client() as (client, _):
        if method == "GET":
            r = await client.get(f"/v1/responses/{response_id}")
        elif method == "DELETE":
            r = await client.delete(f"/v1/responses/{response_id}")
        else:
            r = await client.post(f"/v1/responses/{response_id}/cancel")
    assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"
    assert r.headers.get("x-request-id") == echoed


async def test_bad_starting_after_is_400() -> None:
    async with make_client() as (client, _):
        r = await client.post("/v1/responses", json={"input": "x"})
        bad = await client.get(f"/v1/responses/{r.json()['id']}", params={"stream": "true", "starting_after": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"


async def test_surface_label_on_metrics() -> None:
    async with make_client(Settings(sweep_interval_s=0.02)) as (client, _):
        await client.post("/v1/responses", json={"input": "x"})
        metrics = (await client.get("/metrics")).text
    assert 'oss_requests_total{status="200",surface="responses"} 1.0' in metrics
    assert 'oss_completions_total{status="completed",surface="responses"} 1.0' in metrics


async def test_a_stored_conversation_counts_in_the_byte_bounds() -> None:
    """``previous_response_id`` needs the input kept: its bytes count in ``held_bytes`` until it is gone."""
    long_input = "word " * 4000  # 20,000 bytes in, echoed back
    async with make_client() as (client, _):
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_input}]})
        answer_only = (await client.get("/health")).json()["held_bytes"]  # a retained chat completion: its answer
        stored = await client.post("/v1/responses", json={"model": "m", "input": long_input})
        with_response = (await client.get("/health")).json()["held_bytes"]
        await client.delete(f"/v1/responses/{stored.json()['id']}")
        after_delete = (await client.get("/health")).json()["held_bytes"]
    assert chat.status_code == stored.status_code == 200
    assert with_response - 2 * answer_only >= len(long_input)  # the same answer again, plus the kept input
    assert after_delete == answer_only


async def test_input_items_list_this_requests_own_input_through_the_sdk() -> None:
    first_input: Any = [{"role": "user", "content": "call it"}]
    second_input: Any = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            ],
        },
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "4 C"},
        {"role": "developer", "content": "be brief"},
    ]
    async with make_client() as (client, _):
        sdk = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)
        first = await sdk.responses.create(model="m", input=first_input, instructions="not an input item")
        second = await sdk.responses.create(model="m", input=second_input, previous_response_id=first.id)
        asc = [item async for item in sdk.responses.input_items.list(second.id, order="asc")]
        desc = await sdk.responses.input_items.list(second.id)
        page = await sdk.responses.input_items.list(second.id, order="asc", limit=2)
        rest = await sdk.responses.input_items.list(second.id, order="asc", after=page.data[-1].id)
        first_items = await sdk.responses.input_items.list(first.id)
        bad = await client.get(f"/v1/responses/{second.id}/input_items?order=sideways")
        missing = await client.get("/v1/responses/resp_00/input_items")
    assert [item.type for item in asc] == ["message", "function_call", "function_call_output", "message"]
    user, call, output, developer = (item.model_dump() for item in asc)
    assert user["role"] == "user" and [c["type"] for c in user["content"]] == ["input_text", "input_image"]
    assert user["content"][1]["image_url"] == "data:image/png;base64,AAAA"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "get_weather", '{"city": "Oslo"}')
    assert (output["call_id"], output["output"]) == ("call_1", "4 C")
    assert developer["role"] == "system" and developer["content"][0]["text"] == "be brief"
    assert [item.id for item in desc.data] == [item.id for item in reversed(asc)]
    assert len({item.id for item in asc}) == 4
    assert [item.id for item in page.data] == [item.id for item in asc[:2]] and page.has_more
    assert [item.id for item in rest.data] == [item.id for item in asc[2:]] and not rest.has_more
    # the first response's input, without its instructions; the chained one lists only its own
    assert [item.type for item in first_items.data] == ["message"]
    assert first_items.data[0].model_dump()["content"][0]["text"] == "call it"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "order"
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
