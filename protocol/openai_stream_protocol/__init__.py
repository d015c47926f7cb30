"""The dora wire protocol shared by openai-stream-server and streaming nodes.

See docs/architecture.md, "Dora wire protocol". This package imports pyarrow
and the standard library only, so node authors (echo_stream, qwenvl_stream,
third parties) can use it without pulling in the HTTP stack.

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

Batch (node -> server): one message, data a struct array with one row per
chunk of many requests (``request_id``, ``seq``, ``text``, ``fin`` and the
optional ``finish_reason``, ``error``, ``prompt_tokens``,
``completion_tokens``, ``sent_at``); told apart by its type. ``BatchSender``
builds it, ``parse_batch`` reads it.

Cancel (server -> node), output ``cancel``: ``pa.array([request_id])`` with
metadata ``request_id``.
"""

from ._batch import BatchSender, is_batch, parse_batch
from ._chunk import FINISH_REASONS, Chunk, ChunkSender, OutputSender, parse_chunk
from ._events import REQUEST_INPUTS, NodeEventHandler, dispatch_event
from ._request import Kind, Part, Role, last_user_text, parse_request_texts, split_tokens
from ._wire import (
    ASSISTANT_PREFIX,
    CANCEL_OUTPUT,
    HELLO_KEY,
    REQUEST_OUTPUT,
    SYSTEM_PREFIX,
    TOOL_PREFIX,
    USER_IMAGE_PREFIX,
    USER_TEXT_PREFIX,
    as_bool,
    as_int,
    cancelled_request_id,
    request_id_of,
    send_hello,
    string_array,
    texts_of,
)

__version__ = "0.1.0"

__all__ = [
    "ASSISTANT_PREFIX",
    "CANCEL_OUTPUT",
    "FINISH_REASONS",
    "HELLO_KEY",
    "REQUEST_INPUTS",
    "REQUEST_OUTPUT",
    "SYSTEM_PREFIX",
    "TOOL_PREFIX",
    "USER_IMAGE_PREFIX",
    "USER_TEXT_PREFIX",
    "BatchSender",
    "Chunk",
    "ChunkSender",
    "Kind",
    "NodeEventHandler",
    "OutputSender",
    "Part",
    "Role",
    "as_bool",
    "as_int",
    "cancelled_request_id",
    "dispatch_event",
    "is_batch",
    "last_user_text",
    "parse_batch",
    "parse_chunk",
    "parse_request_texts",
    "request_id_of",
    "send_hello",
    "split_tokens",
    "string_array",
    "texts_of",
]
