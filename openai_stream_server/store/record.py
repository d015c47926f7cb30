"""One completion as a plain record, and its compact encoding (orjson).

A record is what a store keeps of one completion: enough to render it again on any surface, to
continue its conversation (``previous_response_id``) and to list its input (``input_items``) from
another process or after a restart. It holds no live objects: the answer log (``pieces``, the
tool-call deltas by piece index), the end (status, finish reason, stop sequence, error), the usage
counts, the request's parts and an opaque ``context`` (JSON-able: what the surface that opened it
needs to render it again, such as the Responses fields it echoes back).

The encoding is one orjson object with short keys, fields at their default left out, so that a
short stored response costs little more than its text (docs/store.md, "Bytes per record").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from openai_stream_protocol import Part, ToolCallDelta

FORMAT_VERSION = 1
"""Written in every record (``v``); a reader refuses a record of a later version rather than misread it."""

IN_PROGRESS = "in_progress"
COMPLETED = "completed"
CANCELLED = "cancelled"
FAILED = "failed"
STATUSES = (IN_PROGRESS, COMPLETED, CANCELLED, FAILED)
"""The values of ``CompletionRecord.status``: the values of ``state.Status``, as plain strings."""

RESTARTED_MESSAGE = "the server restarted while this completion was in flight"
"""The error a record left ``in_progress`` by a process that is gone reads with (docs/store.md, "Failures")."""
RESTARTED_CODE = "server_restarted"


class RecordFormatError(ValueError):
    """Bytes that are not a record this version can read."""


@dataclass(frozen=True, slots=True)
class RecordError:
    """An OpenAI error object's fields, as a failed completion ended with."""

    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None


@dataclass(slots=True)
class CompletionRecord:
    """One completion, opened (``status == "in_progress"``, no pieces yet) or ended."""

    id: str
    surface: str
    model: str
    created: int
    status: str = IN_PROGRESS
    finish_reason: str | None = None
    stop_sequence: str | None = None
    error: RecordError | None = None
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    pieces: list[str] = field(default_factory=list)
    """The answer log in order: ``pieces[i]`` is the text of ``seq == i`` (docs/architecture.md, "Room 2: stream state")."""
    tool_calls: dict[int, ToolCallDelta] = field(default_factory=dict)
    """Piece index -> the tool call that piece is an argument delta of; every other piece is answer text or reasoning."""
    reasoning: list[int] = field(default_factory=list)
    """The indices of the pieces that are reasoning, in order (docs/architecture.md, "Reasoning")."""
    reasoning_tokens: int | None = None
    """The node's count of reasoning tokens, when it gave one."""
    parts: list[Part] = field(default_factory=list)
    """The request's conversation as sent downstream (kept when the surface keeps it: Responses)."""
    context: dict[str, Any] | None = None
    """Opaque to the store: JSON-able fields the surface that opened it needs to render it again."""
    stored: bool = False
    """A Responses ``store: true`` response: kept for the stored-response TTL, not the completion TTL."""
    expires_at: float = 0.0
    """Unix time after which the record reads as missing; 0 until a store sets it from its TTLs."""
    instance: str = ""
    """The id of the server process that ran it: a record left ``in_progress`` by an instance that is not
    alive any more reads ``failed`` (``settled``)."""
    owner: str | None = None
    """The name of the API key that made it (docs/team.md, "Ownership"); None without a key file."""
    service_tier: str | None = None
    """The tier it was served at (docs/team.md, "Queue and tiers"), which its answers name."""

    @property
    def ended(self) -> bool:
        return self.status != IN_PROGRESS

    def settled(self) -> CompletionRecord:
        """This record as one whose process died: ``failed`` with ``RESTARTED_MESSAGE`` if it was in flight."""
        if self.ended:
            return self
        return dataclasses.replace(
            self,
            status=FAILED,
            finish_reason="error",
            error=RecordError(RESTARTED_MESSAGE, "server_error", RESTARTED_CODE),
        )


def encode(record: CompletionRecord) -> bytes:
    """The record as compact JSON bytes (defaults left out)."""
    r = record
    out: dict[str, Any] = {"v": FORMAT_VERSION, "id": r.id, "s": r.surface, "m": r.model, "c": r.created, "st": r.status}
    if r.finish_reason is not None:
        out["f"] = r.finish_reason
    if r.stop_sequence is not None:
        out["ss"] = r.stop_sequence
    if r.error is not None:
        out["e"] = [r.error.message, r.error.type, r.error.code, r.error.param]
    if r.prompt_tokens:
        out["pt"] = r.prompt_tokens
    if r.completion_tokens is not None:
        out["ct"] = r.completion_tokens
    if r.pieces:
        out["p"] = r.pieces
    if r.tool_calls:
        out["t"] = [[i, d.index, d.id, d.name] for i, d in r.tool_calls.items()]
    if r.reasoning:
        out["rs"] = r.reasoning
    if r.reasoning_tokens is not None:
        out["rt"] = r.reasoning_tokens
    if r.parts:
        out["r"] = [
            [p.role, p.kind, p.content] if p.tool_call_id is None else [p.role, p.kind, p.content, p.tool_call_id]
            for p in r.parts
        ]
    if r.context is not None:
        out["x"] = r.context
    if r.stored:
        out["sd"] = 1
    if r.expires_at:
        out["ex"] = r.expires_at
    if r.instance:
        out["i"] = r.instance
    if r.owner is not None:
        out["o"] = r.owner
    if r.service_tier is not None:
        out["tr"] = r.service_tier
    return orjson.dumps(out)


def decode(data: bytes | str) -> CompletionRecord:
    """The record ``encode`` wrote; ``RecordFormatError`` for anything else."""
    try:
        d = orjson.loads(data)
        if not isinstance(d, dict):
            raise TypeError("not an object")
        version = d.get("v")
        if version != FORMAT_VERSION:
            raise RecordFormatError(f"record format {version!r}, this server reads {FORMAT_VERSION}")
        status = d["st"]
        if status not in STATUSES:
            raise ValueError(f"status {status!r}")
        error = d.get("e")
        return CompletionRecord(
            id=d["id"],
            surface=d["s"],
            model=d["m"],
            created=int(d["c"]),
            status=status,
            finish_reason=d.get("f"),
            stop_sequence=d.get("ss"),
            error=None if error is None else RecordError(*error),
            prompt_tokens=int(d.get("pt", 0)),
            completion_tokens=d.get("ct"),
            pieces=list(d.get("p", ())),
            tool_calls={int(i): ToolCallDelta(index, cid, name) for i, index, cid, name in d.get("t", ())},
            reasoning=[int(i) for i in d.get("rs", ())],
            reasoning_tokens=d.get("rt"),
            parts=[Part(*p) for p in d.get("r", ())],
            context=d.get("x"),
            stored=bool(d.get("sd", 0)),
            expires_at=float(d.get("ex", 0.0)),
            instance=d.get("i", ""),
            owner=d.get("o"),
            service_tier=d.get("tr"),
        )
    except RecordFormatError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RecordFormatError(f"not a completion record: {exc}") from exc


def expired(record: CompletionRecord, now: float | None = None) -> bool:
    return bool(record.expires_at) and record.expires_at <= (time.time() if now is None else now)
