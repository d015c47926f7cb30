"""Tool calls (function calling): the request's tools, a conversation's calls, and the streamed call deltas.

docs/architecture.md, "Dora wire protocol", "Tool calls". The request carries
the OpenAI ``tools``/``tool_choice`` as JSON text in its metadata (dora
metadata holds no nested objects); the readers here never raise, so a node
that gets something odd answers without tools instead of failing.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._wire import as_bool

TOOLS_KEY = "tools"
"""Request metadata: JSON text of the OpenAI ``tools`` list (``[{"type": "function", "function": {...}}]``)."""
TOOL_CHOICE_KEY = "tool_choice"
"""Request metadata: JSON text of ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name"}}``."""
PARALLEL_TOOL_CALLS_KEY = "parallel_tool_calls"
"""Request metadata: bool; ``false`` asks for at most one call per answer (absent: true, OpenAI's default)."""

TOOL_CALL_INDEX_KEY = "tool_call_index"
"""Chunk metadata: int, which call of the answer this delta belongs to (0, 1, ...)."""
TOOL_CALL_ID_KEY = "tool_call_id"
"""Chunk metadata: str, the call's id; on the call's first chunk."""
TOOL_CALL_NAME_KEY = "tool_call_name"
"""Chunk metadata: str, the function's name; on the call's first chunk."""

TOOL_CHOICES = frozenset({"none", "auto", "required"})


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One whole call: its id, the function's name and the arguments as JSON text (as OpenAI sends them)."""

    id: str
    name: str
    arguments: str = "{}"

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """What a chunk says about a tool call; the chunk's text is the next piece of the call's arguments.

    ``id`` and ``name`` are set on the call's first chunk (and may be repeated later), ``None`` otherwise.
    """

    index: int
    id: str | None = None
    name: str | None = None


def checked_tool_call_index(index: int) -> int:
    """``index`` if it is an int >= 0 (a sender's argument); ``ValueError`` otherwise."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"tool call index must be an int >= 0, got {index!r}")
    return index


def new_tool_call_id() -> str:
    """A fresh call id: ``call_`` and 12 hex digits."""
    return "call_" + secrets.token_hex(6)


def encode_tools(
    tools: Iterable[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
) -> dict[str, Any]:
    """The request metadata entries for the OpenAI ``tools``, ``tool_choice`` and ``parallel_tool_calls``.

    Only what is given (and a non-empty tools list) becomes an entry, so the
    result can be merged into any request's metadata: ``{**metadata, **encode_tools(...)}``.
    """
    entries: dict[str, Any] = {}
    tool_list = [dict(tool) for tool in tools or ()]
    if tool_list:
        entries[TOOLS_KEY] = json.dumps(tool_list, ensure_ascii=False)
    if tool_choice is not None:
        entries[TOOL_CHOICE_KEY] = json.dumps(tool_choice if isinstance(tool_choice, str) else dict(tool_choice))
    if parallel_tool_calls is not None:
        entries[PARALLEL_TOOL_CALLS_KEY] = bool(parallel_tool_calls)
    return entries


def _json_or_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def tool_name(tool: Mapping[str, Any]) -> str | None:
    """The function name of one ``tools`` entry (``{"type": "function", "function": {"name": ...}}``)."""
    function = tool.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) and name else None


def request_tools(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools: the entries of ``tools`` with a function name; ``[]`` for none or bad JSON.

    Entries of another ``type`` than ``function`` are left out. Never raises.
    """
    value = _json_or_value(metadata.get(TOOLS_KEY))
    if not isinstance(value, list):
        return []
    return [
        dict(tool)
        for tool in value
        if isinstance(tool, Mapping) and tool.get("type", "function") == "function" and tool_name(tool) is not None
    ]


def request_tool_choice(metadata: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """``"none"``, ``"auto"``, ``"required"``, ``{"type": "function", "function": {"name": ...}}``, or ``None``.

    ``None`` when absent or unreadable. A bare string (``auto`` without JSON quotes) is read too. Never raises.
    """
    value = _json_or_value(metadata.get(TOOL_CHOICE_KEY))
    if isinstance(value, str):
        value = value.strip().lower()
        return value if value in TOOL_CHOICES else None
    if isinstance(value, Mapping) and tool_name(value) is not None:
        return {"type": "function", "function": {"name": tool_name(value)}}
    return None


def request_parallel_tool_calls(metadata: Mapping[str, Any]) -> bool:
    """``parallel_tool_calls``: true unless the request says false."""
    value = metadata.get(PARALLEL_TOOL_CALLS_KEY)
    return True if value is None else as_bool(value)


def allowed_tools(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tools the model may call: ``[]`` for ``tool_choice: "none"``, only the named one for a named choice, else all."""
    tools = request_tools(metadata)
    choice = request_tool_choice(metadata)
    if choice == "none":
        return []
    if isinstance(choice, dict):
        name = tool_name(choice)
        return [tool for tool in tools if tool_name(tool) == name]
    return tools


def encode_tool_calls(calls: Iterable[ToolCall]) -> str:
    """The JSON list an assistant tool-calls part carries."""
    return json.dumps([call.to_dict() for call in calls], ensure_ascii=False)


def decode_tool_calls(text: str) -> list[ToolCall]:
    """The calls of an assistant tool-calls part; entries without a string ``name`` are skipped, bad JSON gives ``[]``.

    ``arguments`` given as an object is turned into JSON text; a missing id gets a fresh one.
    """
    try:
        value = json.loads(text)
    except ValueError:
        return []
    calls = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            continue
        arguments = item.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = item.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) and call_id else new_tool_call_id(), item["name"], arguments))
    return calls
