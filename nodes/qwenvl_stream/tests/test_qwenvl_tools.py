"""Tool calling in qwenvl-stream: the ``<tool_call>`` parser, the prompt with tools, and the chunks the node sends."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from typing import Any

import pytest
from qwenvl_helpers import USER, check_no_flush, check_stream, request
from qwenvl_stream.chat import to_chat
from qwenvl_stream.engine import QwenEngine
from qwenvl_stream.generation import BatchRow, GenerationParams, OnStep, RequestError, StepRow
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings
from qwenvl_stream.toolcalls import Piece, ToolCallParser, parse_call

from openai_stream_protocol import Part, ToolCall, encode_tools, parse_request_texts
from openai_stream_protocol.testing import RecordingNode

pytestmark = pytest.mark.timeout(120)


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": {"type": "object"}}}


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
TIME = '{"name": "get_time", "arguments": {}}'
TWO_CALLS = f"Let me check. <tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>"


def ids() -> Any:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse(pieces: Sequence[str], **kwargs: Any) -> list[Piece]:
    """Feed the pieces, flush, and merge adjacent content (how it is split does not matter to a client)."""
    parser = ToolCallParser(new_id=ids(), **kwargs)
    out: list[Piece] = []
    for piece in [*(item for p in pieces for item in parser.feed(p)), *parser.flush()]:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


EXPECTED_TWO = [
    "Let me check. ",
    ToolCall("call_0", "get_weather", '{"city": "Paris", "unit": "C"}'),
    ToolCall("call_1", "get_time", "{}"),
]


def test_two_calls_after_text() -> None:
    assert parse([TWO_CALLS]) == EXPECTED_TWO


@pytest.mark.parametrize("cut", range(1, len(TWO_CALLS)))
def test_split_anywhere_in_two_pieces(cut: int) -> None:
    assert parse([TWO_CALLS[:cut], TWO_CALLS[cut:]]) == EXPECTED_TWO


def test_one_character_at_a_time() -> None:
    assert parse(list(TWO_CALLS)) == EXPECTED_TWO


def test_content_is_released_as_it_comes_and_only_a_possible_tag_is_held() -> None:
    parser = ToolCallParser(new_id=ids())
    assert parser.feed("a < b and ") == ["a < b and "]
    assert parser.feed("x <tool") == ["x "]  # "<tool" could be a tag
    assert parser.feed("box>") == ["<toolbox>"]
    assert parser.feed("<tool_call>") == []
    assert parser.feed(TIME) == []
    assert parser.feed("</tool_call>") == [ToolCall("call_0", "get_time", "{}")]
    assert parser.calls == 1


@pytest.mark.parametrize("cut", range(1, len(TWO_CALLS) + 20, 7))
def test_text_after_the_calls_is_content(cut: int) -> None:
    text = TWO_CALLS + "\nDone, both asked."
    assert parse([text[:cut], text[cut:]]) == [*EXPECTED_TWO, "\nDone, both asked."]


def test_whitespace_around_calls_is_dropped_but_not_in_plain_text() -> None:
    assert parse([f"<tool_call>{TIME}</tool_call>\n\n"]) == [ToolCall("call_0", "get_time", "{}")]
    assert parse(["one", " ", "two", "\n"]) == ["one two\n"]
    assert parse(["  "]) == ["  "]


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "f", "arguments": {"a": 1}',  # cut JSON
        "not json at all",
        '{"arguments": {}}',  # no name
        '{"name": 3}',
        '["get_time"]',
        '{"name": "f", "arguments": [1, 2]}',
        '{"name": "f", "arguments": "{not json"}',
    ],
)
def test_a_malformed_call_is_content_with_its_tags(body: str) -> None:
    text = f"before <tool_call>{body}</tool_call> after"
    assert parse([text]) == [text]
    assert parse(list(text)) == [text]


def test_a_malformed_call_next_to_a_good_one() -> None:
    got = parse([f"<tool_call>oops</tool_call><tool_call>{TIME}</tool_call>"])
    assert got == ["<tool_call>oops</tool_call>", ToolCall("call_0", "get_time", "{}")]


@pytest.mark.parametrize("tail", ['<tool_call>\n{"name": "get_time"', "<tool_call>", "<tool_", "<"])
def test_an_unclosed_tag_at_the_end_is_content(tail: str) -> None:
    assert parse(["text ", tail]) == ["text " + tail]


def test_arguments_as_json_text_missing_or_as_parameters() -> None:
    assert parse_call('{"name": "f", "arguments": "{\\"a\\": 1}"}', lambda: "c") == ToolCall("c", "f", '{"a": 1}')
    assert parse_call('{"name": "f"}', lambda: "c") == ToolCall("c", "f", "{}")
    assert parse_call('{"name": "f", "parameters": {"b": "ü"}}', lambda: "c") == ToolCall("c", "f", '{"b": "ü"}')


def test_max_calls_drops_the_later_calls() -> None:
    assert parse([TWO_CALLS], max_calls=1) == EXPECTED_TWO[:2]


def test_real_ids_are_fresh() -> None:
    parser = ToolCallParser()
    first, second = parser.feed(f"<tool_call>{TIME}</tool_call><tool_call>{TIME}</tool_call>")
    assert isinstance(first, ToolCall) and isinstance(second, ToolCall)
    assert first.id.startswith("call_") and first.id != second.id


# -- the prompt ---------------------------------------------------------------------------------------

CALLS = [ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "get_time", "{}")]
CONVERSATION = [
    Part("system", "text", "Be brief."),
    Part("user", "text", "Weather and time in Paris?"),
    Part("assistant", "text", "Checking."),
    Part.of_tool_calls(CALLS),
    Part("tool", "text", "18 C", tool_call_id="call_1"),
    Part("tool", "text", "noon", tool_call_id="call_2"),
    Part("user", "text", "Thanks. And tomorrow?"),
]


def test_native_messages_have_the_shape_of_qwen_s_template() -> None:
    chat = to_chat(CONVERSATION, [tool("get_weather")], native_tools=True)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert chat.messages[2] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": {}}},
        ],
    }
    assert chat.messages[3] == {"role": "tool", "content": "18 C"}
    assert "# Tools" not in json.dumps(chat.messages)  # the template writes the tools


def test_native_calls_without_assistant_text_are_a_message_of_their_own() -> None:
    chat = to_chat([Part("user", "text", "hi"), Part.of_tool_calls(CALLS[:1])], native_tools=True)
    assert chat.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }


def flat(message: dict[str, Any]) -> str:
    return "".join(item.get("text", "") for item in message["content"])


def test_without_a_tool_aware_template_the_prompt_is_written_as_qwen_writes_it() -> None:
    chat = to_chat(CONVERSATION, [tool("get_weather"), tool("get_time")])
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "user"]
    system = flat(chat.messages[0])
    assert system.startswith("Be brief.\n\n# Tools\n\n") and "<tools>\n" + json.dumps(tool("get_weather")) + "\n" in system
    assert system.endswith("</tool_call>")
    assert flat(chat.messages[2]) == (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    assert flat(chat.messages[3]) == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    assert flat(chat.messages[4]) == "Thanks. And tomorrow?"  # a turn of its own after the results
    assert all(set(m) == {"role", "content"} for m in chat.messages)


def test_tools_without_a_system_turn_get_the_default_one() -> None:
    chat = to_chat([Part("user", "text", "hi")], [tool("f")])
    assert chat.messages[0]["role"] == "system" and flat(chat.messages[0]).startswith("You are a helpful assistant.\n\n# Tools")


def test_no_tools_no_change() -> None:
    parts = [Part("user", "text", "hi"), Part("tool", "text", "old form")]
    assert to_chat(parts).messages == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "tool", "content": [{"type": "text", "text": "old form"}]},
    ]


def test_generation_params_read_the_allowed_tools() -> None:
    def read(**metadata: Any) -> GenerationParams:
        return GenerationParams.from_metadata(metadata, default_max_tokens=10, max_tokens_limit=100)

    assert read().tools == () and read(tools="garbage").tools == ()
    assert read(**encode_tools([tool("f"), tool("g")])).tools == (tool("f"), tool("g"))
    assert read(**encode_tools([tool("f")], "none")).tools == ()
    assert read(**encode_tools([tool("f"), tool("g")], {"type": "function", "function": {"name": "g"}})).tools == (tool("g"),)
    assert read(**encode_tools([tool("f")], None, False)).parallel_tool_calls is False


def decoded_prompt(engine: QwenEngine, texts: list[str], tools: Sequence[dict[str, Any]]) -> str:
    prepared = engine.prepare(texts, (), tools)
    return str(engine.tokenizer.decode(prepared.inputs["input_ids"][0].tolist()))


def test_the_tiny_model_s_prompt_carries_the_tools(loaded_model: Any) -> None:
    engine = QwenEngine(loaded_model, Settings(model_name_or_path="tiny"))
    texts = [part.encode() for part in CONVERSATION]
    prompt = decoded_prompt(engine, texts, [tool("get_weather")])
    assert "<tools>\n" + json.dumps(tool("get_weather")) in prompt
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>" in prompt
    assert "# Tools" not in decoded_prompt(engine, texts[:2], [])


class Recording:
    """A processor stand-in whose template knows tools: records what ``apply_chat_template`` gets, the real one renders."""

    chat_template = "{% if tools %}...{% endif %}"

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        self.calls.append((messages, kwargs))
        return self.processor.apply_chat_template(
            [{**m, "content": m["content"] or "-"} for m in messages if m["role"] != "tool"],
            **{k: v for k, v in kwargs.items() if k != "tools"},
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.processor(*args, **kwargs)


def test_a_tool_aware_template_gets_tools_and_the_structured_messages(loaded_model: Any) -> None:
    recording = Recording(loaded_model.processor)
    engine = QwenEngine(dataclasses.replace(loaded_model, processor=recording), Settings(model_name_or_path="tiny"))
    engine.prepare([part.encode() for part in CONVERSATION], (), [tool("get_weather")])
    ((messages, kwargs),) = recording.calls
    assert kwargs["tools"] == [tool("get_weather")]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3] == {"role": "tool", "content": "18 C"}


# -- the chunks the node sends ------------------------------------------------------------------------


class ForcedEngine(QwenEngine):
    """The real engine's prompt, detokenizer, stop strings and row streams; the tokens of ``answer`` are the model's output."""

    answer = ""
    prompts: list[str]

    def generate_batch(self, rows: Sequence[BatchRow], on_step: OnStep) -> None:
        for row in rows:
            try:
                prepared = self.prepare(row.texts, row.row_images, row.params.tools)
            except RequestError as exc:
                on_step([StepRow(row.request_id, error=str(exc))])
                continue
            self.prompts.append(str(self.tokenizer.decode(prepared.inputs["input_ids"][0].tolist())))
            stream = self.stream(row.request_id, row.params, row.halt, prepared.prompt_tokens)
            tokens = self.tokenizer.encode(self.answer, add_special_tokens=False)
            for token in [*tokens, min(self.loaded.eos_token_ids)]:
                step = stream.push(int(token))
                if step is not None:
                    on_step([step])
            if (end := stream.end()) is not None:
                on_step([end])


def forced(loaded_model: Any, answer: str) -> ForcedEngine:
    engine = ForcedEngine(loaded_model, Settings(model_name_or_path="tiny", continuous_batching=False))
    engine.answer = answer
    engine.prompts = []
    return engine


def serve(engine: QwenEngine, *events: dict[str, Any]) -> RecordingNode:
    recorder = RecordingNode()
    Scheduler(recorder, engine, Settings(model_name_or_path="tiny", continuous_batching=False)).run(list(events))
    return check_no_flush(recorder)


TOOLS = encode_tools([tool("get_weather"), tool("get_time")])


def test_the_node_sends_the_model_s_tool_calls_as_tool_call_chunks(loaded_model: Any) -> None:
    engine = forced(loaded_model, TWO_CALLS)
    recorder = serve(engine, request("r", [USER + "Weather and time?"], max_tokens=500, **TOOLS))
    chunks = recorder.chunks("r")
    last = check_stream(chunks)
    assert "<tools>" in engine.prompts[0]
    content = "".join(c.text for c in chunks if c.tool_call is None)
    calls = [(c.tool_call.index, c.tool_call.id, c.tool_call.name, c.text) for c in chunks if c.tool_call is not None]
    assert content == "Let me check. "
    assert [(index, name, json.loads(arguments)) for index, _, name, arguments in calls] == [
        (0, "get_weather", {"city": "Paris", "unit": "C"}),
        (1, "get_time", {}),
    ]
    assert all(call_id.startswith("call_") for _, call_id, _, _ in calls) and calls[0][1] != calls[1][1]
    assert last.finish_reason == "tool_calls" and last.completion_tokens > 10


def test_without_tools_the_same_text_goes_out_untouched(loaded_model: Any) -> None:
    recorder = serve(forced(loaded_model, TWO_CALLS), request("r", [USER + "Weather and time?"], max_tokens=500))
    chunks = recorder.chunks("r")
    assert check_stream(chunks).finish_reason == "stop"
    assert "".join(c.text for c in chunks) == TWO_CALLS
    assert all(c.tool_call is None for c in chunks)


def test_a_malformed_call_from_the_model_is_content_and_the_answer_stops(loaded_model: Any) -> None:
    answer = '<tool_call>{"name": "get_weather", "arguments": </tool_call> sorry'
    recorder = serve(forced(loaded_model, answer), request("r", [USER + "Weather?"], max_tokens=500, **TOOLS))
    chunks = recorder.chunks("r")
    assert check_stream(chunks).finish_reason == "stop"
    assert "".join(c.text for c in chunks) == answer


def test_max_tokens_inside_a_call_ends_with_length_and_the_open_tag_as_content(loaded_model: Any) -> None:
    engine = forced(loaded_model, TWO_CALLS)
    budget = len(engine.tokenizer.encode(TWO_CALLS[: TWO_CALLS.index("get_weather")], add_special_tokens=False))
    recorder = serve(engine, request("r", [USER + "Weather?"], max_tokens=budget, **TOOLS))
    chunks = recorder.chunks("r")
    assert check_stream(chunks).finish_reason == "length"
    text = "".join(c.text for c in chunks)
    assert text.startswith("Let me check.") and "<tool_call>" in text and TWO_CALLS.startswith(text.rstrip())
    assert all(c.tool_call is None for c in chunks)


def test_parallel_tool_calls_false_sends_one_call(loaded_model: Any) -> None:
    metadata = encode_tools([tool("get_weather"), tool("get_time")], "auto", False)
    recorder = serve(forced(loaded_model, TWO_CALLS), request("r", [USER + "Weather and time?"], max_tokens=500, **metadata))
    chunks = recorder.chunks("r")
    assert [c.tool_call.name for c in chunks if c.tool_call is not None] == ["get_weather"]
    assert check_stream(chunks).finish_reason == "tool_calls"


def test_the_request_texts_of_a_tool_conversation_parse_for_the_engine() -> None:
    """What the server will send (encoded parts) is what the engine reads back."""
    assert parse_request_texts([part.encode() for part in CONVERSATION]) == CONVERSATION
