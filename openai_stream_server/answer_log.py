"""The answer log: what a completion answered, in order, as plain data.

Every surface renders it, and it is what a store persists and shares between processes
(docs/architecture.md, "Room 2: stream state"). ``pieces[i]`` is the text of the chunk with
``seq == i``; a piece that is a tool call's argument delta is marked in ``tool_calls`` (piece index
-> ``ToolCallDelta``, docs/architecture.md, "Tool calls"), a piece of the model's reasoning in
``reasoning`` (piece indices, docs/architecture.md, "Reasoning"); every other piece is answer text. The
end (finish reason, stop sequence) and the usage counts are here too; the status, the error and
the waiting readers are the lifecycle's (``state.StreamState``).

Reads are linear in the pieces they cover: each joins its strings once (``str.join``), never by
repeated concatenation, which made reading 10,000 argument pieces back take seconds.
"""

from __future__ import annotations

from typing import Any, Final

from openai_stream_protocol import ToolCall, ToolCallDelta

LOGGED_CHUNK_OVERHEAD_BYTES = 64
"""What one piece costs beyond its text's UTF-8 bytes, for the byte limits.

Measured on CPython 3.11 (tracemalloc): a short text is a str of 49 bytes plus its length, and the
list slot holding it is 8; an empty text is the shared ``""`` and costs only the slot. Counting every
piece as at least 64 bytes makes a node that floods empty (or one-byte) chunks reach
``max_completion_bytes`` rather than grow the log without bound (docs/architecture.md, "Memory bounds").
"""


