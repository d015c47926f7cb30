"""The answer log: what a completion answered, in order, as plain data.

Every surface renders it, and it is what a store persists and shares between processes
(docs/architecture.md, "Room 2: stream state").
"""

from __future__ import annotations


def fallback_call_id(request_id: str, index: int) -> str:
    """The id of tool call ``index`` when the node named none: stable per completion, so every read agrees."""
    return f"call_{request_id[-8:]}_{index}"
