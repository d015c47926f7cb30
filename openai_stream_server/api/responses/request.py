"""The /v1/responses request model (validation rules: ``schema``).

``input`` is a string (one user message) or a list of items: messages, whose content is a
string or a list of parts (``input_text`` and ``input_image`` for user, system and developer
messages, ``output_text`` and ``input_text`` for assistant ones), the assistant's earlier
``function_call`` items and the ``function_call_output`` items that answer them. An earlier
response's ``reasoning`` items (which a client managing its own context sends back) are accepted
and left out of the conversation, as thinking templates leave reasoning out of the history. Other
item types (files, ...) are refused with a 400 naming ``input[i].type``.

``tools`` are Responses-shaped function tools (``{"type": "function", "name", "description",
"parameters", "strict"}``, flat) and ``tool_choice`` names one as ``{"type": "function", "name"}``;
both are turned into ``api/tools.py``'s chat-shaped models, so they are checked and sent to the
node as every surface's tools are (docs/architecture.md, "Tool calls").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from openai_stream_protocol import Part, ToolCall

from ...schema import I64_MAX, MAX_MODEL_CHARS, StrictModel, field_names, parse_json
from ..reasoning import ReasoningEffort
from ..tools import Function, FunctionName, FunctionName_, FunctionTool, NamedToolChoice, ToolChoice, tool_metadata

CallId = Annotated[str, Field(min_length=1, pattern=r"^[^\r\n]*$")]

MAX_METADATA_PAIRS = 16
"""As the OpenAI API: at most 16 pairs, keys up to 64 characters, values up to 512."""


class ContentPart(StrictModel):
    type: Literal["input_text", "input_image", "output_text"]
    text: str | None = None
    image_url: Annotated[str, Field(min_length=1)] | None = None
    """A URL or a data URL; ``file_id`` images are not supported."""
    detail: Literal["low", "high", "auto"] | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type in ("input_text", "output_text") and self.text is None:
            raise ValueError(f"an {self.type} part needs 'text'")
        if self.type == "input_image" and self.image_url is None:
            raise ValueError("an input_image part needs 'image_url' (file_id is not supported)")
        return self


class InputMessage(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    @model_validator(mode="after")
    def _parts_allowed(self) -> InputMessage:
        if isinstance(self.content, list):
            for part in self.content:
                if part.type == "input_image" and self.role != "user":
                    raise ValueError(f"a {self.role} message may not hold images")
                if part.type == "output_text" and self.role != "assistant":
                    raise ValueError("only an assistant message may hold output_text parts")
        return self

    def parts(self) -> list[Part]:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return [Part(role, "text", self.content)]
        return [
            Part(role, "image", p.image_url)
            if p.type == "input_image" and p.image_url is not None
            else Part(role, "text", p.text or "")
            for p in self.content
        ]


class FunctionCallItem(StrictModel):
    """A call the assistant made earlier in the conversation (an output item of an earlier response)."""

    type: Literal["function_call"]
    call_id: CallId
    name: FunctionName
    arguments: str
    id: str | None = None
    status: str | None = None

    def call(self) -> ToolCall:
        return ToolCall(self.call_id, self.name, self.arguments)


class OutputTextPart(StrictModel):
    type: Literal["input_text", "output_text"]
    text: str


class FunctionCallOutputItem(StrictModel):
    """A function's result, for the call ``call_id``: text, or a list of text parts."""

    type: Literal["function_call_output"]
    call_id: CallId
    output: str | list[OutputTextPart]
    id: str | None = None
    status: str | None = None

    def part(self) -> Part:
        text = self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)
        return Part("tool", "text", text, tool_call_id=self.call_id)


