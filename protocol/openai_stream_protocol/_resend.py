"""Resend: the server asks a node for chunks that were lost on the way, and the node sends them again.

Between machines dora's transport can drop a message under congestion (docs/architecture.md,
"Facts measured"). A lost chunk leaves a hole in a request's ``seq``; rather than end the stream
when its gap timeout passes, the server asks the replica that holds the request to send the
missing range again (docs/architecture.md, "Dora wire protocol", "Resend"):

- **ask** (server -> node), on the server's output ``resend`` (``resend/<node id>`` to one replica,
  as for ``cancel``) and the node's input ``resend``: ``pa.array([request_id])`` with metadata
  ``request_id``, ``resend_from`` (the first ``seq`` the server lacks) and ``resend_to`` (the
  first ``seq`` after the hole that it has; absent: everything from ``resend_from`` on, which is
  how the server asks for a lost last chunk). ``read_resend_ask`` reads it, never raising.
- **answer** (node -> server), on the node's chunk output: the chunks of that range exactly as
  they were sent the first time (a single chunk with its metadata, a batch as the rows of that
  request taken from the step's struct array), each message with ``resent: true`` added to its
  metadata. The server takes them as any chunk: the reorder buffer drops what it already has.
- **missed** (node -> server), when the node no longer holds part of the range (it was evicted
  from its bounded buffer, or the request is unknown to this process): an empty string array
  with metadata ``resend_missed: <request_id>`` and ``resend_from: <first seq it lacks>``. The
  server then ends that stream at once with ``missing_chunk``, instead of waiting out the gap
  timeout. A node that has sent nothing past ``resend_from`` yet (it is slow, not lossy) sends
  nothing.

A node says it answers asks with ``can_resend: true`` in its hello and heartbeats
(``_status.py``); the server never asks a node that does not, and such a node keeps the
behaviour before resends (the gap timeout ends the stream).

``ResendingOutput`` does the node's part without changing how it sends: it stands between the node's
senders (``ChunkSender``, ``BatchSender``) and ``dora.Node``, keeps the last ``max_chunks`` chunk
messages (or batch rows) of each request, bounded in bytes over all requests, keeps a finished
request's for ``linger_s`` (a lost last chunk is asked for after the answer ended), and answers
``resend(ask)``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ._chunk import OutputSender
from ._wire import as_bool, as_int, request_id_of

RESEND_OUTPUT = "resend"
"""The server's output of asks (``resend/<node id>`` per replica) and the node's input that receives them."""
RESEND_FROM_KEY = "resend_from"
"""Ask and missed metadata, int: the first ``seq`` the server lacks (missed: the first the node no longer holds)."""
RESEND_TO_KEY = "resend_to"
"""Ask metadata, int, optional: the first ``seq`` after the hole (exclusive end); absent: everything from ``resend_from``."""
RESEND_MISSED_KEY = "resend_missed"
"""Metadata key of a node's answer that it cannot resend the range: the request id."""
RESENT_KEY = "resent"
"""Added to the metadata of every message a node sends again (the server ignores it; logs and drop injectors read it)."""
CAN_RESEND_KEY = "can_resend"
"""Hello and heartbeat metadata, bool: the node answers resend asks (absent: it does not, and is never asked)."""

DEFAULT_MAX_CHUNKS = 256
"""Chunk messages (or batch rows) kept per request: a hole older than this many chunks cannot be filled."""
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""What the kept chunks may hold over all requests (text, metadata and a per-chunk overhead, estimated)."""
DEFAULT_LINGER_S = 30.0
"""How long a finished request's chunks are kept: the server asks for a lost last chunk after the answer went quiet."""
ENTRY_OVERHEAD_BYTES = 200
"""What one kept chunk costs beyond its data (the entry tuple, the deque slot, the metadata dict's share), rounded up."""

_EMPTY = pa.array([], type=pa.string())


@dataclass(frozen=True, slots=True)
class ResendAsk:
    """The server lacks ``seq`` ``first`` up to ``end`` (exclusive; ``None``: everything from ``first`` on).

    ``server``: the server that asked, when several share the replica (its ask came on ``resend/<server>``):
    a missed answer about a request the node does not know goes to that server's output.
    """

    request_id: str
    first: int
    end: int | None = None
    server: str | None = None

    def to_metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"request_id": self.request_id, RESEND_FROM_KEY: self.first}
        if self.end is not None:
            metadata[RESEND_TO_KEY] = self.end
        return metadata


