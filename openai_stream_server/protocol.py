"""The dora wire protocol shared by the server and streaming nodes.

See DESIGN.md, "Dora wire protocol". This module imports pyarrow and the
standard library only, so node authors (echo_stream, qwenvl_stream, third
parties) can use it without pulling in the HTTP stack.

Request (server -> node), output ``v1/chat/completions``:
    data: a string array, one element per message part, in the dora-hub
    convention (``"<|user|>\\n<|im_start|>\\n" + text`` ...);
    metadata: ``request_id`` and ``session_id`` (the completion id), ``model``,
    ``stream``, ``max_tokens`` and, when given, ``temperature``, ``top_p``,
    ``stop``, ``seed``.

Chunk (node -> server): data is a string array whose elements joined are the
delta text; metadata ``request_id``/``session_id``, ``seq`` (0, 1, 2, ...),
``fin: true`` on the last chunk, optional ``finish_reason``, ``error``,
``prompt_tokens`` and ``completion_tokens``.

Cancel (server -> node), output ``cancel``: ``pa.array([request_id])`` with
metadata ``request_id``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pyarrow as pa

REQUEST_OUTPUT = "v1/chat/completions"
CANCEL_OUTPUT = "cancel"

SYSTEM_PREFIX = "<|system|>\n"
ASSISTANT_PREFIX = "<|assistant|>\n"
TOOL_PREFIX = "<|tool|>\n"
USER_TEXT_PREFIX = "<|user|>\n<|im_start|>\n"
USER_IMAGE_PREFIX = "<|user|>\n<|vision_start|>\n"

FINISH_REASONS = frozenset({"stop", "length", "content_filter", "error"})

Role = Literal["system", "user", "assistant", "tool"]
Kind = Literal["text", "image"]

# Longest prefixes first: both user prefixes start with "<|user|>\n".
_PREFIXES: tuple[tuple[str, Role, Kind], ...] = (
    (USER_TEXT_PREFIX, "user", "text"),
    (USER_IMAGE_PREFIX, "user", "image"),
    (SYSTEM_PREFIX, "system", "text"),
    (ASSISTANT_PREFIX, "assistant", "text"),
    (TOOL_PREFIX, "tool", "text"),
)


@dataclass(frozen=True, slots=True)
class Part:
    """One element of a request: a role, a kind and its text or image URL."""

    role: Role
    kind: Kind
    content: str

    def encode(self) -> str:
        """Render in the dora-hub convention."""
        if self.role == "user":
            prefix = USER_IMAGE_PREFIX if self.kind == "image" else USER_TEXT_PREFIX
        else:
            prefix = {"system": SYSTEM_PREFIX, "assistant": ASSISTANT_PREFIX, "tool": TOOL_PREFIX}[self.role]
        return prefix + self.content


def parse_request_texts(texts: Iterable[str]) -> list[Part]:
    """Turn request texts back into parts; text without a known prefix counts as user text."""
    parts = []
    for text in texts:
        for prefix, role, kind in _PREFIXES:
            if text.startswith(prefix):
                parts.append(Part(role, kind, text[len(prefix) :]))
                break
        else:
            parts.append(Part("user", "text", text))
    return parts


def last_user_text(parts: Iterable[Part]) -> str:
    """The text parts of the last user turn, joined with newlines (what echo nodes answer)."""
    turn: list[str] = []
    in_user_turn = False
    for part in parts:
        if part.role == "user":
            if not in_user_turn:
                turn, in_user_turn = [], True
            if part.kind == "text":
                turn.append(part.content)
        else:
            in_user_turn = False
    return "\n".join(turn)


def texts_of(value: pa.Array) -> list[str]:
    """The strings of a dora string array (one element is the common case, kept cheap).

    ``to_pylist()`` costs ~0.2 us for one element, ``value[0].as_py()`` ~0.9 us
    (benchmarks/README.md, per-chunk costs): this runs once per chunk.
    """
    items = value.to_pylist()
    if len(items) == 1 and type(items[0]) is str:
        return items  # type: ignore[no-any-return]
    return [item if isinstance(item, str) else str(item) for item in items if item is not None]


def request_id_of(metadata: Mapping[str, Any]) -> str | None:
    """The request a message belongs to: ``request_id``, else ``session_id``."""
    value = metadata.get("request_id") or metadata.get("session_id")
    return str(value) if value else None


def as_int(value: Any) -> int | None:
    """Lenient integer: ``3`` and ``"3"`` both read as 3 (dora's streaming example sends strings)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"not an integer: {value!r}")


def as_bool(value: Any) -> bool:
    """Lenient boolean: ``True``, ``"true"``, ``1`` and ``"1"`` are true."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


@dataclass(slots=True)
class Chunk:
    """One message from a node, parsed leniently.

    ``seq is None`` marks a legacy reply (dora-echo, dora-qwen2-5-vl): one
    whole answer, matched by ``request_id`` or else to the oldest request
    still waiting for one.
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


def parse_chunk(texts: list[str], metadata: Mapping[str, Any]) -> Chunk:
    """Read a chunk message; raises ``ValueError`` for a malformed ``seq`` or token count."""
    seq = as_int(metadata.get("seq"))
    if seq is None:
        return Chunk(request_id_of(metadata), None, "\n".join(texts), fin=True, finish_reason="stop")
    finish_reason = metadata.get("finish_reason") or None
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise ValueError(f"unknown finish_reason: {finish_reason!r}")
    fin = as_bool(metadata.get("fin", False)) or finish_reason is not None
    error = metadata.get("error")
    sent_at = metadata.get("sent_at")
    return Chunk(
        request_id=request_id_of(metadata),
        seq=seq,
        text="".join(texts),
        fin=fin,
        finish_reason=(finish_reason or ("error" if error else "stop")) if fin else None,
        error=str(error) if error else None,
        prompt_tokens=as_int(metadata.get("prompt_tokens")),
        completion_tokens=as_int(metadata.get("completion_tokens")),
        sent_at=float(sent_at) if isinstance(sent_at, (int, float)) else None,
    )


class OutputSender(Protocol):
    """The part of ``dora.Node`` the helpers use (a test can pass a recorder)."""

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None: ...


def string_array(texts: list[str]) -> pa.Array:
    """A pyarrow string array; passing the type costs ~3 µs instead of ~46 µs (DESIGN.md)."""
    return pa.array(texts, type=pa.string())


_TOKEN = re.compile(r"\s*\S+|\s+")


def split_tokens(text: str) -> list[str]:
    """Whitespace-keeping word tokens: ``"".join(split_tokens(t)) == t``."""
    return _TOKEN.findall(text)


class ChunkSender:
    """Sends one request's answer as numbered chunks, then the finish marker.

    Never sets ``flush``: dora empties the whole input queue on it, which
    would throw away other requests' chunks (DESIGN.md).
    """

    __slots__ = ("node", "output", "request_id", "seq", "finished", "_ids")

    def __init__(self, node: OutputSender, request_metadata: Mapping[str, Any], output: str = "chunks") -> None:
        request_id = request_id_of(request_metadata)
        if request_id is None:
            raise ValueError("request metadata has neither request_id nor session_id")
        self.node = node
        self.output = output
        self.request_id = request_id
        self.seq = 0
        self.finished = False
        self._ids = {"request_id": request_id, "session_id": request_id}

    def send(self, text: str, **extra: Any) -> None:
        """Send one delta."""
        if self.finished:
            raise RuntimeError(f"request {self.request_id} already finished")
        self.node.send_output(self.output, string_array([text]), {**self._ids, "seq": self.seq, **extra})
        self.seq += 1

    def finish(
        self,
        finish_reason: str = "stop",
        text: str = "",
        *,
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        **extra: Any,
    ) -> None:
        """Send the last chunk: ``fin: true`` with its finish reason and token counts."""
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason: {finish_reason!r}")
        metadata: dict[str, Any] = {"fin": True, "finish_reason": finish_reason, **extra}
        if error is not None:
            metadata["error"] = error
        if prompt_tokens is not None:
            metadata["prompt_tokens"] = prompt_tokens
        if completion_tokens is not None:
            metadata["completion_tokens"] = completion_tokens
        self.send(text, **metadata)
        self.finished = True


def cancelled_request_id(value: pa.Array, metadata: Mapping[str, Any]) -> str | None:
    """The request id a ``cancel`` message names."""
    request_id = request_id_of(metadata)
    if request_id is None and len(value):
        request_id = str(value[0].as_py())
    return request_id
