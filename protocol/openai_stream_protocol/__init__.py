"""The dora wire protocol shared by openai-stream-server and streaming nodes.

See docs/architecture.md, "Dora wire protocol". This package imports pyarrow
and the standard library only, so node authors (echo_stream, qwenvl_stream,
third parties) can use it without pulling in the HTTP stack.

Request (server -> node), output ``v1/chat/completions``:
    data: a string array, one element per message part, in the dora-hub
    convention (``"<|user|>\\n<|im_start|>\\n" + text`` ...);
    metadata: ``request_id`` and ``session_id`` (the completion id), ``model``,
    ``stream``, ``max_tokens`` and, when given, ``temperature``, ``top_p``,
    ``stop``, ``seed``, and the tool-calling entries ``tools`` and
    ``tool_choice`` (JSON text) and ``parallel_tool_calls`` (bool).

Chunk (node -> server): data is a string array whose elements joined are the
delta text; metadata ``request_id``/``session_id``, ``seq`` (0, 1, 2, ...),
``fin: true`` on the last chunk, optional ``finish_reason``, ``error``,
``prompt_tokens``, ``completion_tokens`` and ``stop_sequence`` (the stop
string that ended the answer, which is cut before it; ``finish_reason`` stays
``stop``).

Tool calls (docs/architecture.md, "Tool calls"):
    request: ``encode_tools`` writes the metadata entries (server);
    ``request_tools``, ``request_tool_choice``, ``request_parallel_tool_calls``
    and ``allowed_tools`` read them leniently, never raising (nodes).
    conversation: an assistant turn's calls are a ``Part`` of kind
    ``tool_calls`` (``ASSISTANT_TOOL_CALLS_PREFIX`` + JSON list of
    ``{"id", "name", "arguments"}``; ``Part.of_tool_calls``, ``Part.calls``);
    a tool result is ``TOOL_PREFIX + TOOL_CALL_ID_MARK + id + "\n" + text``
    (``Part.tool_call_id``), so nodes that know only ``TOOL_PREFIX`` still
    read text.
    chunks: a tool-call delta has metadata ``tool_call_index`` (0, 1, ...),
    and on the call's first chunk ``tool_call_id`` and ``tool_call_name``;
    its text is a piece of the arguments JSON. ``ChunkSender.send_tool_call``
    / ``BatchSender.send_tool_call`` send it, ``Chunk.tool_call``
    (``ToolCallDelta``) reads it; the answer ends with ``finish_reason:
    tool_calls``.

Batch (node -> server): one message, data a struct array with one row per
chunk of many requests (``request_id``, ``seq``, ``text``, ``fin`` and the
optional ``finish_reason``, ``error``, ``prompt_tokens``,
``completion_tokens``, ``sent_at``, ``tool_call_index``, ``tool_call_id``,
``tool_call_name``, ``stop_sequence``); told apart by its type. ``BatchSender``
builds it, ``parse_batch`` reads it.

Cancel (server -> node), output ``cancel``: ``pa.array([request_id])`` with
metadata ``request_id``.

Hello and heartbeat (node -> server, on the chunk output, never chunks): an
empty string array with metadata ``hello: <node id>`` once the node can answer
(with ``can_continue`` and ``heartbeat_s`` when it has them), and ``heartbeat:
<node id>`` with ``active`` and ``queued`` every ``heartbeat_s`` while it holds
work. ``Heartbeat`` sends both from a node's loop; ``parse_status`` reads them
(``_status.py``).

Continuation (server -> node, on a re-sent request): ``continue_from`` (int,
the pieces the client already has, which is also the first ``seq`` to send) and
``continued_pieces`` (JSON text: those pieces); the node answers only the rest.
``read_continuation`` reads them, ``Continuation.to_metadata`` writes them
(``_continuation.py``).

Reasoning (docs/architecture.md, "Reasoning"): a chunk with ``kind:
"reasoning"`` (a batch row whose ``kind`` column says so) is a piece of the
model's reasoning, not of its answer (``ChunkSender.send_reasoning``,
``BatchSender.send_reasoning``, ``Chunk.reasoning``); a finish chunk may count
``reasoning_tokens``. The request's ``reasoning`` entry (JSON text, from chat
``reasoning_effort``, Responses ``reasoning.effort`` or Anthropic
``thinking``) is read with ``request_reasoning``; a node that cannot reason
ignores it (``_reasoning.py``).

Busy (node -> server): an ``error`` finish chunk with ``error_code: busy``
(``ChunkSender.busy``, ``BatchSender.busy``) turns a request away with nothing
generated, so that the server may try another replica.

Resend (docs/architecture.md, "Resend"): the server asks a replica that said
``can_resend`` for chunks lost on the way (output ``resend/<node id>``:
``resend_from``, ``resend_to``); the node sends them again as first sent, or
answers ``resend_missed`` when it no longer holds them. ``ResendingOutput``
keeps a bounded memory of what a node sent and answers asks (``_resend.py``).
``check_zenoh_overlay`` ends a node whose ``DORA_ZENOH_CONFIG_OVERLAY`` names no
file, before ``Node()`` (``_overlay.py``).

Several servers (docs/architecture.md, "Several server processes"): in the
multi-server layout a request carries ``server`` (``SERVER_KEY``: the node id
of the server that sent it) and its answer goes to the replica's output
``<chunk output>/<server>``; ``ChunkSender``, ``BatchSender`` and
``Heartbeat`` (to every ``answer_outputs``) do it by themselves, and
``dispatch_event`` takes ``v1/chat/completions/<server>`` and
``cancel/<server>`` as request and cancel inputs and tells a handler's
``on_server_gone(server)`` when a server process is gone (``_servers.py``).
"""

