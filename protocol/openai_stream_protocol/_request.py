"""Requests (server -> node): the conversation as dora-hub prefixed strings, and its tokens."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ._tools import ToolCall, decode_tool_calls, encode_tool_calls
from ._wire import (
    ASSISTANT_PREFIX,
    ASSISTANT_TOOL_CALLS_PREFIX,
    SYSTEM_PREFIX,
    TOOL_CALL_ID_MARK,
    TOOL_PREFIX,
    USER_IMAGE_PREFIX,
    USER_TEXT_PREFIX,
)

Role = Literal["system", "user", "assistant", "tool"]
Kind = Literal["text", "image", "tool_calls"]

# Longest prefixes first: both user prefixes start with "<|user|>\n", the tool-calls prefix with the assistant's.
_PREFIXES: tuple[tuple[str, Role, Kind], ...] = (
    (USER_TEXT_PREFIX, "user", "text"),
    (USER_IMAGE_PREFIX, "user", "image"),
    (SYSTEM_PREFIX, "system", "text"),
    (ASSISTANT_TOOL_CALLS_PREFIX, "assistant", "tool_calls"),
    (ASSISTANT_PREFIX, "assistant", "text"),
    (TOOL_PREFIX, "tool", "text"),
)


@dataclass(frozen=True, slots=True)
class Part:
    """One element of a request: a role, a kind and its text or image URL.

    Tool calling adds two shapes: an assistant turn's calls (``kind
    "tool_calls"``, ``content`` the JSON list of ``encode_tool_calls``; build
    it with ``Part.of_tool_calls`` and read it with ``calls()``), and a tool
    result (``role "tool"``, ``kind "text"``) that names its call in
    ``tool_call_id`` (``None``: a result without an id, the old form).
    """

    role: Role
    kind: Kind
    content: str
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_id is not None and "\n" in self.tool_call_id:
            raise ValueError(f"a tool_call_id cannot hold a line break: {self.tool_call_id!r}")

    @classmethod
    def of_tool_calls(cls, calls: Iterable[ToolCall]) -> Part:
        """An assistant turn's tool calls as one part."""
        return cls("assistant", "tool_calls", encode_tool_calls(calls))

    def calls(self) -> list[ToolCall]:
        """The calls of a ``tool_calls`` part (lenient: bad JSON gives ``[]``); ``[]`` for any other part."""
        return decode_tool_calls(self.content) if self.kind == "tool_calls" else []

    def encode(self) -> str:
        """Render in the dora-hub convention."""
        if self.role == "user":
            prefix = USER_IMAGE_PREFIX if self.kind == "image" else USER_TEXT_PREFIX
        elif self.kind == "tool_calls":
            prefix = ASSISTANT_TOOL_CALLS_PREFIX
        elif self.role == "tool" and self.tool_call_id is not None:
            prefix = TOOL_PREFIX + TOOL_CALL_ID_MARK + self.tool_call_id + "\n"
        else:
            prefix = {"system": SYSTEM_PREFIX, "assistant": ASSISTANT_PREFIX, "tool": TOOL_PREFIX}[self.role]
        return prefix + self.content


def parse_request_texts(texts: Iterable[str]) -> list[Part]:
    """Turn request texts back into parts; text without a known prefix counts as user text."""
    parts = []
    for text in texts:
        for prefix, role, kind in _PREFIXES:
            if text.startswith(prefix):
                parts.append(_part(role, kind, text[len(prefix) :]))
                break
        else:
            parts.append(Part("user", "text", text))
    return parts


def _part(role: Role, kind: Kind, content: str) -> Part:
    if role == "tool" and content.startswith(TOOL_CALL_ID_MARK):
        call_id, newline, rest = content[len(TOOL_CALL_ID_MARK) :].partition("\n")
        if newline:
            return Part(role, kind, rest, tool_call_id=call_id)
    return Part(role, kind, content)


def last_user_text(parts: Iterable[Part]) -> str:
    """The text parts of the last user turn, joined with newlines (what echo nodes answer)."""
    turn: list[str] = []
    in_user_turn = False
    for part in parts:
        if part.role == "user":
            if not in_user_turn:
                turn, in_user_turn = [], True
            if part.kind == "text":
                turn.append(part.content)
        else:
            in_user_turn = False
    return "\n".join(turn)


_TOKEN = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """Whitespace-keeping word tokens: ``"".join(split_tokens(t)) == t``."""
    return _TOKEN.findall(text)
