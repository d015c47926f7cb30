"""What to answer one request with, decided once when it arrives: a ``Plan``.

The echo is the last user turn (or the trailing tool results), cut at the
first stop string and at ``max_tokens``; a request with ``tools`` whose last
user turn asks for calls is answered with those calls instead (``tools.py``).
The engines (``engine.py``, ``step.py``) only pace and send what the plan holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openai_stream_protocol import TOOLS_KEY, Part, as_bool, as_int, last_user_text, parse_request_texts, split_tokens

from .tools import Delta, call_deltas, requested_calls


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's whole answer, before anything is sent."""

    tokens: list[str]
    """The echo's word tokens (``split_tokens``: they join back to the exact text)."""
    limit: int
    """Tokens to send (``max_tokens`` may cut ``tokens``); in tool mode, the calls' argument tokens."""
    finish_reason: str
    """``stop``, ``length`` or ``tool_calls``."""
    prompt_tokens: int
    """``split_tokens`` over every text part of the request."""
    tokens_per_chunk: int
    """Tokens per chunk: the setting, or all of them when nobody watches the answer arrive (``stream: false``)."""
    stop_sequence: str | None = None
    """The stop string that cut ``tokens``: the ``stop`` finish chunk names it."""
    deltas: list[Delta] | None = None
    """Tool mode: the tool-call chunks to send instead of ``tokens``, then a ``tool_calls`` finish."""


def plan(texts: list[str], metadata: Mapping[str, Any], tokens_per_chunk: int = 1) -> Plan:
    """The answer to a request of ``texts`` (its message parts) and ``metadata``."""
    parts = parse_request_texts(texts)
    prompt_tokens = sum(len(split_tokens(part.content)) for part in parts if part.kind != "image")
    text, stop_sequence = cut_at_stop(answer_text(parts), metadata.get("stop"))
    tokens = split_tokens(text)
    try:
        max_tokens = as_int(metadata.get("max_tokens"))
    except ValueError:
        # dora turns a None metadata value into the string "None": read as unset.
        max_tokens = None
    if max_tokens is not None and 0 < max_tokens < len(tokens):
        limit, finish_reason, stop_sequence = max_tokens, "length", None
    else:
        limit, finish_reason = len(tokens), "stop"
    # Nobody watches a non-streaming answer arrive: send it whole, as one message, after the
    # same delay (a model node would too; it saves a dora message per token).
    whole = "stream" in metadata and not as_bool(metadata["stream"])
    per_chunk = max(limit, 1) if whole else tokens_per_chunk
    if TOOLS_KEY in metadata:  # only then: no cost for the others
        calls = requested_calls(parts, metadata)
        if calls:
            deltas, count = call_deltas(calls, tokens_per_chunk, whole=whole)
            return Plan(tokens, count, "tool_calls", prompt_tokens, per_chunk, deltas=deltas)
    return Plan(tokens, limit, finish_reason, prompt_tokens, per_chunk, stop_sequence)


def answer_text(parts: list[Part]) -> str:
    """What to echo: the trailing tool results' text when the conversation ends with them, else the last user turn."""
    results: list[str] = []
    for part in reversed(parts):
        if part.role != "tool":
            break
        results.append(part.content)
    return "\n".join(reversed(results)) if results else last_user_text(parts)


def cut_at_stop(text: str, stop: Any) -> tuple[str, str | None]:
    """OpenAI ``stop``: the answer ends before the first stop sequence, which is not sent.

    Returns the text and the stop sequence that cut it (``None``: none did). The first is the one
    found earliest in the text; of two found at the same place, the shorter, which a model streaming
    the text would have completed first.
    """
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cuts = [(text.find(s), len(s), s) for s in sequences if isinstance(s, str) and s]
    found = [cut for cut in cuts if cut[0] >= 0]
    if not found:
        return text, None
    at, _, sequence = min(found)
    return text[:at], sequence
