"""Chunks (node -> server): numbered deltas, the finish marker, and their lenient parsing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from ._continuation import continue_from
from ._reasoning import KIND_KEY, REASONING, REASONING_TOKENS_KEY, is_reasoning
from ._servers import reply_output, request_server
from ._tools import TOOL_CALL_ID_KEY, TOOL_CALL_INDEX_KEY, TOOL_CALL_NAME_KEY, ToolCallDelta, checked_tool_call_index
from ._wire import as_bool, as_int, request_id_of, string_array

FINISH_REASONS = frozenset({"stop", "length", "content_filter", "error", "tool_calls"})

ERROR_CODE_KEY = "error_code"
"""Finish-chunk metadata, str, beside ``error``: what kind of failure it is, for the server to act on."""
BUSY = "busy"
"""``error_code`` of a node that will not serve the request now (queue full, no slot) and generated nothing
for it: the server may send it to another replica instead of failing it (docs/architecture.md,
"Dora wire protocol", "Busy"). Any other error is the request's own and reaches the client."""


@dataclass(slots=True)
class Chunk:
    """One message from a node, parsed leniently.

    ``seq is None`` marks a legacy reply (dora-echo, dora-qwen2-5-vl): one
    whole answer, matched by ``request_id`` or else to the oldest request
    still waiting for one.

    With ``tool_call`` set, ``text`` is the next piece of that call's
    arguments (JSON text), not content.

    ``stop_sequence`` (finish chunks only): the stop string that ended the
    answer; the text is cut before it and ``finish_reason`` is ``stop``.

    ``error_code`` (error finish chunks only): ``BUSY`` when the node turned
    the request away without generating anything (``is_busy``).

    ``reasoning``: the text is a piece of the model's reasoning, not of the
    answer (``kind: "reasoning"``). ``reasoning_tokens`` (finish chunks only):
    how many of ``completion_tokens`` were reasoning.
    """

    request_id: str | None
    seq: int | None
    text: str
    fin: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    sent_at: float | None = None
    tool_call: ToolCallDelta | None = None
    stop_sequence: str | None = None
    error_code: str | None = None
    reasoning: bool = False
    reasoning_tokens: int | None = None

    @property
    def is_busy(self) -> bool:
        """The node turned the request away (``error_code: busy``): nothing was generated, another replica may serve it."""
        return self.error_code == BUSY


def tool_call_delta(index: Any, call_id: Any = None, name: Any = None) -> ToolCallDelta | None:
    """The tool-call part of a chunk (``None`` without an index); ``ValueError`` for an index that is not an int >= 0.

    An id or name given without an index makes the chunk malformed too: it would be lost.
    """
    if index is None:
        if call_id or name:
            raise ValueError("tool_call_id or tool_call_name without tool_call_index")
        return None
    value = as_int(index)
    if value is None or value < 0:
        raise ValueError(f"tool_call_index must be an integer >= 0, got {index!r}")
    return ToolCallDelta(value, str(call_id) if call_id else None, str(name) if name else None)


def parse_chunk(texts: list[str], metadata: Mapping[str, Any]) -> Chunk:
    """Read a chunk message; raises ``ValueError`` for a malformed ``seq``, token count, ``tool_call_index`` or ``kind``."""
    seq = as_int(metadata.get("seq"))
    if seq is None:
        return Chunk(request_id_of(metadata), None, "\n".join(texts), fin=True, finish_reason="stop")
    finish_reason = metadata.get("finish_reason") or None
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise ValueError(f"unknown finish_reason: {finish_reason!r}")
    fin = as_bool(metadata.get("fin", False)) or finish_reason is not None
    error = metadata.get("error")
    sent_at = metadata.get("sent_at")
    stop_sequence = metadata.get("stop_sequence") if fin else None
    error_code = metadata.get(ERROR_CODE_KEY) if fin and error else None
    chunk = Chunk(
        request_id=request_id_of(metadata),
        seq=seq,
        text="".join(texts),
        fin=fin,
        finish_reason=(finish_reason or ("error" if error else "stop")) if fin else None,
        error=str(error) if error else None,
        prompt_tokens=as_int(metadata.get("prompt_tokens")),
        completion_tokens=as_int(metadata.get("completion_tokens")),
        sent_at=float(sent_at) if isinstance(sent_at, (int, float)) else None,
        tool_call=tool_call_delta(
            metadata.get(TOOL_CALL_INDEX_KEY), metadata.get(TOOL_CALL_ID_KEY), metadata.get(TOOL_CALL_NAME_KEY)
        ),
        # Lenient: anything but a non-empty string (dora's "None" included) is no stop sequence.
        stop_sequence=stop_sequence if isinstance(stop_sequence, str) and stop_sequence not in ("", "None") else None,
        error_code=error_code if isinstance(error_code, str) and error_code not in ("", "None") else None,
    )
    # Set after, and only when given: most chunks are answer text, and every keyword costs on this path.
    kind = metadata.get(KIND_KEY)
    if kind is not None and is_reasoning(kind):
        chunk.reasoning = True
    if fin:
        chunk.reasoning_tokens = as_int(metadata.get(REASONING_TOKENS_KEY))
    return chunk


