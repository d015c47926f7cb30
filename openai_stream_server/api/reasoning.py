"""The request side of reasoning, for every surface: what the client asked of the model's reasoning, as one metadata entry.

Chat's ``reasoning_effort``, the Responses API's ``reasoning.effort`` and Anthropic's ``thinking`` all
reach the node as the protocol's one ``reasoning`` entry (``ReasoningRequest``), which a node that cannot
reason ignores (docs/architecture.md, "Reasoning").
"""

from __future__ import annotations

from typing import Any, Literal

from openai_stream_protocol import ReasoningRequest

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
"""OpenAI's efforts (``openai_stream_protocol.REASONING_EFFORTS``); ``none`` turns reasoning off."""


def reasoning_metadata(wish: ReasoningRequest | None) -> dict[str, Any]:
    """The request metadata entry for ``wish``; nothing when the client said nothing."""
    return {} if wish is None else wish.to_metadata()
