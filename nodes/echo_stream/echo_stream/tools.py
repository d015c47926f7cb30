"""Tool mode: a request with ``tools`` whose last user text is ``call <name> <json object>`` lines gets those calls.

Deterministic, for tests and demos of tool calling without a model. Every
non-blank line of the last user turn must read ``call <name> <json object>``
with ``<name>`` one of the tools the request allows (``allowed_tools``:
``tool_choice: "none"`` allows none); otherwise the text is echoed as usual.
Each line becomes one call, in order (index 0, 1, ...; only the first with
``parallel_tool_calls: false``), with a fresh id (``call_`` + 12 hex digits)
and its arguments re-serialised by ``json.dumps`` and streamed as word
tokens, ``ECHO_TOKENS_PER_CHUNK`` per chunk; the answer ends with
``finish_reason: tool_calls``. A conversation that ends with a tool result is
never answered with calls (the result's text is echoed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from openai_stream_protocol import (
    TOOLS_KEY,
    Part,
    ToolCall,
    allowed_tools,
    last_user_text,
    new_tool_call_id,
    request_parallel_tool_calls,
    split_tokens,
    tool_name,
)

_CALL_LINE = re.compile(r"call\s+(\S+)\s+(\{.*\})")


class Delta(NamedTuple):
    """One tool-call chunk: the call's index, a piece of its arguments, and on its first chunk its id and name."""

    index: int
    arguments: str
    call_id: str | None = None
    name: str | None = None


def requested_calls(parts: list[Part], metadata: Mapping[str, Any]) -> list[ToolCall]:
    """The calls the last user turn asks for, or ``[]`` to echo as text."""
    if TOOLS_KEY not in metadata or not parts or parts[-1].role == "tool":
        return []
    names = {tool_name(tool) for tool in allowed_tools(metadata)}
    lines = [line.strip() for line in last_user_text(parts).splitlines() if line.strip()]
    calls = []
    for line in lines:
        match = _CALL_LINE.fullmatch(line)
        if match is None or match[1] not in names:
            return []
        try:
            arguments = json.loads(match[2])
        except ValueError:
            return []
        if not isinstance(arguments, dict):
            return []
        calls.append(ToolCall(new_tool_call_id(), match[1], json.dumps(arguments, ensure_ascii=False)))
    return calls if request_parallel_tool_calls(metadata) else calls[:1]


def call_deltas(calls: list[ToolCall], tokens_per_chunk: int, *, whole: bool = False) -> tuple[list[Delta], int]:
    """The chunks that stream ``calls`` and their argument token count; ``whole``: one chunk per call."""
    deltas: list[Delta] = []
    count = 0
    for index, call in enumerate(calls):
        tokens = split_tokens(call.arguments)
        count += len(tokens)
        step = max(len(tokens), 1) if whole else tokens_per_chunk
        pieces = ["".join(tokens[i : i + step]) for i in range(0, len(tokens), step)] or [""]
        deltas.append(Delta(index, pieces[0], call.id, call.name))
        deltas.extend(Delta(index, piece) for piece in pieces[1:])
    return deltas, count