class ReasoningRun:
    """The kind of a run of reasoning pieces in ``segments`` (one instance, ``REASONING``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "REASONING"


REASONING: Final = ReasoningRun()

Segment = tuple[ToolCallDelta | ReasoningRun | None, str, int]
"""A run of pieces ``(kind, text, last piece index)``: ``kind`` None for answer text, ``REASONING`` for the model's
reasoning, else the call it is arguments of."""


def fallback_call_id(request_id: str, index: int) -> str:
    """The id of tool call ``index`` when the node named none: stable per completion, so every read agrees."""
    return f"call_{request_id[-8:]}_{index}"


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class AnswerLog:
    """The in-order pieces of one answer, the tool-call deltas and reasoning by piece index, its end and its usage.

    Append-only while the answer streams: ``pieces``, ``tool_calls``, ``reasoning`` and ``sent_at`` are
    never rebound, so a reader may hold them and keep a cursor (an index into ``pieces``).
    ``__slots__``: ``append`` runs once per chunk (see ``StreamState``).
    """

    __slots__ = (
        "pieces",
        "tool_calls",
        "reasoning",
        "sent_at",
        "nbytes",
        "finish_reason",
        "stop_sequence",
        "prompt_tokens",
        "completion_tokens",
        "counted_tokens",
        "reasoning_tokens",
        "counted_reasoning",
    )

    def __init__(self, prompt_tokens: int = 0) -> None:
        self.pieces: list[str] = []
        self.tool_calls: dict[int, ToolCallDelta] = {}
        """Piece index -> the tool call that piece is an argument delta of, in piece order. Empty for most
        answers, so a renderer that finds it empty takes the text-only path."""
        self.reasoning: set[int] = set()
        """The indices of the pieces that are the model's reasoning (``Chunk.reasoning``); empty for most answers, as
        ``tool_calls``: a renderer that finds both empty takes the text-only path."""
        self.sent_at: dict[int, float] = {}
        """The node's ``sent_at`` per piece, for chunks that carry it (benchmarks: ``relay_sent_at``)."""
        self.nbytes = 0
        """UTF-8 bytes of the pieces (text and arguments alike)."""
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        """The stop string that ended the answer, when the node's finish chunk names one: Anthropic's
        ``stop_reason: "stop_sequence"``. The text is cut before it; ``finish_reason`` is ``stop``."""
        self.prompt_tokens = prompt_tokens
        """The server's estimate of the prompt until the node reports its own count."""
        self.completion_tokens: int | None = None
        """As the node reported it, if it did; else ``usage`` uses ``counted_tokens``."""
        self.counted_tokens = 0
        """Pieces with text: the server's own count of completion tokens."""
        self.reasoning_tokens: int | None = None
        """How many of the completion tokens were reasoning, as the node reported it, if it did; else ``reasoning_used``
        uses ``counted_reasoning``."""
        self.counted_reasoning = 0
        """Reasoning pieces with text: the server's own count of reasoning tokens."""

    def __len__(self) -> int:
        return len(self.pieces)

    # -- writing -----------------------------------------------------------

    def append(
        self, text: str, tool_call: ToolCallDelta | None = None, sent_at: float | None = None, reasoning: bool = False
    ) -> int:
        """Add the next piece; returns its UTF-8 bytes."""
        pieces = self.pieces
        if sent_at is not None:
            self.sent_at[len(pieces)] = sent_at
        if tool_call is not None:
            self.tool_calls[len(pieces)] = tool_call
        elif reasoning:
            self.reasoning.add(len(pieces))
            if text:
                self.counted_reasoning += 1
        pieces.append(text)
        size = len(text) if text.isascii() else len(text.encode())
        self.nbytes += size
        if text:
            self.counted_tokens += 1
        return size

    @property
    def held_bytes(self) -> int:
        """What the log holds for the byte limits: its text plus ``LOGGED_CHUNK_OVERHEAD_BYTES`` per piece."""
        return self.nbytes + LOGGED_CHUNK_OVERHEAD_BYTES * len(self.pieces)

    # -- reading (each linear in the pieces it covers) ----------------------

    @property
    def text(self) -> str:
        """The answer text: every piece that is neither a tool-call delta nor reasoning."""
        calls, thoughts = self.tool_calls, self.reasoning
        if not calls and not thoughts:
            return "".join(self.pieces)
        return "".join([piece for i, piece in enumerate(self.pieces) if i not in calls and i not in thoughts])

    @property
    def reasoning_text(self) -> str:
        """The model's reasoning: its reasoning pieces joined, in order ("" for an answer without any)."""
        thoughts = self.reasoning
        if not thoughts:
            return ""
        return "".join([piece for i, piece in enumerate(self.pieces) if i in thoughts])

    @property
    def reasoning_used(self) -> int:
        """The reasoning tokens among the completion tokens: the node's count when it gave one, else the server's."""
        return self.reasoning_tokens if self.reasoning_tokens is not None else self.counted_reasoning

    def calls(self, request_id: str) -> list[ToolCall]:
        """The tool calls so far, whole, in index order: id and name from their deltas, arguments joined.

        ``request_id`` names the completion, for the id of a call the node named none (``fallback_call_id``).
        """
        found: dict[int, tuple[list[str | None], list[str]]] = {}
        pieces = self.pieces
        for i, delta in self.tool_calls.items():  # in piece order: tool_calls is filled as pieces are appended
            call = found.get(delta.index)
            if call is None:
                call = found[delta.index] = ([None, None], [])
            names, arguments = call
            if names[0] is None and delta.id:
                names[0] = delta.id
            if names[1] is None and delta.name:
                names[1] = delta.name
            arguments.append(pieces[i])
        return [
            ToolCall(names[0] or fallback_call_id(request_id, index), names[1] or "", "".join(arguments))
            for index, (names, arguments) in sorted(found.items())
        ]

    def segments(self, start: int, end: int) -> list[Segment]:
        """Pieces ``start:end`` as runs ``(kind, text, last piece index)``: ``kind`` None for answer text,
        ``REASONING`` for reasoning, else the call whose argument pieces the run joins.

        Consecutive pieces of the same kind (text, reasoning, or the same call) are joined, as the renderers
        coalesce; a run's delta carries the call's id and name when the run holds the call's first chunk.
        """
        runs: list[Segment] = []
        calls, thoughts, pieces = self.tool_calls, self.reasoning, self.pieces
        run: ToolCallDelta | ReasoningRun | None = None
        texts: list[str] = []
        last = start
        for i in range(start, end):
            delta: ToolCallDelta | ReasoningRun | None = calls.get(i)
            if delta is None and i in thoughts:
                delta = REASONING
            if texts:
                if delta is run and not isinstance(delta, ToolCallDelta):  # both text, or both reasoning
                    texts.append(pieces[i])
                    last = i
                    continue
                if isinstance(delta, ToolCallDelta) and isinstance(run, ToolCallDelta) and run.index == delta.index:
                    call_id, name = run.id or delta.id, run.name or delta.name
                    if call_id != run.id or name != run.name:
                        run = ToolCallDelta(delta.index, call_id, name)
                    texts.append(pieces[i])
                    last = i
                    continue
                runs.append((run, "".join(texts), last))
            run, texts, last = delta, [pieces[i]], i
        if texts:
            runs.append((run, "".join(texts), last))
        return runs

    @property
    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens if self.completion_tokens is not None else self.counted_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    # -- as plain data -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: lists, strings, numbers and None only; ``from_dict`` reads it back equal."""
        return {
            "pieces": list(self.pieces),
            "tool_calls": [[i, d.index, d.id, d.name] for i, d in self.tool_calls.items()],
            "reasoning": sorted(self.reasoning),
            "reasoning_tokens": self.reasoning_tokens,
            "sent_at": [[i, t] for i, t in self.sent_at.items()],
            "finish_reason": self.finish_reason,
            "stop_sequence": self.stop_sequence,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "counted_tokens": self.counted_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnswerLog:
        log = cls(int(data.get("prompt_tokens", 0)))
        pieces = [str(p) for p in data.get("pieces", ())]
        log.pieces = pieces
        log.nbytes = sum(utf8_len(p) for p in pieces)
        rows = sorted(data.get("tool_calls", ()), key=_first)  # piece order, as ``calls`` reads them
        log.tool_calls = {int(i): ToolCallDelta(int(index), call_id, name) for i, index, call_id, name in rows}
        log.sent_at = {int(i): float(t) for i, t in data.get("sent_at", ())}
        log.reasoning = {int(i) for i in data.get("reasoning", ())}
        log.counted_reasoning = sum(1 for i in log.reasoning if i < len(pieces) and pieces[i])
        reasoning_tokens = data.get("reasoning_tokens")
        log.reasoning_tokens = None if reasoning_tokens is None else int(reasoning_tokens)
        log.finish_reason = data.get("finish_reason")
        log.stop_sequence = data.get("stop_sequence")
        completion = data.get("completion_tokens")
        log.completion_tokens = None if completion is None else int(completion)
        log.counted_tokens = int(data.get("counted_tokens", sum(1 for p in pieces if p)))
        return log


def _first(row: list[Any]) -> Any:
    return row[0]
