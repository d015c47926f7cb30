"""Qwen's ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` output, read as the text streams.

Qwen2.5 (and its VL models, given the tools in the prompt) writes a tool call
as a JSON object between ``<tool_call>`` and ``</tool_call>`` (the Hermes
format). ``ToolCallParser`` takes the decoded pieces as they come and gives
back content text (everything outside the tags) and one ``ToolCall`` per
complete tag whose body is a JSON object with a string ``name``. A tag split
across pieces is held back until it is whole. Malformed JSON inside the tags,
and a tag still open at the end, come out as content, tags included: the
client sees what the model wrote, and nothing raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from openai_stream_protocol import ToolCall, new_tool_call_id

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"

Piece = str | ToolCall
"""What the parser gives back: content text, or one whole tool call."""


class ToolCallParser:
    """Incremental: ``feed`` each decoded piece, ``flush`` at the end; both return content strings and ``ToolCall``s in order.

    ``max_calls`` (``parallel_tool_calls: false`` gives 1): later complete
    calls are dropped. Whitespace is held until text follows; whitespace
    that follows only calls (Qwen puts a line break between two calls and
    may end with one) is dropped. How the text is split into pieces does
    not change what comes out, apart from where content pieces break.
    """

    __slots__ = ("buffer", "inside", "calls", "max_calls", "new_id", "_blank", "_after_text")

    def __init__(self, *, max_calls: int | None = None, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self.buffer = ""
        self.inside = False
        self.calls = 0
        """Calls emitted so far."""
        self.max_calls = max_calls
        self.new_id = new_id
        self._blank = ""  # whitespace, held until text or a call follows
        self._after_text = False  # the last thing out was text (not a call): held whitespace belongs to it

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self.buffer += text
        while self.buffer:
            if self.inside:
                end = self.buffer.find(CLOSE_TAG)
                if end < 0:
                    break
                body, self.buffer = self.buffer[:end], self.buffer[end + len(CLOSE_TAG) :]
                self.inside = False
                self._close(body, out)
                continue
            start = self.buffer.find(OPEN_TAG)
            if start >= 0:
                self._content(self.buffer[:start], out)
                self.buffer = self.buffer[start + len(OPEN_TAG) :]
                self.inside = True
                continue
            keep = _partial_tag_length(self.buffer)
            self._content(self.buffer[: len(self.buffer) - keep], out)
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return out

    def flush(self) -> list[Piece]:
        """What is still held: an unclosed tag (as text, with its tag) or a partial tag at the end."""
        out: list[Piece] = []
        held, self.buffer = self.buffer, ""
        if self.inside:
            self.inside = False
            self._content(OPEN_TAG + held, out)
        else:
            self._content(held, out)
        if self._blank and (self._after_text or not self.calls):
            _append(out, self._blank)
        self._blank = ""
        return out

    def _close(self, body: str, out: list[Piece]) -> None:
        call = parse_call(body, self.new_id)
        if call is None:
            self._content(OPEN_TAG + body + CLOSE_TAG, out)
            return
        if self._after_text and self._blank:
            _append(out, self._blank)
        self._blank, self._after_text = "", False
        if self.max_calls is None or self.calls < self.max_calls:
            self.calls += 1
            out.append(call)

    def _content(self, text: str, out: list[Piece]) -> None:
        if not text:
            return
        if not text.strip():
            self._blank += text
            return
        _append(out, self._blank + text)
        self._blank, self._after_text = "", True


def _append(out: list[Piece], text: str) -> None:
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)


def parse_call(body: str, new_id: Callable[[], str] = new_tool_call_id) -> ToolCall | None:
    """A tag body as a call: a JSON object with a string ``name``; ``arguments`` an object (or JSON text); else ``None``."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_tag_length(text: str) -> int:
    """The length of the longest end of ``text`` that could begin ``<tool_call>`` (held until the next piece)."""
    for k in range(min(len(text), len(OPEN_TAG) - 1), 0, -1):
        if OPEN_TAG.startswith(text[-k:]):
            return k
    return 0
