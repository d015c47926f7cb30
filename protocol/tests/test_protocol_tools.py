"""Tool calls on the wire: request metadata, conversation parts, chunk deltas and batch columns."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import (
    ASSISTANT_TOOL_CALLS_PREFIX,
    FINISH_REASONS,
    TOOL_PREFIX,
    BatchSender,
    ChunkSender,
    Part,
    ToolCall,
    ToolCallDelta,
    allowed_tools,
    decode_tool_calls,
    encode_tools,
    last_user_text,
    new_tool_call_id,
    parse_batch,
    parse_chunk,
    parse_request_texts,
    request_parallel_tool_calls,
    request_tool_choice,
    request_tools,
    texts_of,
)
from openai_stream_protocol.testing import RecordingNode


def tool(name: str, **parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": parameters}}


WEATHER = tool("get_weather", type="object", properties={"city": {"type": "string"}})
TIME = tool("get_time")


# -- request metadata ------------------------------------------------------------------------------


def test_encode_tools_round_trips_through_the_readers() -> None:
    metadata = {"request_id": "r", **encode_tools([WEATHER, TIME], "required", False)}
    assert isinstance(metadata["tools"], str) and isinstance(metadata["tool_choice"], str)  # dora metadata: flat values
    assert metadata["parallel_tool_calls"] is False
    assert request_tools(metadata) == [WEATHER, TIME]
    assert request_tool_choice(metadata) == "required"
    assert request_parallel_tool_calls(metadata) is False
    named = encode_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert request_tool_choice(named) == {"type": "function", "function": {"name": "get_weather"}}


def test_encode_tools_writes_only_what_is_given() -> None:
    assert encode_tools(None) == {}
    assert encode_tools([]) == {}
    assert encode_tools([], "none") == {"tool_choice": '"none"'}
    assert set(encode_tools([TIME])) == {"tools"}


@pytest.mark.parametrize(
    "value",
    [None, "", "not json", "{", '{"type": "function"}', "42", '"auto"', "None", 17, ["not a dict"]],
)
def test_request_tools_is_empty_for_anything_unreadable(value: Any) -> None:
    assert request_tools({"tools": value}) == []


def test_request_tools_keeps_function_tools_with_a_name_only() -> None:
    odd = [WEATHER, {"type": "code_interpreter"}, {"type": "function", "function": {}}, {"function": {"name": "bare"}}, "x"]
    assert request_tools({"tools": json.dumps(odd)}) == [WEATHER, {"function": {"name": "bare"}}]
    assert request_tools({"tools": [TIME]}) == [TIME]  # an already decoded list is read too


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"auto"', "auto"),
        ('"none"', "none"),
        ("required", "required"),  # bare, without JSON quotes
        (" AUTO ", "auto"),
        ('"sometimes"', None),
        ("{not json", None),
        ('{"type": "function"}', None),
        ('{"function": {"name": "f"}}', {"type": "function", "function": {"name": "f"}}),
        (None, None),
        (3, None),
    ],
)
def test_request_tool_choice_is_lenient(value: Any, expected: Any) -> None:
    assert request_tool_choice({"tool_choice": value}) == expected


@pytest.mark.parametrize("value, expected", [(None, True), (True, True), (False, False), ("false", False), ("true", True)])
def test_parallel_tool_calls_defaults_to_true(value: Any, expected: bool) -> None:
    metadata = {} if value is None else {"parallel_tool_calls": value}
    assert request_parallel_tool_calls(metadata) is expected


def test_allowed_tools_follows_tool_choice() -> None:
    tools = [WEATHER, TIME]
    assert allowed_tools(encode_tools(tools)) == tools
    assert allowed_tools(encode_tools(tools, "auto")) == tools
    assert allowed_tools(encode_tools(tools, "required")) == tools
    assert allowed_tools(encode_tools(tools, "none")) == []
    assert allowed_tools(encode_tools(tools, {"type": "function", "function": {"name": "get_time"}})) == [TIME]
    assert allowed_tools(encode_tools(tools, {"type": "function", "function": {"name": "unknown"}})) == []
    assert allowed_tools({}) == []


# -- conversation parts -----------------------------------------------------------------------------


def test_tool_call_parts_round_trip() -> None:
    calls = [ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "get_time", "{}")]
    parts = [
        Part("user", "text", "weather and time?"),
        Part.of_tool_calls(calls),
        Part("tool", "text", "18 C", tool_call_id="call_1"),
        Part("tool", "text", "noon\nsecond line", tool_call_id="call_2"),
        Part("tool", "text", "an old-style result"),
        Part("assistant", "text", "It is 18 C at noon."),
    ]
    texts = [part.encode() for part in parts]
    assert texts[1].startswith(ASSISTANT_TOOL_CALLS_PREFIX)
    assert json.loads(texts[1][len(ASSISTANT_TOOL_CALLS_PREFIX) :]) == [call.to_dict() for call in calls]
    assert texts[2] == "<|tool|>\n<|tool_call_id|>call_1\n18 C"
    assert texts[4] == TOOL_PREFIX + "an old-style result"
    assert parse_request_texts(texts) == parts
    assert parts[1].calls() == calls
    assert parts[0].calls() == []
    assert last_user_text(parse_request_texts(texts)) == "weather and time?"


def test_a_node_that_knows_only_the_old_prefixes_still_reads_text() -> None:
    """The tool-calls part starts with the assistant prefix, a tool result with the tool prefix."""
    call = Part.of_tool_calls([ToolCall("call_1", "f", "{}")]).encode()
    result = Part("tool", "text", "42", tool_call_id="call_1").encode()
    assert call.startswith("<|assistant|>\n") and result.startswith("<|tool|>\n")


def test_a_tool_call_id_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError):
        Part("tool", "text", "x", tool_call_id="a\nb")


def test_a_tool_result_mark_without_a_line_break_stays_text() -> None:
    assert parse_request_texts(["<|tool|>\n<|tool_call_id|>no newline"]) == [Part("tool", "text", "<|tool_call_id|>no newline")]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("not json", []),
        ('{"name": "f"}', []),
        ('[{"arguments": "{}"}, 3, {"id": "c", "name": "f", "arguments": {"a": 1}}]', [ToolCall("c", "f", '{"a": 1}')]),
    ],
)
def test_decode_tool_calls_is_lenient(content: str, expected: list[ToolCall]) -> None:
    assert decode_tool_calls(content) == expected


def test_decode_tool_calls_gives_a_missing_id_a_fresh_one() -> None:
    (call,) = decode_tool_calls('[{"name": "f"}]')
    assert call.name == "f" and call.arguments == "{}" and call.id.startswith("call_") and len(call.id) == 17
    assert new_tool_call_id() != new_tool_call_id()


# -- chunks -----------------------------------------------------------------------------------------


def test_tool_calls_is_a_finish_reason() -> None:
    assert "tool_calls" in FINISH_REASONS
    chunk = parse_chunk([""], {"request_id": "r", "seq": 4, "finish_reason": "tool_calls"})
    assert (chunk.fin, chunk.finish_reason, chunk.tool_call) == (True, "tool_calls", None)


def test_chunk_sender_streams_tool_calls_that_parse_back() -> None:
    node = RecordingNode()
    sender = ChunkSender(node, {"request_id": "r"})
    sender.send("Let me look.")
    sender.send_tool_call(0, '{"city": ', call_id="call_a", name="get_weather")
    sender.send_tool_call(0, '"Paris"}')
    sender.send_tool_call(1, "{}", call_id="call_b", name="get_time")  # starts and ends in one chunk
    sender.finish("tool_calls")
    chunks = [parse_chunk(texts_of(data), metadata) for _, data, metadata in node.sent]
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4]
    assert [c.tool_call for c in chunks] == [
        None,
        ToolCallDelta(0, "call_a", "get_weather"),
        ToolCallDelta(0),
        ToolCallDelta(1, "call_b", "get_time"),
        None,
    ]
    assert "".join(c.text for c in chunks if c.tool_call and c.tool_call.index == 0) == '{"city": "Paris"}'
    assert (chunks[-1].fin, chunks[-1].finish_reason) == (True, "tool_calls")
    assert "tool_call_id" not in node.sent[2][2] and "tool_call_name" not in node.sent[2][2]


@pytest.mark.parametrize("index", [-1, "0", 1.0, True, None])
def test_send_tool_call_refuses_a_bad_index(index: Any) -> None:
    node = RecordingNode()
    with pytest.raises(ValueError):
        ChunkSender(node, {"request_id": "r"}).send_tool_call(index, "{}")
    assert node.sent == []


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"tool_call_index": 2}, ToolCallDelta(2)),
        ({"tool_call_index": "2", "tool_call_id": "c", "tool_call_name": "f"}, ToolCallDelta(2, "c", "f")),
        ({"tool_call_index": 0, "tool_call_id": "", "tool_call_name": ""}, ToolCallDelta(0)),
        ({}, None),
    ],
)
def test_parse_chunk_reads_tool_call_deltas_leniently(metadata: dict[str, Any], expected: ToolCallDelta | None) -> None:
    assert parse_chunk(['{"a"', ": 1}"], {"request_id": "r", "seq": 0, **metadata}).tool_call == expected


@pytest.mark.parametrize(
    "metadata",
    [
        {"tool_call_index": "first"},
        {"tool_call_index": -1},
        {"tool_call_index": 1.5},
        {"tool_call_id": "c"},  # no index: the call could not be placed
        {"tool_call_name": "f"},
    ],
)
def test_parse_chunk_rejects_a_malformed_tool_call(metadata: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        parse_chunk(["x"], {"request_id": "r", "seq": 0, **metadata})


def test_a_legacy_reply_ignores_tool_call_keys() -> None:
    assert parse_chunk(["x"], {"request_id": "r", "tool_call_index": "junk"}).tool_call is None


# -- batch form -------------------------------------------------------------------------------------


def test_batch_with_tool_call_rows_round_trips() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    a, b = sender.open({"request_id": "a"}), sender.open({"request_id": "b"})
    sender.send(a, "text")
    sender.send_tool_call(b, 0, '{"x": ', call_id="call_b", name="f")
    sender.send_tool_call(b, 0, "1}")
    sender.send_tool_call(a, 0, "{}", call_id="call_a", name="g")
    sender.finish(a, "tool_calls")
    assert sender.emit() == 5
    data = node.sent[0][1]
    assert data.type.field("tool_call_index").type == pa.int64()
    assert data.type.field("tool_call_id").type == pa.string()
    got = parse_batch(data)
    assert [(c.request_id, c.seq, c.text, c.tool_call, c.finish_reason) for c in got] == [
        ("a", 0, "text", None, None),
        ("b", 0, '{"x": ', ToolCallDelta(0, "call_b", "f"), None),
        ("b", 1, "1}", ToolCallDelta(0), None),
        ("a", 1, "{}", ToolCallDelta(0, "call_a", "g"), None),
        ("a", 2, "", None, "tool_calls"),
    ]
    # The next step without a tool call leaves the columns out again.
    sender.send(b, "more")
    sender.emit()
    assert "tool_call_index" not in [f.name for f in node.sent[1][1].type]
    assert parse_batch(node.sent[1][1])[0].tool_call is None


def test_discard_drops_a_request_s_tool_call_rows_and_keeps_the_others() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    a, b = sender.open({"request_id": "a"}), sender.open({"request_id": "b"})
    sender.send_tool_call(a, 0, "{}", call_id="call_a", name="f")
    sender.send_tool_call(b, 3, "{}", call_id="call_b", name="g")
    sender.discard(a)
    sender.emit()
    assert [(c.request_id, c.tool_call) for c in parse_batch(node.sent[0][1])] == [("b", ToolCallDelta(3, "call_b", "g"))]


def test_batch_send_tool_call_refuses_a_bad_index() -> None:
    sender = BatchSender(RecordingNode())
    rid = sender.open({"request_id": "r"})
    with pytest.raises(ValueError):
        sender.send_tool_call(rid, -1, "{}")
    assert sender.queued == 0


def columns(**extra: pa.Array) -> pa.StructArray:
    base = {
        "request_id": pa.array(["r", "r"], type=pa.string()),
        "seq": pa.array([0, 1], type=pa.int64()),
        "text": pa.array(["{}", ""], type=pa.string()),
        "fin": pa.array([False, True], type=pa.bool_()),
    }
    merged = {**base, **extra}
    return pa.StructArray.from_arrays(list(merged.values()), names=list(merged))


def test_a_hand_built_batch_with_any_int_width_and_large_strings() -> None:
    got = parse_batch(
        columns(
            tool_call_index=pa.array([1, None], type=pa.int8()),
            tool_call_name=pa.array(["f", None], type=pa.large_string()),
        )
    )
    assert [c.tool_call for c in got] == [ToolCallDelta(1, None, "f"), None]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"tool_call_index": pa.array(["0", None], type=pa.string())}, id="index-as-string"),
        pytest.param({"tool_call_index": pa.array([0.0, None], type=pa.float64())}, id="index-as-float"),
        pytest.param({"tool_call_index": pa.array([-1, None], type=pa.int64())}, id="negative-index"),
        pytest.param({"tool_call_id": pa.array(["c", None], type=pa.string())}, id="id-without-index"),
        pytest.param(
            {"tool_call_index": pa.array([None, None], type=pa.int64()), "tool_call_name": pa.array([None, "f"])},
            id="name-on-a-row-without-index",
        ),
        pytest.param({"tool_call_id": pa.array([1, None], type=pa.int64())}, id="id-as-int"),
    ],
)
def test_a_malformed_tool_call_column_makes_the_batch_malformed(extra: dict[str, pa.Array]) -> None:
    with pytest.raises(ValueError):
        parse_batch(columns(**extra))
