"""A thinking model's ``<think>…</think>`` output, read as the text streams: reasoning first, then the answer.

Qwen3 (and Qwen3-VL "thinking", DeepSeek-R1 and others) write their reasoning between ``<think>``
and ``</think>`` before the answer. Some chat templates open the tag in the prompt already, so the
output holds only ``</think>`` (``ThinkParser(inside=True)``). ``ThinkParser`` takes the decoded
pieces as they come and gives back ``(reasoning, text)`` runs: what lies inside the tags is
reasoning (tags left out), what follows is the answer (its leading whitespace dropped, as the
templates put a blank line after ``</think>``). A tag split across pieces, at any position, is
held back until it is whole; a ``<think>`` is recognised only at the very start of the output
(after whitespace); an unclosed one makes everything after it reasoning, to the end. How the
text is split into pieces does not change what comes out, apart from where runs break
(docs/architecture.md, "Reasoning").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

Run = tuple[bool, str]
"""``(reasoning, text)``: a stretch of reasoning (True) or of answer text (False)."""

_START, _REASONING, _ANSWER_START, _ANSWER = range(4)


class ThinkParser:
    """Incremental: ``feed`` each decoded piece, ``flush`` at the end; both return ``Run``s in order (none empty)."""

    __slots__ = ("state", "buffer")

    def __init__(self, *, inside: bool = False) -> None:
        self.state = _REASONING if inside else _START
        """Where the output is: before anything but whitespace, in the reasoning, just past ``</think>``, in the answer."""
        self.buffer = ""
        """Text held back: the start of the output while it may still be ``<think>``, or what may begin ``</think>``."""

    @property
    def reasoning(self) -> bool:
        """Whether the output is inside the reasoning now."""
        return self.state == _REASONING

    def feed(self, text: str) -> list[Run]:
        out: list[Run] = []
        if self.state == _ANSWER:  # the common case once the reasoning is over: straight through
            if text:
                out.append((False, text))
            return out
        self.buffer += text
        while self.buffer:
            buffer = self.buffer
            if self.state == _START:
                head = buffer.lstrip()
                if head.startswith(OPEN_TAG):
                    self.buffer, self.state = head[len(OPEN_TAG) :], _REASONING
                    continue
                if OPEN_TAG.startswith(head):  # whitespace, or a tag not yet whole: wait
                    break
                self.buffer, self.state = "", _ANSWER
                out.append((False, buffer))
                break
            if self.state == _REASONING:
                end = buffer.find(CLOSE_TAG)
                if end >= 0:
                    _add(out, True, buffer[:end])
                    self.buffer, self.state = buffer[end + len(CLOSE_TAG) :], _ANSWER_START
                    continue
                keep = _partial_close_length(buffer)
                _add(out, True, buffer[: len(buffer) - keep])
                self.buffer = buffer[len(buffer) - keep :]
                break
            # _ANSWER_START: drop the whitespace the template puts after </think>
            answer = buffer.lstrip()
            self.buffer = ""
            if answer:
                self.state = _ANSWER
                out.append((False, answer))
            break
        return out

    def flush(self) -> list[Run]:
        """What is still held: a partial tag (reasoning inside the reasoning), or an output that never began a tag (text)."""
        held, self.buffer = self.buffer, ""
        if not held:
            return []
        if self.state == _REASONING:
            return [(True, held)]
        self.state = _ANSWER  # before the start: an output of whitespace, or the start of a tag, is the answer
        return [(False, held)]


def _add(out: list[Run], reasoning: bool, text: str) -> None:
    if text:
        out.append((reasoning, text))


def _partial_close_length(text: str) -> int:
    """The length of the longest end of ``text`` that could begin ``</think>`` (held until the next piece)."""
    for k in range(min(len(text), len(CLOSE_TAG) - 1), 0, -1):
        if CLOSE_TAG.startswith(text[-k:]):
            return k
    return 0


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` (the template started the reasoning itself)."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN_TAG)


def _template_has(template: Any, word: str) -> bool:
    if isinstance(template, Mapping):  # a dict of named templates
        return any(_template_has(value, word) for value in template.values())
    return isinstance(template, str) and word in template


def template_thinks(template: Any) -> bool:
    """Whether a chat template (a string, or a dict of named ones) knows ``<think>``: the model may reason in it."""
    return _template_has(template, OPEN_TAG)


def takes_enable_thinking(template: Any) -> bool:
    """Whether a chat template reads ``enable_thinking`` (Qwen3's): the request's reasoning wish is passed to it."""
    return _template_has(template, "enable_thinking")
