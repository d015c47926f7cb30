"""Several server processes sharing the replicas (docs/architecture.md, "Several server processes").

In the multi-server layout every server node has its own request and cancel outputs to each
replica, and each replica has one chunk output per server, named ``<chunk output>/<server node
id>`` (``chunks/openai-stream-server-1``). dora sends an output to every subscriber, so an answer
on the asking server's own output reaches that server alone: no other server pays dora's receive
for it (one output shared by every server, each dropping the others' messages, cost 1.5x the
server CPU per chunk with two servers: benchmarks/README.md, "Several server processes").

What travels:

- each request carries ``server: <server node id>`` (``SERVER_KEY``), only in that layout;
- ``ChunkSender`` and ``BatchSender`` answer on ``reply_output(metadata, output)`` by themselves;
- ``Heartbeat`` says hello and beats on every chunk output (``answer_outputs``), so every server
  sees every replica's load;
- the request and cancel inputs are ``v1/chat/completions/<server>`` and ``cancel/<server>``;
  ``dispatch_event`` takes them as it takes ``v1/chat/completions`` and ``cancel``;
- when a server process dies (``NODE_RESTARTED`` with its id under a restart policy, or its
  request input closed), ``dispatch_event`` calls the handler's optional ``on_server_gone(server)``:
  the node stops what it generates for that server, nobody is left to read it.

A node in the single-server layout never sees the key and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._wire import CANCEL_OUTPUT, REQUEST_OUTPUT

SERVER_KEY = "server"
"""Request metadata, str: the node id of the server that sent it; its answers go to ``<chunk output>/<server>``."""


def request_server(metadata: Mapping[str, Any]) -> str | None:
    """The server a request came from (``SERVER_KEY``), None in the single-server layout."""
    server = metadata.get(SERVER_KEY)
    return str(server) if server else None


def reply_output(metadata: Mapping[str, Any], output: str = "chunks") -> str:
    """Where the answer to a request goes: ``output``, or ``<output>/<server>`` when the request names its server."""
    server = metadata.get(SERVER_KEY)
    return f"{output}/{server}" if server else output


def answer_outputs(node: Any, output: str = "chunks") -> list[str]:
    """The node's chunk outputs: ``output`` and every ``<output>/<server>`` its dataflow declares (``node.node_config()``).

    Hellos and heartbeats go to each, so that every server hears every replica. ``[output]`` when the node
    cannot tell (a test double, an older dora) or declares none of them.
    """
    # A wrapper of the node (``ResendingOutput``) keeps it as ``.node``.
    config = getattr(node, "node_config", None) or getattr(getattr(node, "node", None), "node_config", None)
    prefix = output + "/"
    try:
        declared = config().get("outputs") if config is not None else None
        found = [str(o) for o in declared or () if str(o) == output or str(o).startswith(prefix)]
    except Exception:  # not in a dataflow, an older dora, a test double
        return [output]
    return found or [output]


def server_of_input(input_id: str) -> str | None:
    """The server a request or cancel input comes from (``v1/chat/completions/<server>``, ``cancel/<server>``), else None."""
    for base in (REQUEST_OUTPUT, CANCEL_OUTPUT):
        if input_id.startswith(base + "/") and len(input_id) > len(base) + 1:
            return input_id[len(base) + 1 :]
    return None
