"""Function tools as the OpenAI chat API writes them, validated, and turned into the wire form.

Every surface's tools end up as the one wire form (docs/architecture.md, "Tool calls"): the OpenAI
chat ``tools`` list, ``tool_choice`` and ``parallel_tool_calls`` as request metadata
(``openai_stream_protocol.encode_tools``). The Responses and Messages surfaces convert their own
tool shapes into ``FunctionTool`` first, so the checks here are made once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from openai_stream_protocol import ToolCall, encode_tools

from ..errors import InvalidRequest
from ..schema import StrictModel

FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
"""OpenAI's rule for function names (letters, digits, ``_`` and ``-``, at most 64)."""


class Function(StrictModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(StrictModel):
    """One entry of the chat ``tools`` list."""

    type: Literal["function"]
    function: Function


class FunctionName_(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName_


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(StrictModel):
    name: FunctionName
    arguments: str


class AssistantToolCall(StrictModel):
    """A call an assistant message made (``messages[i].tool_calls[j]``)."""

    id: Annotated[str, Field(min_length=1, pattern=r"^[^\r\n]*$")]
    type: Literal["function"]
    function: CalledFunction

    def call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


def tool_metadata(
    tools: list[FunctionTool] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None,
    *,
    choice_param: str = "tool_choice",
) -> dict[str, Any]:
    """The request metadata for the tools; 400 naming ``choice_param`` when the choice asks for a tool there is not."""
    names = {tool.function.name for tool in tools or ()}
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise InvalidRequest(
            f"tool_choice names the function '{tool_choice.function.name}', which is not in 'tools'", param=choice_param
        )
    if tool_choice == "required" and not names:
        raise InvalidRequest("tool_choice 'required' needs at least one tool in 'tools'", param=choice_param)
    choice = tool_choice.model_dump() if isinstance(tool_choice, NamedToolChoice) else tool_choice
    return encode_tools(
        [tool.model_dump(exclude_none=True) for tool in tools or ()],
        choice if names else None,
        parallel_tool_calls if names else None,
    )


def call_dict(call: ToolCall) -> dict[str, Any]:
    """A whole call as the chat API shows it (``message.tool_calls[i]``)."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
