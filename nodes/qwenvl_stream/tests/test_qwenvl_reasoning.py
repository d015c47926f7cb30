"""Reasoning in qwenvl-stream: a thinking template's ``<think>…</think>`` sent as reasoning pieces, ``enable_thinking``.

The tiny model's own template (Qwen2.5-VL's) never thinks; a stand-in processor gives it a Qwen3-style one: its
generation prompt opens ``<think>`` itself (Qwen3 "Thinking-2507"), or leaves it to the model and closes an empty one
for ``enable_thinking=False`` (Qwen3's hybrid template). The model's tokens are forced (as the tool-call tests force
them), so the tags arrive split across the tiny tokenizer's tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pytest
from qwenvl_helpers import USER, check_no_flush, check_stream, request
from qwenvl_stream.engine import QwenEngine
from qwenvl_stream.generation import BatchRow, GenerationParams, OnStep, RequestError, StepRow
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings

from openai_stream_protocol import Chunk, ReasoningRequest, encode_tools
from openai_stream_protocol.testing import RecordingNode

pytestmark = pytest.mark.timeout(120)


class ThinkingTemplate:
    """A processor stand-in with a Qwen3-style template: records the template kwargs, renders with the real one."""

    def __init__(self, processor: Any, *, opens: bool) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.opens = opens
        self.chat_template = "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}"
        self.kwargs: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        self.kwargs.append(dict(kwargs))
        enable = kwargs.pop("enable_thinking", True)
        rendered = str(self.processor.apply_chat_template(messages, **kwargs))
        if not kwargs.get("add_generation_prompt"):
            return rendered
        if self.opens:
            return rendered + "<think>\n"
        return rendered if enable else rendered + "<think>\n\n</think>\n\n"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.processor(*args, **kwargs)


class ForcedEngine(QwenEngine):
    """The real engine's prompt, detokenizer and row streams; the tokens of ``answer`` are the model's output."""

    answer = ""
    prompts: list[str]

    def generate_batch(self, rows: Sequence[BatchRow], on_step: OnStep) -> None:
        for row in rows:
            try:
                prepared = self.prepare(row.texts, row.row_images, row.params.tools, None, row.params.enable_thinking)
            except RequestError as exc:
                on_step([StepRow(row.request_id, error=str(exc))])
                continue
            self.prompts.append(str(self.tokenizer.decode(prepared.inputs["input_ids"][0].tolist())))
            stream = self.stream(row.request_id, row.params, row.halt, prepared.prompt_tokens)
            for token in [*self.tokenizer.encode(self.answer, add_special_tokens=False), min(self.loaded.eos_token_ids)]:
                if (step := stream.push(int(token))) is not None:
                    on_step([step])
            if (end := stream.end()) is not None:
                on_step([end])


def engine(loaded_model: Any, answer: str, *, opens: bool | None) -> ForcedEngine:
    """``opens``: the thinking template's kind; None for the tiny model's own template (Qwen2.5-VL's, no thinking)."""
    loaded = (
        loaded_model
        if opens is None
        else dataclasses.replace(loaded_model, processor=ThinkingTemplate(loaded_model.processor, opens=opens))
    )
    forced = ForcedEngine(loaded, Settings(model_name_or_path="tiny", continuous_batching=False))
    forced.answer = answer
    forced.prompts = []
    return forced


def serve(forced: QwenEngine, *events: dict[str, Any]) -> list[Chunk]:
    recorder = RecordingNode()
    Scheduler(recorder, forced, Settings(model_name_or_path="tiny", continuous_batching=False)).run(list(events))
    chunks = check_no_flush(recorder).chunks("r")
    check_stream(chunks)
    return chunks


def kinds(chunks: list[Chunk]) -> tuple[str, str]:
    """(reasoning, text); the reasoning must all come before the text."""
    first_text = next((i for i, c in enumerate(chunks) if not c.reasoning and c.text), len(chunks))
    assert not any(c.reasoning for c in chunks[first_text:])
    return "".join(c.text for c in chunks if c.reasoning), "".join(c.text for c in chunks if not c.reasoning and not c.tool_call)


def test_a_template_that_opens_the_reasoning(loaded_model: Any) -> None:
    forced = engine(loaded_model, "The user greets me.\n</think>\n\nHello there!", opens=True)
    chunks = serve(forced, request("r", [USER + "hi"], max_tokens=200))
    assert kinds(chunks) == ("The user greets me.\n", "Hello there!")
    assert forced.prompts[0].endswith("<think>\n") and forced.thinking() is True
    assert chunks[-1].finish_reason == "stop"


def test_a_model_that_opens_it_itself_and_an_unclosed_one(loaded_model: Any) -> None:
    chunks = serve(engine(loaded_model, "<think>\nhmm\n</think>\n\nHi", opens=False), request("r", [USER + "hi"], max_tokens=200))
    assert kinds(chunks) == ("\nhmm\n", "Hi")
    chunks = serve(engine(loaded_model, "<think>still going", opens=False), request("r", [USER + "hi"], max_tokens=200))
    assert kinds(chunks) == ("still going", "")


def test_reasoning_off_reaches_a_template_that_takes_enable_thinking(loaded_model: Any) -> None:
    forced = engine(loaded_model, "Just the answer.", opens=False)
    chunks = serve(forced, request("r", [USER + "hi"], max_tokens=200, **ReasoningRequest("none").to_metadata()))
    assert kinds(chunks) == ("", "Just the answer.")
    template = forced.loaded.processor
    assert isinstance(template, ThinkingTemplate)
    assert any(kwargs.get("enable_thinking") is False for kwargs in template.kwargs)
    assert forced.prompts[0].endswith("<think>\n\n</think>\n\n")
    plain = engine(loaded_model, "x", opens=False)
    serve(plain, request("r", [USER + "hi"], max_tokens=20))  # no wish: the template's default, no kwarg
    assert all("enable_thinking" not in kwargs for kwargs in plain.loaded.processor.kwargs)


def test_a_template_that_never_thinks_sends_the_text_untouched(loaded_model: Any) -> None:
    answer = "<think>not a thinking model</think>text"
    forced = engine(loaded_model, answer, opens=None)
    chunks = serve(forced, request("r", [USER + "hi"], max_tokens=200, **ReasoningRequest("high").to_metadata()))
    assert kinds(chunks) == ("", answer) and forced.thinking() is None


def test_reasoning_then_a_tool_call(loaded_model: Any) -> None:
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    forced = engine(loaded_model, f"I need the weather.\n</think>\n\n<tool_call>\n{call}\n</tool_call>", opens=True)
    tools = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    chunks = serve(forced, request("r", [USER + "weather?"], max_tokens=300, **encode_tools([tools])))
    assert kinds(chunks) == ("I need the weather.\n", "")
    (delta,) = [c for c in chunks if c.tool_call is not None]
    assert delta.tool_call is not None and delta.tool_call.name == "get_weather" and json.loads(delta.text) == {"city": "Paris"}
    assert chunks[-1].finish_reason == "tool_calls"


def test_generation_params_read_the_wish() -> None:
    def read(**metadata: Any) -> GenerationParams:
        return GenerationParams.from_metadata(metadata, default_max_tokens=10, max_tokens_limit=100)

    assert read().enable_thinking is None
    assert read(**ReasoningRequest("none").to_metadata()).enable_thinking is False
    assert read(**ReasoningRequest(budget_tokens=2048).to_metadata()).enable_thinking is True
