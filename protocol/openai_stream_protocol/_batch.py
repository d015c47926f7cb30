"""The batch form: one dora message carrying one chunk for each of many requests.

dora's Python receive costs ~17 us per message whatever it carries
(docs/architecture.md, "Facts measured"), so a batched engine that produces
one token for every active sequence per step sends that step as ONE message:
a pyarrow ``StructArray`` with one row per chunk (docs/architecture.md,
"Dora wire protocol", "Batch form").

A receiver tells it from a single chunk by the array's type alone (struct,
where a single chunk is a string array), so no metadata flag is needed and
the message's metadata is left empty. Every column is built with an explicit
type: ``pa.array`` without one costs ~46 us against ~3 us (docs/architecture.md,
"Facts measured").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ._chunk import BUSY, FINISH_REASONS, Chunk, OutputSender
from ._continuation import continue_from
from ._reasoning import REASONING, is_reasoning
from ._servers import reply_output
from ._tools import ToolCallDelta, checked_tool_call_index
from ._wire import request_id_of

REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "request_id": pa.string(),
    "seq": pa.int64(),
    "text": pa.string(),
    "fin": pa.bool_(),
}
"""Columns every batch has, never null."""

OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "finish_reason": pa.string(),
    "error": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "sent_at": pa.float64(),
    "tool_call_index": pa.int64(),
    "tool_call_id": pa.string(),
    "tool_call_name": pa.string(),
    "stop_sequence": pa.string(),
    "error_code": pa.string(),
    "kind": pa.string(),
    "reasoning_tokens": pa.int64(),
}
"""Columns a batch may leave out, nullable: null means "not given" for that row.