class ReasoningItem(StrictModel):
    """An earlier response's reasoning, sent back by a client that manages its own context; not sent downstream."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: str | None = None


_ITEM_TYPES = ("function_call", "function_call_output", "reasoning")


def _item_kind(value: Any) -> str:
    """Which item model validates an ``input`` entry: a function call (output) or reasoning by its ``type``; anything
    else, and anything with a ``role``, as a message (whose ``type`` must then be ``message``)."""
    if isinstance(value, dict) and "role" not in value and value.get("type") in _ITEM_TYPES:
        return str(value["type"])
    return "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]


class ResponsesFunctionTool(StrictModel):
    """A function tool as the Responses API writes it: flat, not nested under ``function``."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> FunctionTool:
        function = Function(name=self.name, description=self.description, parameters=self.parameters, strict=self.strict)
        return FunctionTool(type="function", function=function)

    def echo(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "strict": self.strict,
        }


class ResponsesNamedToolChoice(StrictModel):
    type: Literal["function"]
    name: FunctionName


class ReasoningParam(StrictModel):
    """``reasoning``: the effort reaches the node (docs/architecture.md, "Reasoning"); the summary is echoed only
    (the server has no summariser)."""

    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(StrictModel):
    # The list first: an empty list's error (too short) is then the one reported, not "not a string".
    input: Annotated[list[InputItem], Field(min_length=1)] | str
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=I64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    service_tier: Annotated[str, Field(max_length=16)] | None = None
    """``auto``, ``priority``, ``default`` or ``flex``: its place in the model group's queue (``gateway/queue.py``)."""
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    tools: list[ResponsesFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningParam | None = None

    def instruction_parts(self) -> list[Part]:
        """``instructions`` as the conversation's first (system) part; not carried over by ``previous_response_id``."""
        return [] if self.instructions is None else [Part("system", "text", self.instructions)]

    def input_parts(self) -> list[Part]:
        """The conversation: messages as their parts, consecutive ``function_call`` items as one assistant tool-calls
        part, each ``function_call_output`` as a tool part naming its call."""
        if isinstance(self.input, str):
            return [Part("user", "text", self.input)]
        parts: list[Part] = []
        calls: list[ToolCall] = []
        for item in self.input:
            if isinstance(item, FunctionCallItem):
                calls.append(item.call())
                continue
            if isinstance(item, ReasoningItem):
                continue
            if calls:
                parts.append(Part.of_tool_calls(calls))
                calls = []
            parts.extend(item.parts() if isinstance(item, InputMessage) else [item.part()])
        if calls:
            parts.append(Part.of_tool_calls(calls))
        return parts

    def image_fields(self) -> Iterator[str]:
        """Each image part's field, in order (``input[2].content[5]``), for the per-request image cap."""
        if isinstance(self.input, str):
            return
        for i, item in enumerate(self.input):
            if isinstance(item, InputMessage) and isinstance(item.content, list):
                for j, part in enumerate(item.content):
                    if part.type == "input_image":
                        yield f"input[{i}].content[{j}]"

    def chat_tool_choice(self) -> ToolChoice | None:
        choice = self.tool_choice
        if isinstance(choice, ResponsesNamedToolChoice):
            return NamedToolChoice(type="function", function=FunctionName_(name=choice.name))
        return choice

    def tool_metadata(self) -> dict[str, Any]:
        """The tools' request metadata (the chat wire form); 400 naming ``tool_choice`` for a choice without its tool."""
        tools = None if self.tools is None else [tool.chat() for tool in self.tools]
        return tool_metadata(tools, self.chat_tool_choice(), self.parallel_tool_calls)

    def echoed_tool_choice(self) -> str | dict[str, Any]:
        """``tool_choice`` as the response object shows it (``auto`` when not given)."""
        choice = self.tool_choice
        if choice is None:
            return "auto"
        return choice if isinstance(choice, str) else choice.model_dump()


_FIELDS = field_names(
    ContentPart,
    InputMessage,
    FunctionCallItem,
    OutputTextPart,
    FunctionCallOutputItem,
    ReasoningItem,
    ReasoningParam,
    ResponsesFunctionTool,
    ResponsesNamedToolChoice,
    ResponsesRequest,
)


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Validate a /v1/responses body; raises ``InvalidRequest`` naming the first offending field."""
    return parse_json(ResponsesRequest, body, _FIELDS)
