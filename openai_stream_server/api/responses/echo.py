"""The request fields a response object echoes back, kept on its completion's state (``StreamState.context``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The request's function tools, Responses-shaped (``{"type": "function", "name", ...}``)."""
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    reasoning_summary: str | None = None


def echo_of(state: StreamState) -> Echo:
    """The echoed request fields of a response this surface opened."""
    echo = state.surface_data.context
    if isinstance(echo, Echo):
        return echo
    if isinstance(echo, dict):  # read back from a store, as JSON (store/snapshot.py)
        return Echo(**echo)
    return Echo()
