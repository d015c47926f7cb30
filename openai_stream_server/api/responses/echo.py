"""The request fields a response object echoes back, kept on its completion's state (``StreamState.context``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...answer_log import utf8_len
from ...state import StreamState


@dataclass(frozen=True, slots=True)
class Echo:
    """The request fields a response object echoes back, kept on the state (``StreamState.context``)."""

    instructions: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool = True
    instruction_parts: int = 0
    """How many leading parts of ``StreamState.parts`` are the instructions (not carried over by a continuation)."""
    input_from: int = 0
    """Where this request's own input starts in ``StreamState.parts`` (after the instructions and what
    ``previous_response_id`` carried over): what ``GET .../input_items`` lists."""
    tools_json: str = "[]"
    """The request's function tools, Responses-shaped (``{"type": "function", "name", ...}``), as JSON text: kept
    encoded, as counted (a tools list held as Python objects took ~9 times its JSON in RSS; docs/architecture.md,
    "Memory bounds"), and parsed again only when a response object is rendered (``tools``)."""
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    reasoning_summary: str | None = None

    @property
    def tools(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = json.loads(self.tools_json)
        return tools

    @property
    def nbytes(self) -> int:
        """What it holds beyond the kept conversation (which counts the instructions), in encoded bytes, for the
        byte bounds (``StreamState.keep_context``): the tools' JSON and the metadata's keys and values."""
        return utf8_len(self.tools_json) + sum(utf8_len(k) + utf8_len(v) for k, v in self.metadata.items())


def echo_of(state: StreamState) -> Echo:
    """The echoed request fields of a response this surface opened."""
    echo = state.surface_data.context
    if isinstance(echo, Echo):
        return echo
    if isinstance(echo, dict):  # read back from a store, as JSON (store/snapshot.py)
        if "tools" in echo:  # written while the tools were kept as a list
            echo = {**echo, "tools_json": json.dumps(echo["tools"])}
            del echo["tools"]
        return Echo(**echo)
    return Echo()
