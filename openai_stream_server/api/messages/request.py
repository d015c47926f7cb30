"""The /v1/messages request models (Anthropic Messages API) and their translation into parts and tools.

Validation is ``schema.parse_json``'s (strict types, unknown fields ignored), with fields named the
way Anthropic names them, with dots: ``messages.0.content.1.type: Input should be 'text', ...``.
A content block is one model with a ``type`` and the fields of every kind (as chat's
``ContentPart``) rather than a tagged union, whose tags would mix into the field path; what a kind
needs is checked after, and the missing field is still named (``messages.0.content.0.source``).

``thinking`` reaches the node as the one reasoning entry (docs/architecture.md, "Reasoning");
``thinking`` and ``redacted_thinking`` blocks a client sends back in an assistant turn are accepted and
left out of the conversation, as thinking templates leave reasoning out of the history.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from openai_stream_protocol import Part, ReasoningRequest, ToolCall

from ...schema import I64_MAX, MAX_MODEL_CHARS, StopList, StrictModel, error_at, field_names, parse_json
from ..tools import Function, FunctionName, FunctionName_, FunctionTool, NamedToolChoice, ToolChoice

ToolUseId = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,256}$")]
"""Anthropic's rule for ``tool_use`` ids; our nodes' ``call_...`` ids pass through it unchanged."""

MediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str


class ImageSource(StrictModel):
    type: Literal["base64", "url"]
    media_type: MediaType | None = None
    data: Annotated[str, Field(min_length=1)] | None = None
    url: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ImageSource:
        if self.type == "base64":
            if self.media_type is None:
                raise error_at("media_type")
            if self.data is None:
                raise error_at("data")
        elif self.url is None:
            raise error_at("url")
        return self

    def url_or_data(self) -> str:
        """What an image part carries: the URL, or the base64 data as a ``data:`` URL."""
        if self.type == "base64":
            return f"data:{self.media_type};base64,{self.data}"
        return self.url or ""


class ContentBlock(StrictModel):
    """One block of a message's content: ``text``, ``image``, ``tool_use``, ``tool_result``, or an earlier answer's
    ``thinking`` / ``redacted_thinking`` (not sent downstream)."""

    type: Literal["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    source: ImageSource | None = None
    id: ToolUseId | None = None
    name: FunctionName | None = None
    input: dict[str, Any] | None = None
    tool_use_id: ToolUseId | None = None
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentBlock:
        needed = {
            "text": ("text",),
            "image": ("source",),
            "tool_use": ("id", "name", "input"),
            "tool_result": ("tool_use_id",),
            "thinking": ("thinking",),
            "redacted_thinking": ("data",),
        }
        for name in needed[self.type]:
            if getattr(self, name) is None:
                raise error_at(name)
        return self

    def result_text(self) -> str:
        """A ``tool_result``'s content as one text."""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content or ())