class OutputSender(Protocol):
    """The part of ``dora.Node`` the helpers use (a test can pass a recorder)."""

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None: ...


class ChunkSender:
    """Sends one request's answer as numbered chunks, then the finish marker.

    Never sets ``flush``: dora empties the whole input queue on it, which
    would throw away other requests' chunks (docs/architecture.md, "Dora wire protocol").
    The first ``seq`` is the request's ``continue_from`` (0 for a fresh request): a node
    continuing another replica's answer numbers on from the pieces already delivered.
    A request that names its server (several server processes, ``_servers.py``) is answered
    on that server's output, ``<output>/<server>``.
    """

    __slots__ = ("node", "output", "request_id", "seq", "finished", "_ids", "server")

    def __init__(self, node: OutputSender, request_metadata: Mapping[str, Any], output: str = "chunks") -> None:
        request_id = request_id_of(request_metadata)
        if request_id is None:
            raise ValueError("request metadata has neither request_id nor session_id")
        self.node = node
        self.output = reply_output(request_metadata, output)
        self.server = request_server(request_metadata)
        """The server process that asked (None with one server): its answers go to its own output."""
        self.request_id = request_id
        self.seq = continue_from(request_metadata)
        self.finished = False
        self._ids = {"request_id": request_id, "session_id": request_id}

    def send(self, text: str, **extra: Any) -> None:
        """Send one delta."""
        if self.finished:
            raise RuntimeError(f"request {self.request_id} already finished")
        self.node.send_output(self.output, string_array([text]), {**self._ids, "seq": self.seq, **extra})
        self.seq += 1

    def send_tool_call(
        self, index: int, arguments_delta: str = "", *, call_id: str | None = None, name: str | None = None, **extra: Any
    ) -> None:
        """Send a piece of tool call ``index``'s arguments; the call's first chunk carries ``call_id`` and ``name``.

        A call may start and end in one chunk (id, name and the whole arguments).
        """
        metadata: dict[str, Any] = {TOOL_CALL_INDEX_KEY: checked_tool_call_index(index), **extra}
        if call_id is not None:
            metadata[TOOL_CALL_ID_KEY] = call_id
        if name is not None:
            metadata[TOOL_CALL_NAME_KEY] = name
        self.send(arguments_delta, **metadata)

    def send_reasoning(self, text: str, **extra: Any) -> None:
        """Send one piece of the model's reasoning (``kind: "reasoning"``): numbered like the answer's deltas."""
        self.send(text, **{KIND_KEY: REASONING, **extra})

    def finish(
        self,
        finish_reason: str = "stop",
        text: str = "",
        *,
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        stop_sequence: str | None = None,
        error_code: str | None = None,
        reasoning_tokens: int | None = None,
        **extra: Any,
    ) -> None:
        """Send the last chunk: ``fin: true`` with its finish reason and token counts.

        ``stop_sequence``: the stop string that ended the answer (the text is cut before it).
        ``error_code``: with ``error``, what kind of failure (``BUSY``: see ``busy``).
        ``reasoning_tokens``: how many of ``completion_tokens`` were reasoning.
        """
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason: {finish_reason!r}")
        metadata: dict[str, Any] = {"fin": True, "finish_reason": finish_reason, **extra}
        if error is not None:
            metadata["error"] = error
            if error_code:
                metadata[ERROR_CODE_KEY] = error_code
        if prompt_tokens is not None:
            metadata["prompt_tokens"] = prompt_tokens
        if completion_tokens is not None:
            metadata["completion_tokens"] = completion_tokens
        if stop_sequence:
            metadata["stop_sequence"] = stop_sequence
        if reasoning_tokens is not None:
            metadata[REASONING_TOKENS_KEY] = reasoning_tokens
        self.send(text, **metadata)
        self.finished = True

    def busy(self, message: str = "the model is busy; retry later") -> None:
        """Turn the request away, nothing generated: an ``error`` finish with ``error_code: busy``.

        The server sends a busy request to another replica when it has one (or fails it with ``message``).
        """
        self.finish("error", error=message, error_code=BUSY)