from ._batch import BatchSender, is_batch, parse_batch
from ._chunk import BUSY, ERROR_CODE_KEY, FINISH_REASONS, Chunk, ChunkSender, OutputSender, parse_chunk
from ._continuation import (
    CONTINUE_FROM_KEY,
    CONTINUED_PIECES_KEY,
    Continuation,
    Piece,
    continue_from,
    read_continuation,
)
from ._events import REQUEST_INPUTS, NodeEventHandler, dispatch_event
from ._overlay import ZENOH_OVERLAY_ENV, check_zenoh_overlay, zenoh_overlay_problem
from ._reasoning import (
    KIND_KEY,
    REASONING,
    REASONING_EFFORTS,
    REASONING_KEY,
    REASONING_TOKENS_KEY,
    ReasoningRequest,
    is_reasoning,
    request_reasoning,
)
from ._request import Kind, Part, Role, last_user_text, parse_request_texts, split_tokens
from ._resend import (
    CAN_RESEND_KEY,
    RESEND_FROM_KEY,
    RESEND_MISSED_KEY,
    RESEND_OUTPUT,
    RESEND_TO_KEY,
    RESENT_KEY,
    ResendAsk,
    ResendingOutput,
    has_resend_input,
    is_resend_missed,
    parse_resend_missed,
    read_resend_ask,
    send_resend_ask,
    send_resend_missed,
)
from ._servers import SERVER_KEY, answer_outputs, reply_output, request_server, server_of_input
from ._status import (
    ACTIVE_KEY,
    CAN_CONTINUE_KEY,
    CAPACITY_KEY,
    DEFAULT_HEARTBEAT_S,
    HEARTBEAT_KEY,
    HEARTBEAT_S_KEY,
    LOAD_CHANGE_S,
    MODELS_KEY,
    QUEUED_KEY,
    Heartbeat,
    NodeStatus,
    is_status,
    node_id_from_env,
    parse_status,
    send_heartbeat,
    send_hello,
)
from ._tools import (
    PARALLEL_TOOL_CALLS_KEY,
    TOOL_CALL_ID_KEY,
    TOOL_CALL_INDEX_KEY,
    TOOL_CALL_NAME_KEY,
    TOOL_CHOICE_KEY,
    TOOLS_KEY,
    ToolCall,
    ToolCallDelta,
    allowed_tools,
    decode_tool_calls,
    encode_tool_calls,
    encode_tools,
    new_tool_call_id,
    request_parallel_tool_calls,
    request_tool_choice,
    request_tools,
    tool_name,
)
from ._wire import (
    ASSISTANT_PREFIX,
    ASSISTANT_TOOL_CALLS_PREFIX,
    CANCEL_OUTPUT,
    HELLO_KEY,
    REQUEST_OUTPUT,
    SYSTEM_PREFIX,
    TOOL_CALL_ID_MARK,
    TOOL_PREFIX,
    USER_IMAGE_PREFIX,
    USER_TEXT_PREFIX,
    as_bool,
    as_int,
    cancelled_request_id,
    request_id_of,
    string_array,
    texts_of,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVE_KEY",
    "ASSISTANT_PREFIX",
    "ASSISTANT_TOOL_CALLS_PREFIX",
    "BUSY",
    "CANCEL_OUTPUT",
    "CAN_CONTINUE_KEY",
    "CAN_RESEND_KEY",
    "CONTINUED_PIECES_KEY",
    "CONTINUE_FROM_KEY",
    "DEFAULT_HEARTBEAT_S",
    "ERROR_CODE_KEY",
    "FINISH_REASONS",
    "HEARTBEAT_KEY",
    "HEARTBEAT_S_KEY",
    "HELLO_KEY",
    "KIND_KEY",
    "LOAD_CHANGE_S",
    "PARALLEL_TOOL_CALLS_KEY",
    "MODELS_KEY",
    "CAPACITY_KEY",
    "QUEUED_KEY",
    "REASONING",
    "REASONING_EFFORTS",
    "REASONING_KEY",
    "REASONING_TOKENS_KEY",
    "REQUEST_INPUTS",
    "REQUEST_OUTPUT",
    "RESEND_FROM_KEY",
    "RESEND_MISSED_KEY",
    "RESEND_OUTPUT",
    "RESEND_TO_KEY",
    "RESENT_KEY",
    "SERVER_KEY",
    "SYSTEM_PREFIX",
    "TOOLS_KEY",
    "TOOL_CALL_ID_KEY",
    "TOOL_CALL_ID_MARK",
    "TOOL_CALL_INDEX_KEY",
    "TOOL_CALL_NAME_KEY",
    "TOOL_CHOICE_KEY",
    "TOOL_PREFIX",
    "USER_IMAGE_PREFIX",
    "USER_TEXT_PREFIX",
    "ZENOH_OVERLAY_ENV",
    "BatchSender",
    "Chunk",
    "ChunkSender",
    "Continuation",
    "Heartbeat",
    "Kind",
    "NodeEventHandler",
    "NodeStatus",
    "OutputSender",
    "Part",
    "Piece",
    "ReasoningRequest",
    "ResendAsk",
    "ResendingOutput",
    "Role",
    "ToolCall",
    "ToolCallDelta",
    "allowed_tools",
    "answer_outputs",
    "as_bool",
    "as_int",
    "cancelled_request_id",
    "check_zenoh_overlay",
    "continue_from",
    "decode_tool_calls",
    "dispatch_event",
    "encode_tool_calls",
    "encode_tools",
    "has_resend_input",
    "is_batch",
    "is_reasoning",
    "is_resend_missed",
    "is_status",
    "last_user_text",
    "new_tool_call_id",
    "node_id_from_env",
    "parse_batch",
    "parse_chunk",
    "parse_request_texts",
    "parse_resend_missed",
    "parse_status",
    "read_continuation",
    "read_resend_ask",
    "reply_output",
    "request_id_of",
    "request_parallel_tool_calls",
    "request_reasoning",
    "request_server",
    "request_tool_choice",
    "request_tools",
    "send_heartbeat",
    "send_hello",
    "send_resend_ask",
    "send_resend_missed",
    "server_of_input",
    "split_tokens",
    "string_array",
    "texts_of",
    "tool_name",
    "zenoh_overlay_problem",
]
