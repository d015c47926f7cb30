"""Which key a request came with, for the code under the routes: completions belong to the key that made them.

``KeyGate`` sets ``CURRENT_KEY`` for the request it lets in; the route runs in the same task, so the
dispatcher (which stamps a new completion with the key's name) and the registry's by-id lookup (which
hides another key's completions) read it without any route passing it along (docs/team.md, "Ownership").
Unset (no key file): every completion is everyone's, as before.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..state import StreamState
    from .keys import ApiKey
    from .ratelimit import KeyUsage


@dataclass(slots=True)
class KeyContext:
    """One request's key: its name, its usage (None for the key the file does not list), what it opened."""

    name: str
    usage: KeyUsage | None = None
    opened: list[StreamState] = field(default_factory=list)
    key: ApiKey | None = None
    """The key itself: its tiers and queue bound (``gateway/queue.py``)."""


CURRENT_KEY: ContextVar[KeyContext | None] = ContextVar("oss_current_key", default=None)


def stamp(state: StreamState) -> None:
    """A completion the current request opened: it belongs to the request's key (no key: to no one)."""
    context = CURRENT_KEY.get()
    if context is not None:
        state.owner = context.name
        context.opened.append(state)


def visible(state: StreamState) -> bool:
    """Whether the current request may see ``state``: with keys, only the key that made it may."""
    context = CURRENT_KEY.get()
    return context is None or state.owner == context.name