A row with a ``tool_call_index`` is a tool-call delta (its ``text`` a piece of the arguments).
``stop_sequence`` (read on ``fin`` rows only): the stop string that ended that answer.
``error_code`` (read on ``fin`` rows with an ``error`` only): ``busy`` when the node turned the request away.
``kind``: ``reasoning`` on a row that is a piece of the model's reasoning (null or ``text``: answer text).
``reasoning_tokens`` (read on ``fin`` rows only): how many of ``completion_tokens`` were reasoning.
"""


def is_batch(value: pa.Array) -> bool:
    """True for the batch form (a struct array); a single chunk is a string array."""
    return isinstance(value, pa.StructArray)


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_float(t: pa.DataType) -> bool:
    return bool(pa.types.is_floating(t) or pa.types.is_integer(t))


_TYPE_CHECKS = {
    "request_id": (_is_string, "a string"),
    "seq": (pa.types.is_integer, "an integer"),
    "text": (_is_string, "a string"),
    "fin": (pa.types.is_boolean, "a boolean"),
    "finish_reason": (_is_string, "a string"),
    "error": (_is_string, "a string"),
    "prompt_tokens": (pa.types.is_integer, "an integer"),
    "completion_tokens": (pa.types.is_integer, "an integer"),
    "sent_at": (_is_float, "a number"),
    "tool_call_index": (pa.types.is_integer, "an integer"),
    "tool_call_id": (_is_string, "a string"),
    "tool_call_name": (_is_string, "a string"),
    "stop_sequence": (_is_string, "a string"),
    "error_code": (_is_string, "a string"),
    "kind": (_is_string, "a string"),
    "reasoning_tokens": (pa.types.is_integer, "an integer"),
}

_SPARSE_COLUMNS = frozenset({"stop_sequence", "error_code", "kind", "reasoning_tokens"})
"""Optional columns that are null on almost every row: read after the rows are built, and only when
some row has a value, so that a batch without them costs nothing more per row."""


def parse_batch(value: pa.Array) -> list[Chunk]:
    """The chunks of a batch message, in row order; ``ValueError`` for a malformed batch.

    Reads column by column (one ``to_pylist`` each), never a scalar per row:
    that is what keeps a 1,000-row message cheaper than 1,000 messages.
    Malformed: not a struct array, a required column missing or null, a column
    of the wrong type, a null row, an unknown ``finish_reason``, a negative
    ``tool_call_index``, a ``tool_call_id``/``tool_call_name`` on a row
    without a ``tool_call_index``, or an unknown ``kind``. A ``stop_sequence`` on a row that is not
    ``fin`` is ignored (empty: none). One bad row
    makes the whole message malformed: its rows arrive together or not at all.
    """
    if not isinstance(value, pa.StructArray):
        raise ValueError(f"a batch is a struct array, got {value.type}")
    if value.null_count:
        raise ValueError(f"{value.null_count} null row(s) in a batch")
    struct_type = value.type
    names = {struct_type.field(i).name for i in range(struct_type.num_fields)}
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ValueError(f"batch without column(s) {', '.join(missing)}")
    columns: dict[str, list[Any]] = {}
    n = len(value)
    sparse: dict[str, pa.Array] = {}
    for name, (check, expected) in _TYPE_CHECKS.items():
        if name not in names:
            if name not in _SPARSE_COLUMNS:
                columns[name] = [None] * n
            continue
        column = value.field(name)
        if not check(column.type):
            raise ValueError(f"batch column {name} must be {expected}, got {column.type}")
        if name in REQUIRED_COLUMNS and column.null_count:
            raise ValueError(f"batch column {name} has {column.null_count} null(s)")
        if name in _SPARSE_COLUMNS:
            if column.null_count < n:
                sparse[name] = column
            continue
        columns[name] = column.to_pylist()
    unknown = {reason for reason in columns["finish_reason"] if reason} - FINISH_REASONS
    if unknown:
        raise ValueError(f"unknown finish_reason: {sorted(unknown)!r}")
    tool_calls = _tool_calls(columns["tool_call_index"], columns["tool_call_id"], columns["tool_call_name"])
    chunks = []
    for request_id, seq, text, fin, finish_reason, error, prompt_tokens, completion_tokens, sent_at, tool_call in zip(
        columns["request_id"],
        columns["seq"],
        columns["text"],
        columns["fin"],
        columns["finish_reason"],
        columns["error"],
        columns["prompt_tokens"],
        columns["completion_tokens"],
        columns["sent_at"],
        tool_calls,
        strict=True,
    ):
        # The same reading as parse_chunk: a finish_reason alone ends the stream; fin alone means stop (or error).
        fin = fin or bool(finish_reason)
        chunks.append(
            Chunk(
                request_id,
                seq,
                text,
                fin,
                (finish_reason or ("error" if error else "stop")) if fin else None,
                error or None,
                prompt_tokens,
                completion_tokens,
                None if sent_at is None else float(sent_at),
                tool_call,
            )
        )
    if "stop_sequence" in sparse:
        for chunk, stop_sequence in zip(chunks, sparse["stop_sequence"].to_pylist(), strict=True):
            if stop_sequence and chunk.fin:
                chunk.stop_sequence = stop_sequence
    if "error_code" in sparse:
        for chunk, error_code in zip(chunks, sparse["error_code"].to_pylist(), strict=True):
            if error_code and chunk.fin and chunk.error:
                chunk.error_code = error_code
    if "kind" in sparse:
        for chunk, kind in zip(chunks, sparse["kind"].to_pylist(), strict=True):
            if kind is not None:
                chunk.reasoning = is_reasoning(kind)
    if "reasoning_tokens" in sparse:
        for chunk, reasoning_tokens in zip(chunks, sparse["reasoning_tokens"].to_pylist(), strict=True):
            if reasoning_tokens is not None and chunk.fin:
                chunk.reasoning_tokens = reasoning_tokens
    return chunks


def _tool_calls(indexes: list[Any], ids: list[Any], names: list[Any]) -> list[ToolCallDelta | None]:
    """Each row's tool-call delta (``None`` for a content row); ``ValueError`` as ``parse_chunk`` would raise it."""
    if not any(index is not None or call_id or name for index, call_id, name in zip(indexes, ids, names, strict=True)):
        return [None] * len(indexes)
    out: list[ToolCallDelta | None] = []
    for index, call_id, name in zip(indexes, ids, names, strict=True):
        if index is None:
            if call_id or name:
                raise ValueError("tool_call_id or tool_call_name on a row without tool_call_index")
            out.append(None)
        elif index < 0:
            raise ValueError(f"tool_call_index must be >= 0, got {index}")
        else:
            out.append(ToolCallDelta(index, call_id or None, name or None))
    return out


