"""Deprecated: import ``openai_stream_protocol`` instead (distribution ``openai-stream-protocol``, folder ``protocol/``).

The wire protocol moved into its own pyarrow-only package so that nodes need not
install the server. This module re-exports its public names for one release and
will then be removed.
"""

from openai_stream_protocol import (
    ASSISTANT_PREFIX,
    CANCEL_OUTPUT,
    FINISH_REASONS,
    REQUEST_OUTPUT,
    SYSTEM_PREFIX,
    TOOL_PREFIX,
    USER_IMAGE_PREFIX,
    USER_TEXT_PREFIX,
    Chunk,
    ChunkSender,
    Kind,
    OutputSender,
    Part,
    Role,
    as_bool,
    as_int,
    cancelled_request_id,
    last_user_text,
    parse_chunk,
    parse_request_texts,
    request_id_of,
    split_tokens,
    string_array,
    texts_of,
)

__all__ = [
    "ASSISTANT_PREFIX",
    "CANCEL_OUTPUT",
    "FINISH_REASONS",
    "REQUEST_OUTPUT",
    "SYSTEM_PREFIX",
    "TOOL_PREFIX",
    "USER_IMAGE_PREFIX",
    "USER_TEXT_PREFIX",
    "Chunk",
    "ChunkSender",
    "Kind",
    "OutputSender",
    "Part",
    "Role",
    "as_bool",
    "as_int",
    "cancelled_request_id",
    "last_user_text",
    "parse_chunk",
    "parse_request_texts",
    "request_id_of",
    "split_tokens",
    "string_array",
    "texts_of",
]
