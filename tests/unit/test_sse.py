"""Our preformatted bytes against sse-starlette's encoder and the openai SDK's decoder."""

from __future__ import annotations

import json

import pytest
from openai._streaming import SSEDecoder
from sse_starlette.event import ServerSentEvent

from openai_stream_server.api.chat.render import ChunkEncoder
from openai_stream_server.errors import UpstreamTimeout
from openai_stream_server.sse import DONE, PING, error_event

TEXTS = ["plain", "", ' "quoted" \\ back', "line\nbreak\r\nand\rcr", "ünïcödé ✓ 🚀", "\u2028\u2029", "data: fake\n\n"]


def decode(raw: bytes) -> list[tuple[str | None, str]]:
    return [(e.id, e.data) for e in SSEDecoder().iter_bytes(iter([raw]))]


@pytest.mark.parametrize("text", TEXTS)
def test_content_event_parses_like_sse_starlette(text: str) -> None:
    encoder = ChunkEncoder("chatcmpl-1", "m", 7, include_usage=True)
    ours = encoder.content(text)
    data = decode(ours)[0][1]
    theirs = ServerSentEvent(data=data).encode()
    assert decode(theirs) == decode(ours)
    chunk = json.loads(data)
    assert chunk["choices"][0]["delta"] == {"content": text}
    assert chunk["usage"] is None
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-1" and chunk["created"] == 7


def test_post_stream_has_no_ids_and_pings_are_ignored() -> None:
    encoder = ChunkEncoder("chatcmpl-1", "m", 7)
    raw = encoder.role() + PING + encoder.content("a") + PING + PING + encoder.finish("stop") + PING + DONE
    events = decode(raw)
    assert [event_id for event_id, _ in events] == [None] * 4
    assert [d for _, d in events][-1] == "[DONE]"
    assert [json.loads(d)["choices"][0]["finish_reason"] for _, d in events[:-1]] == [None, None, "stop"]
    assert b"id:" not in raw


def test_resumable_events_carry_id_and_sequence_number() -> None:
    encoder = ChunkEncoder("chatcmpl-1", "m", 7, resumable=True)
    ((event_id, data),) = decode(encoder.content("x", 41))
    assert event_id == "41"
    assert json.loads(data)["sequence_number"] == 41
    ((event_id, data),) = decode(encoder.finish("length", 42, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    body = json.loads(data)
    assert event_id == "42" and body["usage"]["total_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def test_usage_chunk_has_no_choices() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    body = json.loads(decode(ChunkEncoder("c", "m", 1, include_usage=True).usage(usage))[0][1])
    assert body["choices"] == [] and body["usage"] == usage


def test_error_event_is_an_openai_error_object() -> None:
    body = json.loads(decode(error_event(UpstreamTimeout("slow", param=None)))[0][1])
    assert body == {"error": {"message": "slow", "type": "timeout", "param": None, "code": "upstream_timeout"}}
