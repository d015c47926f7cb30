"""The /v1/chat/completions request model (validation rules: ``schema``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import Field, model_validator

from openai_stream_protocol import Part

from ...schema import I64_MAX, I64_MIN, MAX_MODEL_CHARS, OpenAIStop, StrictModel, field_names, parse_json
from ..reasoning import ReasoningEffort
from ..tools import AssistantToolCall, CalledFunction, Function, FunctionName_, FunctionTool, NamedToolChoice, ToolChoice


class ImageUrl(StrictModel):
    url: Annotated[str, Field(min_length=1)]
    detail: str | None = None


class ContentPart(StrictModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        return self


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: Annotated[str, Field(min_length=1, pattern=r"^[^\r\n]*$")] | None = None

    @model_validator(mode="after")
    def _content_allowed(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may hold 'tool_calls'")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs 'tool_call_id'")
        if isinstance(self.content, list) and self.role != "user":
            for part in self.content:
                if part.type != "text":
                    raise ValueError(f"a {self.role} message may only hold text parts")
        return self

    def parts(self) -> list[Part]:
        role = "system" if self.role == "developer" else self.role
        if self.role == "tool":
            text = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content or ())
            return [Part("tool", "text", text, tool_call_id=self.tool_call_id)]
        if self.tool_calls:
            calls = Part.of_tool_calls(call.call() for call in self.tool_calls)
            return [*Message(role=self.role, content=self.content).parts(), calls]
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [Part(role, "text", self.content)]
        return [
            Part(role, "image", p.image_url.url)
            if p.image_url is not None and p.type == "image_url"
            else Part(role, "text", p.text or "")
            for p in self.content
        ]


class StreamOptions(StrictModel):
    include_usage: bool = False


def include_usage(options: StreamOptions | None) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``; chat and /v1/completions)."""
    return options is not None and options.include_usage


class ChatCompletionRequest(StrictModel):
    messages: Annotated[list[Message], Field(min_length=1)]
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=I64_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=I64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stop: OpenAIStop | None = None
    seed: Annotated[int, Field(ge=I64_MIN, le=I64_MAX)] | None = None
    background: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    service_tier: Annotated[str, Field(max_length=16)] | None = None
    """``auto``, ``priority``, ``default`` or ``flex``: its place in the model group's queue (``gateway/queue.py``)."""

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def parts(self) -> list[Part]:
        return [part for message in self.messages for part in message.parts()]

    def image_fields(self) -> Iterator[str]:
        """Each image part's field, in order (``messages[2].content[5]``), for the per-request image cap."""
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type == "image_url":
                        yield f"messages[{i}].content[{j}]"


_FIELDS = field_names(
    ImageUrl,
    ContentPart,
    Message,
    StreamOptions,
    ChatCompletionRequest,
    AssistantToolCall,
    CalledFunction,
    Function,
    FunctionTool,
    FunctionName_,
    NamedToolChoice,
)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a chat request body; raises ``InvalidRequest`` naming the first offending field."""
    return parse_json(ChatCompletionRequest, body, _FIELDS)