def send_resend_ask(node: OutputSender, output: str, ask: ResendAsk) -> None:
    """Send one ask on ``output`` (the server's ``resend/<node id>``): the id as data, the range as metadata."""
    node.send_output(output, pa.array([ask.request_id], type=pa.string()), ask.to_metadata())


def is_resend_input(input_id: str) -> bool:
    """A node's input of asks: ``resend``, or ``resend/<server>`` with several servers (docs/architecture.md,
    "Several servers")."""
    return input_id == RESEND_OUTPUT or input_id.startswith(RESEND_OUTPUT + "/")


def read_resend_ask(value: pa.Array, metadata: Mapping[str, Any], input_id: str = RESEND_OUTPUT) -> ResendAsk | None:
    """The ask a ``resend`` message carries; ``None`` when it names no request or no valid range (never raises)."""
    request_id = request_id_of(metadata)
    if request_id is None and len(value):
        first_item = value[0].as_py()
        request_id = str(first_item) if first_item else None
    try:
        first = as_int(metadata.get(RESEND_FROM_KEY))
        end = as_int(metadata.get(RESEND_TO_KEY))
    except ValueError:
        return None
    if request_id is None or first is None or first < 0 or (end is not None and end <= first):
        return None
    server = input_id[len(RESEND_OUTPUT) + 1 :] if input_id.startswith(RESEND_OUTPUT + "/") else None
    return ResendAsk(request_id, first, end, server or None)


def is_resend_missed(metadata: Mapping[str, Any]) -> bool:
    """Whether a message on a chunk output is a node's "cannot resend" answer (never a chunk)."""
    return RESEND_MISSED_KEY in metadata


def parse_resend_missed(metadata: Mapping[str, Any]) -> tuple[str, int] | None:
    """``(request id, first seq the node lacks)`` of a missed answer; ``None`` when it does not parse."""
    request_id = metadata.get(RESEND_MISSED_KEY)
    try:
        first = as_int(metadata.get(RESEND_FROM_KEY))
    except ValueError:
        return None
    if not request_id or first is None or first < 0:
        return None
    return str(request_id), first


def send_resend_missed(node: OutputSender, output: str, request_id: str, first: int) -> None:
    node.send_output(output, _EMPTY, {RESEND_MISSED_KEY: request_id, RESEND_FROM_KEY: int(first)})


def has_resend_input(node: Any) -> bool:
    """Whether the dataflow gives this node a ``resend`` input (``node.node_config()``); False when it cannot tell.

    A node answers asks only where the server can send them: without the input it records nothing and
    its hello does not say ``can_resend``.
    """
    try:
        config = node.node_config()
    except Exception:  # an older dora, or a test double
        return False
    inputs = config.get("inputs") if isinstance(config, Mapping) else None
    return isinstance(inputs, Mapping) and any(is_resend_input(str(name)) for name in inputs)


@dataclass(slots=True)
class _Kept:
    """One request's kept chunks: ``(seq, output, data, metadata, row)`` oldest first; ``row`` is None for a single chunk."""

    entries: deque[tuple[int, str, pa.Array, dict[str, Any] | None, int | None, int]]
    nbytes: int = 0
    finished_at: float | None = None