_ALLOWED = {"user": ("text", "image", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}


class Message(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> Message:
        if isinstance(self.content, list):
            for i, block in enumerate(self.content):
                if block.type not in _ALLOWED[self.role]:
                    raise error_at(f"content.{i}.type", f"a {block.type} block is not allowed in the {self.role} role")
        return self

    def parts(self) -> list[Part]:
        """The turn as parts, in block order; consecutive ``tool_use`` blocks become one tool-calls part."""
        role = self.role
        if isinstance(self.content, str):
            return [Part(role, "text", self.content)]
        parts: list[Part] = []
        calls: list[ToolCall] = []
        for block in self.content:
            if block.type == "tool_use":
                calls.append(ToolCall(block.id or "", block.name or "", json.dumps(block.input, ensure_ascii=False)))
                continue
            if block.type in ("thinking", "redacted_thinking"):
                continue
            if calls:
                parts.append(Part.of_tool_calls(calls))
                calls = []
            if block.type == "text":
                parts.append(Part(role, "text", block.text or ""))
            elif block.type == "image" and block.source is not None:
                parts.append(Part(role, "image", block.source.url_or_data()))
            elif block.type == "tool_result":
                parts.append(Part("tool", "text", block.result_text(), tool_call_id=block.tool_use_id))
        if calls:
            parts.append(Part.of_tool_calls(calls))
        return parts


class Tool(StrictModel):
    """A client tool (``type`` absent or ``custom``); Anthropic's server tools are not served here."""

    type: Literal["custom"] | None = None
    name: FunctionName
    description: str | None = None
    input_schema: dict[str, Any]

    def function_tool(self) -> FunctionTool:
        return FunctionTool(
            type="function", function=Function(name=self.name, description=self.description, parameters=self.input_schema)
        )


class MessagesToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> MessagesToolChoice:
        if self.type == "tool" and self.name is None:
            raise error_at("name")
        return self

    def openai(self) -> ToolChoice:
        """``auto`` / ``any`` / ``tool`` / ``none`` as chat's ``auto`` / ``required`` / named / ``none``."""
        if self.type == "tool":
            return NamedToolChoice(type="function", function=FunctionName_(name=self.name or ""))
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]  # type: ignore[return-value]


class ThinkingConfig(StrictModel):
    """``thinking``: ``enabled`` with a ``budget_tokens`` of at least 1,024 (as Anthropic), ``disabled``, or
    ``adaptive`` / ``between_tools`` (the model decides); ``display`` is accepted and ignored."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Annotated[int, Field(ge=1024, le=I64_MAX)] | None = None
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise error_at("budget_tokens")
        return self

    def wish(self) -> ReasoningRequest:
        if self.type == "disabled":
            return ReasoningRequest("none")
        return ReasoningRequest(budget_tokens=self.budget_tokens if self.type == "enabled" else None)


class Metadata(StrictModel):
    user_id: Annotated[str, Field(max_length=256)] | None = None


class PromptRequest(StrictModel):
    """What /v1/messages/count_tokens reads: the prompt without the sampling options."""

    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)]
    messages: list[Message]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: MessagesToolChoice | None = None
    thinking: ThinkingConfig | None = None

    def parts(self) -> list[Part]:
        system: list[Part] = []
        if isinstance(self.system, str):
            system = [Part("system", "text", self.system)] if self.system else []
        elif self.system is not None:
            system = [Part("system", "text", block.text) for block in self.system]
        return system + [part for message in self.messages for part in message.parts()]

    def function_tools(self) -> list[FunctionTool] | None:
        return None if self.tools is None else [tool.function_tool() for tool in self.tools]

    @property
    def choice_param(self) -> str:
        """The field a tool-choice error names."""
        return "tool_choice.name" if self.tool_choice is not None and self.tool_choice.type == "tool" else "tool_choice.type"

    @property
    def parallel_tool_calls(self) -> bool | None:
        disable = None if self.tool_choice is None else self.tool_choice.disable_parallel_tool_use
        return None if disable is None else not disable


class MessagesRequest(PromptRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=I64_MAX)]
    stop_sequences: StopList | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=I64_MAX)] | None = None
    stream: bool = False
    service_tier: Annotated[str, Field(max_length=16)] | None = None
    """Its place in the model group's queue (``gateway/queue.py``): ``auto``, ``priority``, ``default``, ``flex``."""
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesRequest:
        budget = None if self.thinking is None else self.thinking.budget_tokens
        if budget is not None and budget >= self.max_tokens:
            raise error_at("thinking.budget_tokens", "must be less than max_tokens")
        return self

    def image_fields(self) -> Iterator[str]:
        """Each image block's field, in order (``messages.2.content.5``), for the per-request image cap."""
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, block in enumerate(message.content):
                    if block.type == "image":
                        yield f"messages.{i}.content.{j}"


_FIELDS = field_names(
    TextBlock, ImageSource, ContentBlock, Message, Tool, MessagesToolChoice, ThinkingConfig, Metadata, MessagesRequest
)


def parse_messages_request(body: bytes) -> MessagesRequest:
    """Validate a /v1/messages body; raises ``InvalidRequest`` naming the first offending field, Anthropic's way."""
    return parse_json(MessagesRequest, body, _FIELDS, dotted=True)


def parse_count_tokens_request(body: bytes) -> PromptRequest:
    """Validate a /v1/messages/count_tokens body, as ``parse_messages_request``."""
    return parse_json(PromptRequest, body, _FIELDS, dotted=True)
