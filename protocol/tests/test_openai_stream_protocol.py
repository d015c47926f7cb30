"""The wire protocol helpers node authors share."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import (
    ChunkSender,
    Part,
    cancelled_request_id,
    last_user_text,
    parse_chunk,
    parse_request_texts,
    split_tokens,
    texts_of,
)
from openai_stream_protocol.testing import RecordingNode

# Node authors install this package without the server: importing it must not need the HTTP stack or dora.
FORBIDDEN = ("starlette", "uvicorn", "pydantic", "httpx", "anyio", "openai_stream_server", "dora")


def test_importing_the_protocol_pulls_in_pyarrow_only() -> None:
    code = f"import sys, openai_stream_protocol; print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_request_texts_round_trip() -> None:
    parts = [
        Part("system", "text", "be brief"),
        Part("user", "text", "what is this?"),
        Part("user", "image", "data:image/png;base64,AAAA"),
        Part("assistant", "text", "a cat"),
        Part("tool", "text", '{"x": 1}'),
        Part("user", "text", "and now?\nsecond line"),
    ]
    texts = [p.encode() for p in parts]
    assert texts[1] == "<|user|>\n<|im_start|>\nwhat is this?"
    assert texts[2] == "<|user|>\n<|vision_start|>\ndata:image/png;base64,AAAA"
    assert parse_request_texts(texts) == parts
    assert last_user_text(parts) == "and now?\nsecond line"
    assert parse_request_texts(["no prefix"]) == [Part("user", "text", "no prefix")]


@pytest.mark.parametrize("text", ["", "one", "  lead and trail  ", "a\n\nb\tc", "  "])
def test_split_tokens_keeps_whitespace(text: str) -> None:
    assert "".join(split_tokens(text)) == text


@pytest.mark.parametrize(
    "metadata, seq, fin, reason",
    [
        pytest.param({"request_id": "r", "seq": 3}, 3, False, None, id="int"),
        pytest.param({"session_id": "r", "seq": "3", "fin": "true"}, 3, True, "stop", id="strings-as-dora-example"),
        pytest.param({"request_id": "r", "seq": 0, "finish_reason": "length"}, 0, True, "length", id="reason-ends"),
        pytest.param({"request_id": "r", "seq": 1, "fin": True, "error": "boom"}, 1, True, "error", id="error"),
        pytest.param({"request_id": "r"}, None, True, "stop", id="legacy"),
    ],
)
def test_parse_chunk_is_lenient(metadata: dict[str, Any], seq: int | None, fin: bool, reason: str | None) -> None:
    chunk = parse_chunk(["a", "b"], metadata)
    assert (chunk.request_id, chunk.seq, chunk.fin, chunk.finish_reason) == ("r", seq, fin, reason)


def test_parse_chunk_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_chunk(["x"], {"request_id": "r", "seq": "three"})
    with pytest.raises(ValueError):
        parse_chunk(["x"], {"request_id": "r", "seq": 1, "finish_reason": "bored"})


def test_chunk_sender_numbers_and_finishes_without_flush() -> None:
    node = RecordingNode()
    sender = ChunkSender(node, {"request_id": "r1", "model": "m"})
    sender.send("a")
    sender.send("b")
    sender.finish("length", prompt_tokens=3, completion_tokens=2)
    assert [m["seq"] for _, _, m in node.sent] == [0, 1, 2]
    assert node.sent[-1][2]["fin"] is True and node.sent[-1][2]["finish_reason"] == "length"
    assert all("flush" not in m and m["request_id"] == "r1" == m["session_id"] for _, _, m in node.sent)
    assert [parse_chunk(texts_of(d), m).text for _, d, m in node.sent] == ["a", "b", ""]
    with pytest.raises(RuntimeError):
        sender.send("late")


def test_chunk_sender_finish_carries_the_stop_sequence_and_parse_chunk_reads_it() -> None:
    node = RecordingNode()
    sender = ChunkSender(node, {"request_id": "r1"})
    sender.send("one two ")
    sender.finish("stop", stop_sequence="STOP", completion_tokens=2)
    first, last = (parse_chunk(texts_of(d), m) for _, d, m in node.sent)
    assert "stop_sequence" not in node.sent[0][2] and first.stop_sequence is None
    assert node.sent[1][2]["stop_sequence"] == "STOP"
    assert (last.fin, last.finish_reason, last.stop_sequence) == (True, "stop", "STOP")
    # Without one, the key is not sent at all.
    plain = RecordingNode()
    ChunkSender(plain, {"request_id": "r2"}).finish("stop")
    assert "stop_sequence" not in plain.sent[0][2]


@pytest.mark.parametrize(
    "metadata, expected",
    [
        pytest.param({"fin": True, "stop_sequence": "END"}, "END", id="string"),
        pytest.param({"fin": True, "stop_sequence": 7}, None, id="not-a-string"),
        pytest.param({"fin": True, "stop_sequence": ["END"]}, None, id="a-list"),
        pytest.param({"fin": True, "stop_sequence": ""}, None, id="empty"),
        pytest.param({"fin": True, "stop_sequence": "None"}, None, id="dora-none"),
        pytest.param({"stop_sequence": "END"}, None, id="not-the-fin-chunk"),
    ],
)
def test_parse_chunk_reads_stop_sequence_leniently(metadata: dict[str, Any], expected: str | None) -> None:
    chunk = parse_chunk(["x"], {"request_id": "r", "seq": 2, **metadata})
    assert chunk.stop_sequence == expected


def test_texts_and_cancel_helpers() -> None:
    assert texts_of(pa.array(["a", "b"], type=pa.string())) == ["a", "b"]
    assert cancelled_request_id(pa.array(["r9"]), {}) == "r9"
    assert cancelled_request_id(pa.array(["x"]), {"request_id": "r1"}) == "r1"
