"""What to answer one request with, decided once when it arrives: a ``Plan``.

The echo is the last user turn (or the trailing tool results), cut at the
first stop string and at ``max_tokens``; a request with ``tools`` whose last
user turn asks for calls is answered with those calls instead (``tools.py``).
The engines (``engine.py``, ``step.py``) only pace and send what the plan holds.

**Reasoning mode.** A last user turn that starts with ``<think>`` is echoed as a
thinking model answers: the text up to ``</think>`` is its reasoning (sent as
reasoning pieces, the tags left out), the rest its answer; with no ``</think>``
all of it is reasoning. A request whose ``reasoning`` entry turns reasoning off
(``effort: "none"``) gets the answer alone (docs/architecture.md, "Reasoning").

A request that continues an answer another replica started (``continue_from``,
docs/architecture.md, "Continuation") is planned as a fresh one and then
shortened by what was delivered: the plan holds only the rest, so the client
gets the same echo, word for word, as if nothing had happened. The echo is
deterministic, so the delivered text must be the start of it; anything else
cannot be continued and the plan says so (``error``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openai_stream_protocol import (
    TOOLS_KEY,
    Continuation,
    Part,
    as_bool,
    as_int,
    last_user_text,
    parse_request_texts,
    read_continuation,
    request_reasoning,
    split_tokens,
)

from .tools import Delta, call_deltas, requested_calls


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's whole answer, before anything is sent."""

    tokens: list[str]
    """The echo's word tokens (``split_tokens``: they join back to the exact text); when continuing, those not yet delivered."""
    limit: int
    """Tokens to send (``max_tokens`` may cut ``tokens``); in tool mode, the calls' argument tokens. It is the
    ``completion_tokens`` reported: a continuing node counts only what it sends."""
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
    exit_at: int | None = None
    """``ECHO_EXIT_ON``: the index of the first token holding that text; the node exits before sending it."""
    error: str | None = None
    """The request cannot be answered (a continuation that is not of this echo): one error chunk instead."""
    reasoning: int = 0
    """Reasoning mode: the first ``reasoning`` of ``tokens`` are reasoning pieces (a chunk never mixes the two)."""


def plan(texts: list[str], metadata: Mapping[str, Any], tokens_per_chunk: int = 1, exit_on: str | None = None) -> Plan:
    """The answer to a request of ``texts`` (its message parts) and ``metadata``; ``exit_on``: see ``Plan.exit_at``."""
    parts = parse_request_texts(texts)
    prompt_tokens = sum(len(split_tokens(part.content)) for part in parts if part.kind != "image")
    try:
        continuation = read_continuation(metadata)
    except ValueError as exc:
        return Plan([], 0, "error", prompt_tokens, 1, error=f"cannot continue the answer: {exc}")
    thought, answer = split_thinking(answer_text(parts))
    wish = request_reasoning(metadata) if thought else None
    if wish is not None and not wish.enabled:
        thought = ""
    text, stop_sequence = cut_at_stop(answer, metadata.get("stop"))
    reasoning_tokens = split_tokens(thought)
    tokens = reasoning_tokens + split_tokens(text)
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
    if TOOLS_KEY in metadata:  # only then: no cost for the others
        calls = requested_calls(parts, metadata)
        if calls:
            deltas, count = call_deltas(calls, tokens_per_chunk, whole=whole)
            per_chunk = max(limit, 1) if whole else tokens_per_chunk
            if continuation is not None:
                rest = _deltas_after(deltas, continuation)
                if rest is None:
                    return Plan([], 0, "error", prompt_tokens, 1, error=_NOT_THIS_ECHO)
                count -= sum(len(split_tokens(piece.text)) for piece in continuation.pieces)
                deltas = rest
            return Plan(tokens, count, "tool_calls", prompt_tokens, per_chunk, deltas=deltas)
    reasoning = min(len(reasoning_tokens), limit)
    if continuation is not None:
        rest = _tokens_after(tokens[:limit], continuation.text)
        if rest is None:
            return Plan([], 0, "error", prompt_tokens, 1, error=_NOT_THIS_ECHO)
        reasoning = _tokens_within(rest, len("".join(tokens[:reasoning])) - len(continuation.text))
        tokens, limit = rest, len(rest)
    per_chunk = max(limit, 1) if whole else tokens_per_chunk
    exit_at = _exit_at(tokens[:limit], exit_on) if exit_on else None
    return Plan(tokens, limit, finish_reason, prompt_tokens, per_chunk, stop_sequence, exit_at=exit_at, reasoning=reasoning)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(text: str) -> tuple[str, str]:
    """Reasoning mode: ``(reasoning, answer)`` of a text that starts with ``<think>``; ``("", text)`` otherwise."""
    if not text.startswith(THINK_OPEN):
        return "", text
    thought, closed, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return (thought, answer) if closed else (thought, "")


def _tokens_within(tokens: list[str], chars: int) -> int:
    """How many of ``tokens`` (from the first) lie within the first ``chars`` characters of their text."""
    count = at = 0
    for token in tokens:
        if at >= chars:
            break
        at += len(token)
        count += 1
    return count


_NOT_THIS_ECHO = "cannot continue the answer: the delivered pieces are not the start of this echo"


def _tokens_after(tokens: list[str], delivered: str) -> list[str] | None:
    """The tokens still to send after ``delivered`` (``None`` if it is not the start of ``tokens``).

    The echo's own chunks end on token boundaries; pieces cut elsewhere (another node's) leave the
    rest of a token, which goes first.
    """
    if not delivered:
        return tokens
    full = "".join(tokens)
    if not full.startswith(delivered):
        return None
    at = 0
    for i, token in enumerate(tokens):
        if at == len(delivered):
            return tokens[i:]
        if at + len(token) > len(delivered):
            return [full[len(delivered) : at + len(token)], *tokens[i + 1 :]]
        at += len(token)
    return []


def _deltas_after(deltas: list[Delta], continuation: Continuation) -> list[Delta] | None:
    """The tool-call chunks after those delivered (``None`` if the delivered ones are not this plan's first).

    The call ids differ between replicas (fresh each time), so only the index and arguments are compared.
    """
    if continuation.text:
        return None
    delivered = [piece for piece in continuation.pieces if piece.tool_call is not None]
    if len(delivered) > len(deltas):
        return None
    for delta, piece in zip(deltas, delivered, strict=False):
        if piece.tool_call is None or delta.index != piece.tool_call.index or delta.arguments != piece.text:
            return None
    return deltas[len(delivered) :]


def _exit_at(tokens: list[str], exit_on: str) -> int | None:
    """The index of the token where ``exit_on`` starts in the echo (``None``: not in it)."""
    found = "".join(tokens).find(exit_on)
    if found < 0:
        return None
    at = 0
    for i, token in enumerate(tokens):
        at += len(token)
        if at > found:
            return i
    return None


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