class BatchSender:
    """Queues the deltas of many requests and sends each step as one message.

    ``open`` a request when it arrives, ``send`` / ``finish`` its rows as an
    engine step produces them, ``emit`` once per step. Each request's ``seq``
    counts from 0 as with ``ChunkSender``. Never sets ``flush``: dora empties
    the whole input queue on it (docs/architecture.md, "Dora wire protocol").
    With ``stamp``, every row of an emit carries ``sent_at`` (``time.time()``
    at the send), for the benchmarks' added delay. A request that continues
    another replica's answer starts at its ``continue_from`` instead of 0.
    A request that names its server (several server processes, ``_servers.py``)
    has its rows queued in a batch of their own for that server's output,
    ``<output>/<server>``: ``emit`` sends one message per server with rows.
    """

    __slots__ = (
        "node", "output", "stamp", "_seq", "_ids", "_seqs", "_texts", "_fins", "_extra", "_tools", "_stops", "_codes",
        "_kinds", "_reasoning_tokens", "_servers", "_route",
    )  # fmt: skip

    def __init__(self, node: OutputSender, output: str = "chunks", *, stamp: bool = False) -> None:
        self.node = node
        self.output = output
        self.stamp = stamp
        self._seq: dict[str, int] = {}
        self._ids: list[str] = []
        self._seqs: list[int] = []
        self._texts: list[str] = []
        self._fins: list[bool] = []
        # Row index -> (finish_reason, error, prompt_tokens, completion_tokens): only finish rows have them.
        self._extra: dict[int, tuple[str, str | None, int | None, int | None]] = {}
        # Row index -> (tool_call_index, tool_call_id, tool_call_name): only tool-call rows have them.
        self._tools: dict[int, tuple[int, str | None, str | None]] = {}
        # Row index -> (stop_sequence,): only finish rows that a stop string ended have it.
        self._stops: dict[int, tuple[str]] = {}
        # Row index -> (error_code,): only error finish rows that carry a code (busy) have it.
        self._codes: dict[int, tuple[str]] = {}
        # Row index -> (kind,): only reasoning rows have it.
        self._kinds: dict[int, tuple[str]] = {}
        # Row index -> (reasoning_tokens,): only finish rows that count them have it.
        self._reasoning_tokens: dict[int, tuple[int]] = {}
        # Several servers: one batch per server output, and which one each of their open requests is in.
        # Empty with one server, where every row is this batch's (one falsy check per row).
        self._servers: dict[str, BatchSender] = {}
        self._route: dict[str, BatchSender] = {}

    def open(self, request_metadata: Mapping[str, Any]) -> str:
        """Register a request and return its id; ``seq`` starts at its ``continue_from`` (0 when fresh).

        Opening an id already open starts it again.
        """
        request_id = request_id_of(request_metadata)
        if request_id is None:
            raise ValueError("request metadata has neither request_id nor session_id")
        output = reply_output(request_metadata, self.output)
        if output != self.output:
            batch = self._servers.get(output)
            if batch is None:
                batch = self._servers[output] = BatchSender(self.node, output, stamp=self.stamp)
            self._route[request_id] = batch
            batch._seq[request_id] = continue_from(request_metadata)
            return request_id
        if self._route:
            self._route.pop(request_id, None)
        self._seq[request_id] = continue_from(request_metadata)
        return request_id

    def send(self, request_id: str, text: str) -> None:
        """Queue the request's next delta; ``KeyError`` for a request not open (never, or already finished)."""
        if self._route and (batch := self._route.get(request_id)) is not None:
            return batch.send(request_id, text)
        seq = self._seq[request_id]
        self._seq[request_id] = seq + 1
        self._ids.append(request_id)
        self._seqs.append(seq)
        self._texts.append(text)
        self._fins.append(False)

    def send_tool_call(
        self,
        request_id: str,
        index: int,
        arguments_delta: str = "",
        *,
        call_id: str | None = None,
        name: str | None = None,
    ) -> None:
        """Queue a piece of the request's tool call ``index`` (its first carries ``call_id`` and ``name``), as ``ChunkSender``."""
        checked_tool_call_index(index)
        if self._route and (batch := self._route.get(request_id)) is not None:
            return batch.send_tool_call(request_id, index, arguments_delta, call_id=call_id, name=name)
        row = len(self._ids)
        self.send(request_id, arguments_delta)
        self._tools[row] = (index, call_id, name)

    def send_reasoning(self, request_id: str, text: str) -> None:
        """Queue a piece of the request's reasoning (``kind: "reasoning"``), numbered like its answer's deltas."""
        if self._route and (batch := self._route.get(request_id)) is not None:
            return batch.send_reasoning(request_id, text)
        row = len(self._ids)
        self.send(request_id, text)
        self._kinds[row] = (REASONING,)

    def finish(
        self,
        request_id: str,
        finish_reason: str = "stop",
        text: str = "",
        *,
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        stop_sequence: str | None = None,
        error_code: str | None = None,
        reasoning_tokens: int | None = None,
    ) -> None:
        """Queue the request's last row (``fin``) with its finish reason and token counts, and forget it.

        ``stop_sequence``: the stop string that ended the answer (the text is cut before it).
        ``error_code``: with ``error``, what kind of failure (``BUSY``: see ``busy``).
        ``reasoning_tokens``: how many of ``completion_tokens`` were reasoning.
        """
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason: {finish_reason!r}")
        if self._route and (batch := self._route.get(request_id)) is not None:
            batch.finish(
                request_id,
                finish_reason,
                text,
                error=error,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                stop_sequence=stop_sequence,
                error_code=error_code,
                reasoning_tokens=reasoning_tokens,
            )
            del self._route[request_id]
            return
        seq = self._seq.pop(request_id)
        if stop_sequence:
            self._stops[len(self._ids)] = (stop_sequence,)
        if error_code and error is not None:
            self._codes[len(self._ids)] = (error_code,)
        if reasoning_tokens is not None:
            self._reasoning_tokens[len(self._ids)] = (reasoning_tokens,)
        self._extra[len(self._ids)] = (finish_reason, error, prompt_tokens, completion_tokens)
        self._ids.append(request_id)
        self._seqs.append(seq)
        self._texts.append(text)
        self._fins.append(True)

    def busy(self, request_id: str, message: str = "the model is busy; retry later") -> None:
        """Queue a turn-away for the request, nothing generated: an ``error`` finish row with ``error_code: busy``."""
        self.finish(request_id, "error", error=message, error_code=BUSY)

    def discard(self, request_id: str) -> None:
        """Forget a request (the server cancelled it): nothing more is sent for it, not even what is queued."""
        if self._route and (batch := self._route.pop(request_id, None)) is not None:
            batch.discard(request_id)
            return
        if self._seq.pop(request_id, None) is None and request_id not in self._ids:
            return
        if request_id in self._ids:
            keep = [i for i, rid in enumerate(self._ids) if rid != request_id]
            extra, tools, stops, codes = self._extra, self._tools, self._stops, self._codes
            self._ids = [self._ids[i] for i in keep]
            self._seqs = [self._seqs[i] for i in keep]
            self._texts = [self._texts[i] for i in keep]
            self._fins = [self._fins[i] for i in keep]
            self._extra = {new: extra[old] for new, old in enumerate(keep) if old in extra}
            self._tools = {new: tools[old] for new, old in enumerate(keep) if old in tools}
            self._stops = {new: stops[old] for new, old in enumerate(keep) if old in stops}
            self._codes = {new: codes[old] for new, old in enumerate(keep) if old in codes}
            kinds, counts = self._kinds, self._reasoning_tokens
            self._kinds = {new: kinds[old] for new, old in enumerate(keep) if old in kinds}
            self._reasoning_tokens = {new: counts[old] for new, old in enumerate(keep) if old in counts}

    @property
    def queued(self) -> int:
        """Rows waiting for the next ``emit``."""
        return len(self._ids) + sum(batch.queued for batch in self._servers.values())

    def emit(self) -> int:
        """Send everything queued as ONE message per output (nothing when empty); the number of rows sent."""
        sent = sum(batch.emit() for batch in self._servers.values()) if self._servers else 0
        n = len(self._ids)
        if not n:
            return sent
        names = ["request_id", "seq", "text", "fin"]
        arrays = [
            pa.array(self._ids, type=pa.string()),
            pa.array(self._seqs, type=pa.int64()),
            pa.array(self._texts, type=pa.string()),
            pa.array(self._fins, type=pa.bool_()),
        ]
        # The optional columns travel only in a step whose rows need them (a finish, a tool call, reasoning, a stop string).
        _add_columns(names, arrays, n, ("finish_reason", "error", "prompt_tokens", "completion_tokens"), self._extra)
        _add_columns(names, arrays, n, ("tool_call_index", "tool_call_id", "tool_call_name"), self._tools)
        _add_columns(names, arrays, n, ("stop_sequence",), self._stops)
        _add_columns(names, arrays, n, ("error_code",), self._codes)
        _add_columns(names, arrays, n, ("kind",), self._kinds)
        _add_columns(names, arrays, n, ("reasoning_tokens",), self._reasoning_tokens)
        if self.stamp:
            names.append("sent_at")
            arrays.append(pa.array([time.time()] * n, type=pa.float64()))
        self._ids, self._seqs, self._texts, self._fins = [], [], [], []
        self._extra, self._tools, self._stops, self._codes = {}, {}, {}, {}
        self._kinds, self._reasoning_tokens = {}, {}
        self.node.send_output(self.output, pa.StructArray.from_arrays(arrays, names=names), {})
        return n + sent

    def __contains__(self, request_id: str) -> bool:
        """Whether the request is open (opened, neither finished nor discarded)."""
        return request_id in self._seq or request_id in self._route


def _add_columns(
    names: list[str], arrays: list[pa.Array], n: int, column_names: tuple[str, ...], values: Mapping[int, tuple[Any, ...]]
) -> None:
    """Append the nullable ``column_names`` (``OPTIONAL_COLUMNS`` types) filled from ``values`` (row -> one value per column)."""
    if not values:
        return
    columns: list[list[Any]] = [[None] * n for _ in column_names]
    for row, items in values.items():
        for column, item in zip(columns, items, strict=True):
            column[row] = item
    for name, column in zip(column_names, columns, strict=True):
        names.append(name)
        arrays.append(pa.array(column, type=OPTIONAL_COLUMNS[name]))
