"""Continuation: a replica answers the rest of a request another replica started.

When the replica serving a request dies after the client has had part of the
answer, the server re-sends the request to another replica that said
``can_continue`` in its hello, with what was already delivered
(docs/architecture.md, "Dora wire protocol", "Continuation"). Two request
metadata keys, added to the request's own (seed, sampling, tools unchanged):

- ``continue_from`` (int): how many pieces the client already has. A piece is
  one chunk of the answer as the server logged it: answer text, or a piece of a
  tool call's arguments. It is also the ``seq`` of the continuing node's first
  chunk: the node numbers on from it (``ChunkSender`` and ``BatchSender.open``
  start there by themselves), so the answer keeps one numbering.
- ``continued_pieces`` (JSON text): those pieces, in order; a string is answer
  text, an object ``{"text", "tool_call_index", "tool_call_id"?,
  "tool_call_name"?}`` a tool-call piece (the chunk keys of "Tool calls"), and
  ``{"text", "kind": "reasoning"}`` a piece of the model's reasoning.

The node answers only what comes after them: no piece again, nothing left out.
``completion_tokens`` on its finish chunk counts the tokens *it* generated (the
server adds the delivered ones); ``prompt_tokens`` counts the request's prompt
alone, as for a fresh request. A request without ``continue_from`` (or with 0)
is a fresh one. These keys are apart from any later lost-chunk ``resend``
message: they ride on a request, never on a chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._reasoning import KIND_KEY, REASONING
from ._tools import TOOL_CALL_ID_KEY, TOOL_CALL_INDEX_KEY, TOOL_CALL_NAME_KEY, ToolCall, ToolCallDelta
from ._wire import as_int

CONTINUE_FROM_KEY = "continue_from"
"""Request metadata, int: pieces the client already has; the continuing node's first ``seq``."""
CONTINUED_PIECES_KEY = "continued_pieces"
"""Request metadata, JSON text: those pieces (a string: answer text; an object: a tool-call piece)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One delivered piece: answer text, reasoning (``reasoning``), or (``tool_call`` set) a piece of that call's arguments."""

    text: str
    tool_call: ToolCallDelta | None = None
    reasoning: bool = False

    def to_json(self) -> str | dict[str, Any]:
        delta = self.tool_call
        if delta is None:
            return {"text": self.text, KIND_KEY: REASONING} if self.reasoning else self.text
        item: dict[str, Any] = {"text": self.text, TOOL_CALL_INDEX_KEY: delta.index}
        if delta.id:
            item[TOOL_CALL_ID_KEY] = delta.id
        if delta.name:
            item[TOOL_CALL_NAME_KEY] = delta.name
        return item


@dataclass(frozen=True, slots=True)
class Continuation:
    """What the client already has of the answer a node is asked to continue."""

    pieces: tuple[Piece, ...]

    @classmethod
    def of(cls, pieces: Iterable[str | Piece | tuple[str, ToolCallDelta | None]]) -> Continuation:
        """From texts, ``Piece``s or ``(text, tool_call)`` pairs (the server's answer log)."""
        out = []
        for piece in pieces:
            if isinstance(piece, Piece):
                out.append(piece)
            elif isinstance(piece, str):
                out.append(Piece(piece))
            else:
                out.append(Piece(piece[0], piece[1]))
        return cls(tuple(out))

    @property
    def count(self) -> int:
        """``continue_from``: the pieces delivered, and the next chunk's ``seq``."""
        return len(self.pieces)

    @property
    def text(self) -> str:
        """The text delivered, reasoning included, tool-call pieces left out: what the model wrote outside its calls,
        which the node's answer must go on from."""
        return "".join(piece.text for piece in self.pieces if piece.tool_call is None)

    @property
    def texts(self) -> list[str]:
        """The text pieces (reasoning included), one string each, in order (a model node re-encodes them one by one)."""
        return [piece.text for piece in self.pieces if piece.tool_call is None]

    def calls(self) -> list[ToolCall]:
        """The tool calls delivered, in index order: id and name from their pieces, the arguments so far.

        A call whose last pieces had not been delivered has partial arguments; one with no id gets ``""``.
        """
        found: dict[int, list[Any]] = {}
        for piece in self.pieces:
            delta = piece.tool_call
            if delta is None:
                continue
            call = found.setdefault(delta.index, [None, None, []])
            call[0] = call[0] or delta.id
            call[1] = call[1] or delta.name
            call[2].append(piece.text)
        return [ToolCall(call_id or "", name or "", "".join(args)) for _, (call_id, name, args) in sorted(found.items())]

    def to_metadata(self) -> dict[str, Any]:
        """The request metadata entries (merge them into the request's own): ``continue_from``, ``continued_pieces``."""
        return {
            CONTINUE_FROM_KEY: self.count,
            CONTINUED_PIECES_KEY: json.dumps([piece.to_json() for piece in self.pieces], ensure_ascii=False),
        }


def continue_from(metadata: Mapping[str, Any]) -> int:
    """The request's ``continue_from`` (0 for a fresh request, or a value that is not a count): the first ``seq`` to send."""
    try:
        count = as_int(metadata.get(CONTINUE_FROM_KEY))
    except ValueError:
        return 0
    return count if count is not None and count > 0 else 0


def read_continuation(metadata: Mapping[str, Any]) -> Continuation | None:
    """The pieces a request asks a node to continue after; ``None`` for a fresh request.

    ``ValueError`` when the keys disagree or do not parse: the node must then end the request with an
    error rather than answer from the start, which would repeat what the client already has.
    """
    raw_count = metadata.get(CONTINUE_FROM_KEY)
    if raw_count is None:
        return None
    count = as_int(raw_count)
    if count is None or count < 0:
        raise ValueError(f"{CONTINUE_FROM_KEY} must be a count, got {raw_count!r}")
    if count == 0:
        return None
    raw = metadata.get(CONTINUED_PIECES_KEY)
    try:
        items = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        items = None
    if not isinstance(items, list):
        raise ValueError(f"{CONTINUED_PIECES_KEY} must be the JSON list of the {count} delivered pieces")
    if len(items) != count:
        raise ValueError(f"{CONTINUE_FROM_KEY} is {count} but {CONTINUED_PIECES_KEY} holds {len(items)} pieces")
    return Continuation(tuple(_piece(item, i) for i, item in enumerate(items)))


def _piece(item: Any, position: int) -> Piece:
    if isinstance(item, str):
        return Piece(item)
    if isinstance(item, Mapping) and isinstance(item.get("text"), str) and item.get(KIND_KEY) == REASONING:
        return Piece(item["text"], reasoning=True)
    if isinstance(item, Mapping) and isinstance(item.get("text"), str):
        index = item.get(TOOL_CALL_INDEX_KEY)
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            delta = ToolCallDelta(index, _name(item.get(TOOL_CALL_ID_KEY)), _name(item.get(TOOL_CALL_NAME_KEY)))
            return Piece(item["text"], delta)
    raise ValueError(f"{CONTINUED_PIECES_KEY}[{position}] is neither a text nor a tool-call piece: {str(item)[:80]!r}")


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
