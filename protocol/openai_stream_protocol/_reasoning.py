"""Reasoning: the pieces a thinking model streams before (or between) its answer, and the request's wish for them.

docs/architecture.md, "Dora wire protocol", "Reasoning". Two additions, both ignored by nodes and
servers that do not know them:

- **Chunks.** A chunk whose metadata has ``kind: "reasoning"`` (a batch row whose ``kind`` column
  says so) is a piece of the model's reasoning, not of its answer. A finish chunk may carry
  ``reasoning_tokens`` (int): how many of its ``completion_tokens`` were reasoning.
- **Request.** ``reasoning`` (JSON text): what the client asked of the model's reasoning, whichever
  surface it came through (chat ``reasoning_effort``, Responses ``reasoning.effort``, Anthropic
  ``thinking``). ``request_reasoning`` reads it and never raises; a node that cannot reason
  ignores it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KIND_KEY = "kind"
"""Chunk metadata (and batch column), str: what the chunk's text is. Absent, ``""`` or ``"text"``: answer text."""
REASONING = "reasoning"
"""The ``kind`` of a reasoning piece."""
TEXT = "text"
PIECE_KINDS = frozenset({TEXT, REASONING})

REASONING_TOKENS_KEY = "reasoning_tokens"
"""Finish-chunk metadata, int: the reasoning tokens among ``completion_tokens`` (else the server counts its pieces)."""

REASONING_KEY = "reasoning"
"""Request metadata, JSON text: ``{"effort": …}`` and/or ``{"budget_tokens": …}``; ``{"effort": "none"}`` asks for no
reasoning, ``{}`` for the model's own default. Absent: the client said nothing."""

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
"""The efforts OpenAI's ``reasoning_effort`` / ``reasoning.effort`` name; ``none`` turns reasoning off."""


def is_reasoning(kind: Any) -> bool:
    """Whether a chunk's ``kind`` marks reasoning; ``ValueError`` for a kind this protocol does not know.

    Lenient as the other readers: ``None``, ``""`` and dora's ``"None"`` mean text.
    """
    if kind is None or kind == TEXT or kind == "" or kind == "None":
        return False
    if kind == REASONING:
        return True
    raise ValueError(f"unknown chunk kind: {kind!r}")


@dataclass(frozen=True, slots=True)
class ReasoningRequest:
    """What a request asked of the model's reasoning.

    ``effort``: one of ``REASONING_EFFORTS`` (or another word a newer client sends), None when not said.
    ``budget_tokens``: Anthropic's thinking budget, None when not said.
    """

    effort: str | None = None
    budget_tokens: int | None = None

    @property
    def enabled(self) -> bool:
        """False only when the client turned reasoning off (``effort: "none"``, Anthropic ``thinking.type: disabled``)."""
        return self.effort != "none"

    def to_metadata(self) -> dict[str, str]:
        """The request metadata entry (merge it into the request's own)."""
        value: dict[str, Any] = {}
        if self.effort is not None:
            value["effort"] = self.effort
        if self.budget_tokens is not None:
            value["budget_tokens"] = self.budget_tokens
        return {REASONING_KEY: json.dumps(value, separators=(",", ":"))}


def request_reasoning(metadata: Mapping[str, Any]) -> ReasoningRequest | None:
    """The request's reasoning wish; None when it has none (or one that does not parse). Never raises."""
    raw = metadata.get(REASONING_KEY)
    if not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    effort = value.get("effort")
    budget = value.get("budget_tokens")
    return ReasoningRequest(
        effort if isinstance(effort, str) and effort else None,
        budget if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0 else None,
    )
