"""Output names, message prefixes and the lenient readers every message goes through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

REQUEST_OUTPUT = "v1/chat/completions"
CANCEL_OUTPUT = "cancel"
HELLO_KEY = "hello"
"""Metadata key of a node's hello message: sent once at start on its chunk output, never a chunk.

It tells the server that this replica is (again) up, which is the only news it gets after
``dora node restart``: dora closes the answer input and re-opens it silently (docs/architecture.md,
"Replicas and failover"). Optional: a node without it is picked up again on its next chunk.
``send_hello`` and the heartbeat are in ``_status.py``.
"""

SYSTEM_PREFIX = "<|system|>\n"
ASSISTANT_PREFIX = "<|assistant|>\n"
TOOL_PREFIX = "<|tool|>\n"
USER_TEXT_PREFIX = "<|user|>\n<|im_start|>\n"
USER_IMAGE_PREFIX = "<|user|>\n<|vision_start|>\n"
ASSISTANT_TOOL_CALLS_PREFIX = ASSISTANT_PREFIX + "<|tool_calls|>\n"
"""An assistant turn's tool calls: this prefix, then a JSON list ``[{"id", "name", "arguments"}]``."""
TOOL_CALL_ID_MARK = "<|tool_call_id|>"
"""A tool result names its call: ``TOOL_PREFIX + TOOL_CALL_ID_MARK + id + "\\n" + content``."""


def texts_of(value: pa.Array) -> list[str]:
    """The strings of a dora string array (one element is the common case, kept cheap).

    ``to_pylist()`` costs ~0.2 us for one element, ``value[0].as_py()`` ~0.9 us
    (benchmarks/README.md, "What changed in the server"): this runs once per chunk.
    """
    items = value.to_pylist()
    if len(items) == 1 and type(items[0]) is str:
        return items  # type: ignore[no-any-return]
    return [item if isinstance(item, str) else str(item) for item in items if item is not None]


def string_array(texts: list[str]) -> pa.Array:
    """A pyarrow string array; passing the type costs ~3 µs instead of ~46 µs (docs/architecture.md, "Facts measured")."""
    return pa.array(texts, type=pa.string())


def request_id_of(metadata: Mapping[str, Any]) -> str | None:
    """The request a message belongs to: ``request_id``, else ``session_id``."""
    value = metadata.get("request_id") or metadata.get("session_id")
    return str(value) if value else None


def cancelled_request_id(value: pa.Array, metadata: Mapping[str, Any]) -> str | None:
    """The request id a ``cancel`` message names."""
    request_id = request_id_of(metadata)
    if request_id is None and len(value):
        request_id = str(value[0].as_py())
    return request_id


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
