"""What is held, in bytes of its encoded form: the byte bounds count that, not the size of Python objects.

A parsed JSON body takes 10 to 30 times its encoded size as Python objects, and that ratio depends
on its shape; the encoded size is what a client controls and what the bounds promise
(docs/architecture.md, "Memory bounds"). So whatever a completion keeps beyond its answer is kept
in encoded form where it can be (the tools as JSON text, the prompt as the texts sent downstream)
and counted here by that form.
"""

from __future__ import annotations

from typing import Any

from .answer_log import LOGGED_CHUNK_OVERHEAD_BYTES, utf8_len
from .backend import DownstreamRequest


def request_nbytes(request: DownstreamRequest) -> int:
    """A request kept for re-sending: its texts in UTF-8 (plus the answer log's per-piece overhead each) and the
    strings of its metadata (the tools' JSON above all).

    The texts are joined and measured once rather than one by one: for 200,000 parts that is ~5 ms on the
    event loop instead of ~30 (it runs when the request is sent and again when it ends).
    """
    texts = request.texts
    return utf8_len("".join(texts)) + LOGGED_CHUNK_OVERHEAD_BYTES * len(texts) + metadata_nbytes(request.metadata)


def metadata_nbytes(metadata: dict[str, Any]) -> int:
    """The strings of request metadata (values and the strings of list values); numbers and flags are noise."""
    size = 0
    for value in metadata.values():
        if isinstance(value, str):
            size += utf8_len(value)
        elif isinstance(value, list):
            size += sum(utf8_len(item) for item in value if isinstance(item, str))
    return size
