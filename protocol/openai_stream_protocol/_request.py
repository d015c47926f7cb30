"""Requests (server -> node): the conversation as dora-hub prefixed strings, and its tokens."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ._wire import ASSISTANT_PREFIX, SYSTEM_PREFIX, TOOL_PREFIX, USER_IMAGE_PREFIX, USER_TEXT_PREFIX

Role = Literal["system", "user", "assistant", "tool"]
Kind = Literal["text", "image"]

# Longest prefixes first: both user prefixes start with "<|user|>\n".
_PREFIXES: tuple[tuple[str, Role, Kind], ...] = (
    (USER_TEXT_PREFIX, "user", "text"),
    (USER_IMAGE_PREFIX, "user", "image"),
    (SYSTEM_PREFIX, "system", "text"),
    (ASSISTANT_PREFIX, "assistant", "text"),
    (TOOL_PREFIX, "tool", "text"),
)


@dataclass(frozen=True, slots=True)
class Part:
    """One element of a request: a role, a kind and its text or image URL."""

    role: Role
    kind: Kind
    content: str

    def encode(self) -> str:
        """Render in the dora-hub convention."""
        if self.role == "user":
            prefix = USER_IMAGE_PREFIX if self.kind == "image" else USER_TEXT_PREFIX
        else:
            prefix = {"system": SYSTEM_PREFIX, "assistant": ASSISTANT_PREFIX, "tool": TOOL_PREFIX}[self.role]
        return prefix + self.content


def parse_request_texts(texts: Iterable[str]) -> list[Part]:
    """Turn request texts back into parts; text without a known prefix counts as user text."""
    parts = []
    for text in texts:
        for prefix, role, kind in _PREFIXES:
            if text.startswith(prefix):
                parts.append(Part(role, kind, text[len(prefix) :]))
                break
        else:
            parts.append(Part("user", "text", text))
    return parts


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
