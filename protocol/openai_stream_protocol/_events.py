"""One dispatch of a node's dora events, so that every streaming node branches the same way."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from ._resend import is_resend_input, read_resend_ask
from ._servers import server_of_input
from ._wire import CANCEL_OUTPUT, REQUEST_OUTPUT, cancelled_request_id, texts_of

logger = logging.getLogger(__name__)

# The server's output is `v1/chat/completions`; a node manifest may not put `/`
# in a port name, so the hub spelling is accepted too.
REQUEST_INPUTS = frozenset({REQUEST_OUTPUT, "v1_chat_completions"})
_REQUEST_PREFIX = REQUEST_OUTPUT + "/"
_CANCEL_PREFIX = CANCEL_OUTPUT + "/"


class NodeEventHandler(Protocol):
    """What a streaming node does with the server's requests, cancels and ``STOP``."""

    def on_request(self, texts: list[str], metadata: Mapping[str, Any]) -> None: ...

    def on_cancel(self, request_id: str) -> None: ...

    def on_stop(self) -> None: ...


def dispatch_event(event: Mapping[str, Any], handler: NodeEventHandler) -> bool:
    """Hand one dora event to ``handler``; False after ``STOP``, True otherwise.

    Inputs other than a request or ``cancel`` (a timer, say) are ignored, and so
    are other event types (``INPUT_CLOSED``, ``NODE_RESTARTED``, ...). A ``resend``
    ask goes to ``handler.on_resend(ask)`` when the handler has that method (a node
    that answers resend asks, ``_resend.py``), and is ignored otherwise. In the
    multi-server layout (``_servers.py``) the inputs ``v1/chat/completions/<server>``
    and ``cancel/<server>`` count as the plain ones, and a server that is gone (dora
    restarted it, or its request input closed) goes to ``handler.on_server_gone(server)``
    when the handler has that method.
    """
    kind = event.get("type")
    if kind == "INPUT":
        input_id = event.get("id")
        metadata = event.get("metadata") or {}
        if input_id in REQUEST_INPUTS or (input_id or "").startswith(_REQUEST_PREFIX):
            handler.on_request(texts_of(event["value"]), metadata)
        elif input_id == CANCEL_OUTPUT or (input_id or "").startswith(_CANCEL_PREFIX):
            request_id = cancelled_request_id(event["value"], metadata)
            if request_id is not None:
                handler.on_cancel(request_id)
        elif is_resend_input(input_id or "") and (on_resend := getattr(handler, "on_resend", None)) is not None:
            ask = read_resend_ask(event["value"], metadata, input_id or "")
            if ask is not None:
                on_resend(ask)
        else:
            logger.debug("ignoring input %r", input_id)
    elif kind == "STOP":
        handler.on_stop()
        return False
    elif kind in ("NODE_RESTARTED", "INPUT_CLOSED"):
        # A restarted node may be a server: its new process knows nothing of what the old one asked.
        server = str(event.get("id")) if kind == "NODE_RESTARTED" else server_of_input(str(event.get("id")))
        gone = getattr(handler, "on_server_gone", None)
        if server and gone is not None:
            gone(server)
    elif kind == "ERROR":
        # dora's next(timeout=...) reports its timeout as an ERROR event: routine, not worth a warning.
        if "timed out" not in str(event.get("error", "")):
            logger.warning("dora error event: %s", event.get("error"))
    else:
        logger.debug("event %s %s", kind, event.get("id"))
    return True
