"""A small, strict-enough SSE parser for the reattach stream tests (unit, e2e, browser helpers).

Follows the WHATWG event-stream rules that matter here: ``id:``, ``data:``
(joined with newlines), ``retry:``, comment lines ignored, and a block without
``data:`` dispatches nothing (the server's opening ``retry:`` block).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    data: str
    id: str | None = None

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        assert isinstance(value, dict)
        return value

    @property
    def content(self) -> str:
        if self.done:
            return ""
        body = self.json()
        if not body.get("choices"):
            return ""
        return str(body["choices"][0]["delta"].get("content") or "")

    @property
    def seq(self) -> int | None:
        if self.done:
            return None
        value = self.json().get("sequence_number")
        return None if value is None else int(value)


@dataclass
class Parsed:
    events: list[Event]
    retry_ms: int | None

    @property
    def text(self) -> str:
        return "".join(e.content for e in self.events)

    @property
    def last_id(self) -> str | None:
        ids = [e.id for e in self.events if e.id is not None]
        return ids[-1] if ids else None

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].done


def parse(body: str) -> Parsed:
    """Parse a whole SSE body; an unterminated last block is ignored (as a browser does)."""
    events: list[Event] = []
    retry: int | None = None
    data: list[str] = []
    event_id: str | None = None
    for line in body.split("\n"):
        if line == "":
            if data:
                events.append(Event("\n".join(data), event_id))
            data, event_id = [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    return Parsed(events, retry)
