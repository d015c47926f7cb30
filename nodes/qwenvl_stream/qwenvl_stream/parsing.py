"""What the model writes, read as it streams: reasoning first (``thinking.ThinkParser``), then answer text with its
``<tool_call>`` tags (``toolcalls.ToolCallParser``) read out of it.

``OutputParser`` chains the two for one request, each only when the request needs it (a thinking template, tools).
How the model's text is split into tokens does not change what comes out, apart from where text and reasoning
pieces break (``tests/test_qwenvl_split_invariance.py``; docs/architecture.md, "Reasoning").
"""

from __future__ import annotations

from dataclasses import dataclass

from openai_stream_protocol import ToolCall

from .thinking import ThinkParser
from .toolcalls import ToolCallParser


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of the model's reasoning."""

    text: str


Piece = Reasoning | str | ToolCall
"""What the parser gives back: reasoning, answer text, or one whole tool call."""


class OutputParser:
    """Incremental: ``feed`` each decoded piece, ``flush`` at the end; both return ``Piece``s in order (none empty)."""

    __slots__ = ("think", "tools")

    def __init__(self, think: ThinkParser | None = None, tools: ToolCallParser | None = None) -> None:
        self.think = think
        self.tools = tools

    def feed(self, text: str) -> list[Piece]:
        if not text:
            return []
        if self.think is None:
            return self._answer(text)
        return self._runs(self.think.feed(text))

    def flush(self) -> list[Piece]:
        out = self._runs(self.think.flush()) if self.think is not None else []
        if self.tools is not None:
            out += self.tools.flush()
        return out

    def _runs(self, runs: list[tuple[bool, str]]) -> list[Piece]:
        out: list[Piece] = []
        for reasoning, text in runs:
            if reasoning:
                out.append(Reasoning(text))
            else:
                out += self._answer(text)
        return out

    def _answer(self, text: str) -> list[Piece]:
        if self.tools is None:
            return [text]
        return list(self.tools.feed(text))
