"""The reorder buffer: chunks that came before their turn, held until the gap before them fills.

One per completion (``state.StreamState``); docs/architecture.md, "A request's path through the
code" (Accept). Chunks in order never enter it.
"""

from __future__ import annotations

from openai_stream_protocol import Chunk

from .answer_log import utf8_len

HELD_CHUNK_OVERHEAD_BYTES = 320
"""What one held chunk costs beyond its text's UTF-8 bytes.

Measured on CPython 3.11 (tracemalloc): about 270 bytes for an empty chunk (the ``Chunk`` object, its
request id string, the int key and the dict entry), rounded up. Held chunks count towards
``max_completion_bytes`` too, so a node that sends ``seq`` far ahead (never ``seq`` 0) ends its
request instead of filling memory (docs/architecture.md, "Memory bounds").
"""


def held_cost(chunk: Chunk) -> int:
    return utf8_len(chunk.text) + HELD_CHUNK_OVERHEAD_BYTES


class ReorderBuffer:
    __slots__ = ("held", "nbytes", "fin_seq", "gap_since")

    def __init__(self) -> None:
        self.held: dict[int, Chunk] = {}
        """seq -> the chunk that came early."""
        self.nbytes = 0
        """What the held chunks cost for the byte limits (``held_cost`` summed)."""
        self.fin_seq: int | None = None
        """The finish marker's seq once it has come (early): nothing after it is taken."""
        self.gap_since: float | None = None
        """When the oldest gap still open was noticed (the gap timeout counts from it)."""

    def __len__(self) -> int:
        return len(self.held)

    def seen(self, seq: int, next_seq: int) -> bool:
        """A chunk ``seq`` would be a duplicate: logged already, held already, or past the finish marker."""
        return seq < next_seq or seq in self.held or (self.fin_seq is not None and seq > self.fin_seq)

    def hold(self, chunk: Chunk, seq: int, cost: int, now: float) -> None:
        self.held[seq] = chunk
        self.nbytes += cost
        if self.gap_since is None:
            self.gap_since = now

    def take(self, seq: int) -> Chunk | None:
        """The held chunk ``seq``, now its turn has come (None if it has not come yet); it leaves the buffer."""
        chunk = self.held.pop(seq, None)
        if chunk is not None:
            self.nbytes -= held_cost(chunk)
        return chunk

    def clear(self) -> int:
        """Let every held chunk go (the completion ended); returns the bytes given back."""
        released, self.nbytes = self.nbytes, 0
        self.held.clear()
        self.gap_since = None
        return released
