"""Request texts (the dora-hub flattening) back into a chat for the model's template.

The flattening keeps one element per message part but not the message
boundaries, so consecutive parts of one role become one message, in order:
a user turn of an image and a question stays one turn, as the client sent
it. Images become ``{"type": "image"}`` placeholders (what Qwen2.5-VL's chat
template expands to ``<|vision_start|><|image_pad|><|vision_end|>``) and
their sources are returned in the same order, for the processor.

Tool calling (docs/architecture.md, "Tool calls") has two renderings:

- ``native_tools``: the template knows tools (Qwen2.5's text template does).
  An assistant turn's calls become ``{"role": "assistant", "content": "",
  "tool_calls": [{"type": "function", "function": {"name", "arguments": <dict>}}]}``
  and each tool result ``{"role": "tool", "content": <text>}``; the engine
  passes ``tools=`` to ``apply_chat_template``.
- otherwise (Qwen2.5-VL's own template ignores ``tools``) the same prompt is
  written here, as Qwen2.5's template writes it: the tool list in the system
  turn (``# Tools`` ... ``<tools>``), calls as ``<tool_call>`` JSON in the
  assistant's text, results as a user turn of ``<tool_response>`` blocks.

A tool part in a conversation that does not use tool calling (no tools, no
calls, no call ids: the old form) stays a ``tool`` turn of its own, as before.

A continued answer (docs/architecture.md, "Continuation") is the start of the
assistant turn: ``delivered_pieces`` gives it back as the model wrote it, piece
by piece (its tool calls in the ``<tool_call>`` form the parser read them from).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openai_stream_protocol import Continuation, Part, ToolCall

Message = dict[str, Any]

DEFAULT_SYSTEM = "You are a helpful assistant."
_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@dataclass(slots=True)
class Chat:
    messages: list[Message] = field(default_factory=list)
    image_sources: list[str] = field(default_factory=list)


def to_chat(parts: Iterable[Part], tools: Sequence[Mapping[str, Any]] = (), *, native_tools: bool = False) -> Chat:
    """The messages for the template; ``tools`` (the request's function tools) and the rendering are described above."""
    chat = Chat()
    parts = list(parts)
    # A tool part of a conversation without tool calling (no tools, no calls, no call ids) stays as it was: a "tool" turn.
    calling = bool(tools) or any(part.kind == "tool_calls" or part.tool_call_id is not None for part in parts)
    for part in parts:
        if part.kind == "tool_calls":
            _add_calls(chat.messages, part.calls(), native_tools)
            continue
        if part.role == "tool" and calling:
            _add_result(chat.messages, part.content, native_tools)
            continue
        if part.kind == "image":
            chat.image_sources.append(part.content)
            item: dict[str, Any] = {"type": "image"}
        else:
            item = {"type": "text", "text": part.content}
        last = chat.messages[-1] if chat.messages else None
        if last is not None and last["role"] == part.role and _open(last):
            last["content"].append(item)
        else:
            chat.messages.append({"role": part.role, "content": [item]})
    if tools and not native_tools:
        _add_tools_to_system(chat.messages, tools)
    for message in chat.messages:
        message.pop(_RESULTS, None)
    return chat


_RESULTS = "_tool_results"
"""Marks (while building) a user turn made of tool results: the next user text starts a turn of its own."""


def _open(message: Message) -> bool:
    """Whether a part of the same role may join this message."""
    return isinstance(message["content"], list) and "tool_calls" not in message and _RESULTS not in message


def template_knows_tools(template: Any) -> bool:
    """Whether a chat template (a string, or a dict of named ones) renders a ``tools`` list."""
    if isinstance(template, Mapping):
        return any(template_knows_tools(value) for value in template.values())
    return isinstance(template, str) and "tools" in template


def _arguments(call: ToolCall) -> Any:
    """The arguments as an object where they parse as one (what Qwen's template dumps), else the text as given."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return call.arguments
    return value if isinstance(value, dict) else call.arguments


def _add_calls(messages: list[Message], calls: list[ToolCall], native: bool) -> None:
    if not calls:
        return
    last = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
    if native:
        tool_calls = [{"type": "function", "function": {"name": c.name, "arguments": _arguments(c)}} for c in calls]
        if last is not None and "tool_calls" not in last:
            # The turn's text and its calls are one message; a string content is what tool-aware templates print.
            last["content"] = "".join(item.get("text", "") for item in last["content"] if isinstance(item, dict))
            last["tool_calls"] = tool_calls
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        return
    text = "\n".join(call_text(c) for c in calls)
    if last is not None and isinstance(last["content"], list):
        last["content"].append({"type": "text", "text": ("\n" if last["content"] else "") + text})
    else:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})


def call_text(call: ToolCall) -> str:
    """One call as Qwen writes it: ``<tool_call>``, the JSON object, ``</tool_call>``."""
    return "<tool_call>\n" + json.dumps({"name": call.name, "arguments": _arguments(call)}, ensure_ascii=False) + "\n</tool_call>"


def delivered_pieces(continuation: Continuation) -> list[str]:
    """The delivered answer as the model's own text, one string per piece: the answer text as it was sent,
    and each tool call (whole, at the place of its first piece) in the form the parser read it from,
    after a line break when text came before it (as Qwen separates calls)."""
    # calls() is in index order, one per index that has a piece.
    order = sorted({piece.tool_call.index for piece in continuation.pieces if piece.tool_call is not None})
    by_index = dict(zip(order, continuation.calls(), strict=True))
    out: list[str] = []
    for piece in continuation.pieces:
        if piece.tool_call is None:
            if piece.text:
                out.append(piece.text)
        elif (call := by_index.pop(piece.tool_call.index, None)) is not None:
            out.append(("\n" if out else "") + call_text(call))
    return out


def _add_result(messages: list[Message], content: str, native: bool) -> None:
    if native:
        messages.append({"role": "tool", "content": content})
        return
    text = "<tool_response>\n" + content + "\n</tool_response>"
    last = messages[-1] if messages else None
    if last is not None and _RESULTS in last:  # consecutive results share one user turn
        last["content"].append({"type": "text", "text": "\n" + text})
    else:
        messages.append({"role": "user", "content": [{"type": "text", "text": text}], _RESULTS: True})


def _add_tools_to_system(messages: list[Message], tools: Sequence[Mapping[str, Any]]) -> None:
    block = _TOOLS_HEAD + "".join("\n" + json.dumps(dict(tool), ensure_ascii=False) for tool in tools) + _TOOLS_TAIL
    if messages and messages[0]["role"] == "system":
        messages[0]["content"].append({"type": "text", "text": block})
    else:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM + block}]})