class ResendingOutput:
    """The node's ``send_output`` with a bounded memory of what it sent, so that it can send a lost range again.

    Pass it wherever the node's senders take the node (``ChunkSender(resending, metadata)``,
    ``BatchSender(resending)``); every call goes on to ``node`` unchanged. It records chunk
    messages (metadata with ``seq`` and a request id) and batches (a struct array: each row under
    its ``request_id``), never hellos, heartbeats or legacy replies. ``forget`` a request the
    server cancelled. Call ``resend`` from the thread that owns ``send_output``.

    Bounds: ``max_chunks`` per request (the oldest go first), ``max_bytes`` over all of them (finished
    requests go first, oldest first; then the oldest chunks of the request that grew), and a finished
    request is kept ``linger_s``. A batch row's bytes are its share of the batch's buffers.
    """

    def __init__(
        self,
        node: OutputSender,
        *,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        linger_s: float = DEFAULT_LINGER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_chunks < 1 or max_bytes < 1 or linger_s < 0:
            raise ValueError("max_chunks and max_bytes must be at least 1, linger_s at least 0")
        self.node = node
        self.max_chunks = max_chunks
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.clock = clock
        self._kept: dict[str, _Kept] = {}
        self._finished: OrderedDict[str, float] = OrderedDict()
        """Finished requests still kept, oldest finish first (what the byte bound and the linger evict first)."""
        self.nbytes = 0
        self.resent = 0
        """Chunk messages (or batch rows) sent again."""
        self.missed = 0
        """Asks answered with ``resend_missed``."""

    # -- what the node sends ---------------------------------------------------

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        self.node.send_output(output_id, data, metadata)
        try:
            if isinstance(data, pa.StructArray):
                self._record_batch(output_id, data)
            elif metadata and "seq" in metadata:
                self._record_chunk(output_id, data, metadata)
        except Exception:  # recording must never cost the message that was just sent
            pass

    def __getattr__(self, name: str) -> Any:
        # Everything else of dora.Node (next, drain, node_config, ...) is the node's own.
        return getattr(self.node, name)

    def _record_chunk(self, output: str, data: pa.Array, metadata: dict[str, Any]) -> None:
        request_id = request_id_of(metadata)
        seq = as_int(metadata.get("seq"))
        if request_id is None or seq is None:
            return
        size = ENTRY_OVERHEAD_BYTES + data.nbytes + 16 * len(metadata)
        fin = as_bool(metadata.get("fin", False)) or bool(metadata.get("finish_reason"))
        self._keep(request_id, (seq, output, data, metadata, None, size), fin)

    def _record_batch(self, output: str, batch: pa.StructArray) -> None:
        """Each row under its request; a row of a request already kept and not finished takes the short path (a
        1,000-row step is 1,000 of them: the per-row cost is the node's whole overhead, benchmarks/README.md)."""
        n = len(batch)
        if not n:
            return
        ids = batch.field("request_id").to_pylist()
        seqs = batch.field("seq").to_pylist()
        fins = batch.field("fin").to_pylist()
        size = ENTRY_OVERHEAD_BYTES + batch.nbytes // n
        kept_by_id, max_chunks = self._kept, self.max_chunks
        added = 0
        for row, (request_id, seq, fin) in enumerate(zip(ids, seqs, fins, strict=True)):
            kept = kept_by_id.get(request_id)
            if fin or kept is None or kept.finished_at is not None or seq is None:
                if request_id is not None and seq is not None:
                    self._keep(request_id, (seq, output, batch, None, row, size), bool(fin))
                continue
            entries = kept.entries
            entries.append((seq, output, batch, None, row, size))
            kept.nbytes += size
            added += size
            if len(entries) > max_chunks:
                popped = entries.popleft()[5]
                kept.nbytes -= popped
                added -= popped
        self.nbytes += added
        if self.nbytes > self.max_bytes:
            self._shrink_all()

    def _shrink_all(self) -> None:
        """Over ``max_bytes`` after a batch: finished requests first, then the oldest chunk of each request in turn."""
        while self.nbytes > self.max_bytes and self._finished:
            self._drop(next(iter(self._finished)))
        while self.nbytes > self.max_bytes:
            trimmed = False
            for kept in self._kept.values():
                if len(kept.entries) > 1:
                    self._pop_oldest(kept)
                    trimmed = True
                    if self.nbytes <= self.max_bytes:
                        return
            if not trimmed:
                return

    def _keep(self, request_id: str, entry: tuple[int, str, pa.Array, dict[str, Any] | None, int | None, int], fin: bool) -> None:
        kept = self._kept.get(request_id)
        if kept is None:
            kept = self._kept[request_id] = _Kept(deque())
        elif kept.finished_at is not None:  # the same id again (a re-sent request): start over
            self._drop(request_id)
            kept = self._kept[request_id] = _Kept(deque())
        kept.entries.append(entry)
        kept.nbytes += entry[5]
        self.nbytes += entry[5]
        if len(kept.entries) > self.max_chunks:
            self._pop_oldest(kept)
        if fin:
            kept.finished_at = now = self.clock()
            self._finished[request_id] = now
            self._expire(now)
        if self.nbytes > self.max_bytes:
            self._shrink(kept)

    def _pop_oldest(self, kept: _Kept) -> None:
        size = kept.entries.popleft()[5]
        kept.nbytes -= size
        self.nbytes -= size

    def _shrink(self, growing: _Kept) -> None:
        """Over ``max_bytes``: finished requests go first, oldest first; then the oldest chunks of the one that grew."""
        while self.nbytes > self.max_bytes and self._finished:
            self._drop(next(iter(self._finished)))
        while self.nbytes > self.max_bytes and len(growing.entries) > 1:
            self._pop_oldest(growing)

    def _expire(self, now: float) -> None:
        finished = self._finished
        while finished:
            request_id, at = next(iter(finished.items()))
            if now - at <= self.linger_s:
                break
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        kept = self._kept.pop(request_id, None)
        self._finished.pop(request_id, None)
        if kept is not None:
            self.nbytes -= kept.nbytes

    def forget(self, request_id: str) -> None:
        """The server cancelled the request: nothing of it will be asked for again."""
        self._drop(request_id)

    @property
    def requests(self) -> int:
        """Requests whose chunks are kept (generating, or finished within ``linger_s``)."""
        return len(self._kept)

    # -- answering an ask ------------------------------------------------------

    def resend(self, ask: ResendAsk, missed_output: str = "chunks", *, active: bool = False) -> int:
        """Send ``ask``'s range again as it was first sent; a missed answer on ``missed_output`` when part of it is gone.

        Returns the chunk messages (or rows) sent again. Sends nothing when the node has sent nothing
        from ``ask.first`` on yet and still generates the request (it is slow, not lossy); ``active``
        says the node holds the request (generating or queued), which it alone knows before its first chunk.
        """
        self._expire(self.clock())
        kept = self._kept.get(ask.request_id)
        if ask.server:  # several servers: the asking server's own output (docs/architecture.md, "Several servers")
            missed_output = f"{missed_output}/{ask.server}"
        if kept is None:
            if not active:  # unknown here: evicted, cancelled, or another process's (a restart)
                self._missed(missed_output, ask.request_id, ask.first)
            return 0
        if kept.entries:  # the output its chunks went on (several servers: the asking server's own)
            missed_output = kept.entries[-1][1]
        wanted = [e for e in kept.entries if e[0] >= ask.first and (ask.end is None or e[0] < ask.end)]
        have = {e[0] for e in wanted}
        last = ask.end if ask.end is not None else (max(have) + 1 if have else None)
        if last is None:
            if kept.finished_at is not None:  # it ended before ``first``: nothing there to send
                self._missed(missed_output, ask.request_id, ask.first)
            return 0
        for seq in range(ask.first, last):
            if seq not in have:
                self._missed(missed_output, ask.request_id, seq)
                return 0
        return self._send_again(wanted)

    def _send_again(self, entries: list[tuple[int, str, pa.Array, dict[str, Any] | None, int | None, int]]) -> int:
        """Single chunks one message each with ``resent: true``; batch rows grouped by the step they came in."""
        sent = 0
        rows: dict[int, tuple[str, pa.StructArray, list[int]]] = {}
        for _, output, data, metadata, row, _ in entries:
            if row is None:
                self._flush_rows(rows)
                rows = {}
                self.node.send_output(output, data, {**(metadata or {}), RESENT_KEY: True})
            else:
                group = rows.get(id(data))
                if group is None:
                    rows[id(data)] = (output, data, [row])  # type: ignore[assignment]
                else:
                    group[2].append(row)
            sent += 1
        self._flush_rows(rows)
        self.resent += sent
        return sent

    def _flush_rows(self, rows: dict[int, tuple[str, pa.StructArray, list[int]]]) -> None:
        for output, batch, picked in rows.values():
            self.node.send_output(output, batch.take(pa.array(picked, type=pa.int64())), {RESENT_KEY: True})

    def _missed(self, output: str, request_id: str, first: int) -> None:
        self.missed += 1
        try:
            send_resend_missed(self.node, output, request_id, first)
        except Exception:  # an output the dataflow does not declare: the server's gap timeout ends the stream
            pass
