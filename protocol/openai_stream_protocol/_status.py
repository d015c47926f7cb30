"""Node status messages (node -> server): the hello at start and the heartbeat while the node holds work.

Both travel on the node's chunk output as an empty string array whose metadata
names the node; neither is a chunk (docs/architecture.md, "Dora wire protocol",
"Hello and heartbeat"):

- **hello** (``hello: <node id>``), once, when the node can answer: after a
  restart it is how the server knows the replica is back. It states what the
  node can do: ``can_continue`` (it continues an answer another replica
  started, see ``_continuation.py``) and ``heartbeat_s`` (it sends heartbeats
  at that interval while it holds work).
- **heartbeat** (``heartbeat: <node id>``), every ``heartbeat_s`` while the
  node holds requests, with its load (``active`` generating, ``queued``
  waiting) and ``can_continue`` again, so that a server that missed the hello
  still learns it. A replica that holds requests and has said nothing for the
  server's ``--replica-silence-s`` is treated as dead (a stopped process, a
  machine whose daemon is gone): that is what the heartbeat is for. One more
  heartbeat with no load is sent when the node becomes idle; an idle node
  sends none, so an idle dataflow pays nothing for them.

A node that sends neither keeps the older behaviour: the server learns of its
death only from dora (``INPUT_CLOSED``, ``NODE_RESTARTED``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from ._chunk import OutputSender
from ._resend import CAN_RESEND_KEY
from ._servers import answer_outputs
from ._wire import HELLO_KEY, as_bool

HEARTBEAT_KEY = "heartbeat"
"""Metadata key of a heartbeat: the node id."""
CAN_CONTINUE_KEY = "can_continue"
"""Hello and heartbeat metadata, bool: the node honours ``continue_from`` (absent: it does not)."""
HEARTBEAT_S_KEY = "heartbeat_s"
"""Hello metadata, float: the node sends a heartbeat at least this often while it holds work (absent: never)."""
ACTIVE_KEY = "active"
"""Heartbeat metadata, int: requests the node is generating."""
QUEUED_KEY = "queued"
"""Heartbeat metadata, int: requests waiting in the node for a slot."""
MODELS_KEY = "models"
"""Hello and heartbeat metadata, list of str: the model names this node serves (absent: it does not say, and serves
whatever the server sends it). Replicas that name the same model form its group: the server routes a request for
that name to them only (docs/team.md, "Models by name")."""
CAPACITY_KEY = "capacity"
"""Hello and heartbeat metadata, int: requests the node generates at once (absent: it does not say). The server's
admission queue takes a model group's capacity from it (docs/team.md, "Queue and tiers")."""

DEFAULT_HEARTBEAT_S = 0.25
"""A few hundred ms: a silence of a few seconds is then many missed heartbeats, never one late message."""
LOAD_CHANGE_S = 0.02
"""While busy, a heartbeat also goes out when the load changes, at most this often (servers route on the load)."""

_EMPTY = pa.array([], type=pa.string())


def send_hello(
    node: OutputSender,
    node_id: str,
    output: str = "chunks",
    *,
    can_continue: bool = False,
    heartbeat_s: float | None = None,
    can_resend: bool = False,
    models: tuple[str, ...] = (),
    capacity: int | None = None,
) -> None:
    """Tell the server this node is up (``HELLO_KEY``), and what it can do.

    An empty string array, metadata ``hello: node_id``; ``can_continue``, ``heartbeat_s`` and ``can_resend``
    (it answers resend asks, ``_resend.py``) only when given.
    """
    metadata: dict[str, Any] = {HELLO_KEY: node_id}
    if can_continue:
        metadata[CAN_CONTINUE_KEY] = True
    if can_resend:
        metadata[CAN_RESEND_KEY] = True
    if heartbeat_s:
        metadata[HEARTBEAT_S_KEY] = float(heartbeat_s)
    if models:
        metadata[MODELS_KEY] = list(models)
    if capacity:
        metadata[CAPACITY_KEY] = int(capacity)
    node.send_output(output, _EMPTY, metadata)


def send_heartbeat(
    node: OutputSender,
    node_id: str,
    output: str = "chunks",
    *,
    active: int = 0,
    queued: int = 0,
    can_continue: bool = False,
    can_resend: bool = False,
    models: tuple[str, ...] = (),
) -> None:
    """One heartbeat: an empty string array, metadata ``heartbeat: node_id``, ``active``, ``queued`` (and ``can_continue``,
    ``can_resend``, ``models``)."""
    metadata: dict[str, Any] = {HEARTBEAT_KEY: node_id, ACTIVE_KEY: int(active), QUEUED_KEY: int(queued)}
    if can_continue:
        metadata[CAN_CONTINUE_KEY] = True
    if can_resend:
        metadata[CAN_RESEND_KEY] = True
    if models:
        metadata[MODELS_KEY] = list(models)
    node.send_output(output, _EMPTY, metadata)


def is_status(metadata: Mapping[str, Any]) -> bool:
    """Whether a message on a chunk output is a hello or a heartbeat (never a chunk)."""
    return HELLO_KEY in metadata or HEARTBEAT_KEY in metadata


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A hello or a heartbeat as the server reads it (``parse_status``)."""

    kind: Literal["hello", "heartbeat"]
    node_id: str
    can_continue: bool = False
    heartbeat_s: float | None = None
    """Hello only: the interval the node promised (``None``: it sends no heartbeats)."""
    active: int | None = None
    """Heartbeat only: requests generating."""
    queued: int | None = None
    """Heartbeat only: requests waiting in the node."""
    can_resend: bool = False
    """It answers resend asks for lost chunks (``_resend.py``)."""
    models: tuple[str, ...] = ()
    """The model names it serves (``MODELS_KEY``); empty when it did not say."""
    capacity: int | None = None
    """Requests it generates at once (``CAPACITY_KEY``); None when it did not say."""


def parse_status(metadata: Mapping[str, Any]) -> NodeStatus | None:
    """A hello or heartbeat (``None`` for anything else); lenient, never raises: an odd value reads as not given."""
    if HELLO_KEY in metadata:
        kind: Literal["hello", "heartbeat"] = "hello"
    elif HEARTBEAT_KEY in metadata:
        kind = "heartbeat"
    else:
        return None
    return NodeStatus(
        kind,
        str(metadata.get(kind)),
        can_continue=as_bool(metadata.get(CAN_CONTINUE_KEY, False)),
        heartbeat_s=_positive_float(metadata.get(HEARTBEAT_S_KEY)) if kind == "hello" else None,
        active=_count(metadata.get(ACTIVE_KEY)) if kind == "heartbeat" else None,
        queued=_count(metadata.get(QUEUED_KEY)) if kind == "heartbeat" else None,
        can_resend=as_bool(metadata.get(CAN_RESEND_KEY, False)),
        models=_names(metadata.get(MODELS_KEY)),
        capacity=_count(metadata.get(CAPACITY_KEY)) or None,
    )


def _names(value: Any) -> tuple[str, ...]:
    """A list of names, or one comma-separated string; anything else reads as none."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(dict.fromkeys(v.strip() for v in value if isinstance(v, str) and v.strip()))


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and number == number and number != float("inf") else None


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


class Heartbeat:
    """A node's hello and heartbeats, sent from the thread that owns ``send_output``.

    Call ``hello()`` once the node can answer, then ``beat(active, queued)``
    from the node's loop, and block no longer than the seconds it returns::

        heartbeat = Heartbeat(node, node_id_from_env(os.environ, "my-node"), can_continue=True)
        heartbeat.hello()
        while True:
            wait = heartbeat.beat(len(generating), len(waiting))  # None: idle, nothing to send
            event = node.next(timeout=wait)
            ...

    ``beat`` sends at once when the node takes on work after being idle, then
    every ``interval_s`` while it holds any and whenever its load changes (at
    most every ``LOAD_CHANGE_S``), and once more (load 0) when it becomes
    idle. ``interval_s`` 0 turns heartbeats off (``beat`` then only returns
    ``None``), and the hello then promises none. Each goes to every
    chunk output the dataflow declares (``answer_outputs``): with several server
    processes, one per server, so that every server sees the replica's load.
    """

    __slots__ = (
        "node", "node_id", "output", "outputs", "interval_s", "can_continue", "can_resend", "clock", "sent", "_next_at",
        "_busy", "models", "capacity",
    )  # fmt: skip

    def __init__(
        self,
        node: OutputSender,
        node_id: str,
        output: str = "chunks",
        *,
        interval_s: float = DEFAULT_HEARTBEAT_S,
        can_continue: bool = False,
        can_resend: bool = False,
        clock: Callable[[], float] = time.monotonic,
        models: tuple[str, ...] = (),
        capacity: int | None = None,
    ) -> None:
        if not interval_s >= 0:
            raise ValueError(f"the heartbeat interval must be 0 (off) or more seconds, got {interval_s!r}")
        self.node = node
        self.node_id = node_id
        self.output = output
        self.outputs = answer_outputs(node, output)
        """``output`` and every ``<output>/<server>`` the node declares: where the hello and the heartbeats go."""
        self.interval_s = interval_s
        self.can_continue = can_continue
        self.can_resend = can_resend
        """It answers resend asks (``ResendingOutput``): said in the hello and every heartbeat."""
        self.clock = clock
        self.models = tuple(models)
        """The model names it serves, said in the hello and every heartbeat (``MODELS_KEY``)."""
        self.capacity = capacity
        """Requests it generates at once, said in the hello (``CAPACITY_KEY``); None: it does not say."""
        self.sent = 0
        """Heartbeats sent so far."""
        self._next_at = 0.0
        self._busy: tuple[int, int] | tuple[()] = ()
        """The load last told, ``(active, queued)``; ``()`` once the idle beat went (or before any)."""

    def hello(self) -> None:
        for output in self.outputs:
            send_hello(
                self.node,
                self.node_id,
                output,
                can_continue=self.can_continue,
                heartbeat_s=self.interval_s or None,
                can_resend=self.can_resend,
                models=self.models,
                capacity=self.capacity,
            )

    def beat(self, active: int, queued: int = 0) -> float | None:
        """Send a heartbeat if one is due; the seconds until the next one is (``None`` while idle or off)."""
        if not self.interval_s:
            return None
        busy = active > 0 or queued > 0
        if not busy and not self._busy:
            return None
        now = self.clock()
        load = (active, queued) if busy else ()
        told_at = self._next_at - self.interval_s
        # A change of load is told at once, at most every LOAD_CHANGE_S: with several servers each routes on it, and
        # a report up to interval_s old would count requests that other servers' replicas have long ended.
        changed = load != self._busy
        if busy != bool(self._busy) or now >= self._next_at or (changed and now >= told_at + LOAD_CHANGE_S):
            self._busy = load
            self._next_at = now + self.interval_s
            for output in self.outputs:
                send_heartbeat(
                    self.node,
                    self.node_id,
                    output,
                    active=active,
                    queued=queued,
                    can_continue=self.can_continue,
                    can_resend=self.can_resend,
                    models=self.models,
                )
            self.sent += 1
            if not busy:
                return None
            return max(0.0, self._next_at - now)
        if changed:  # told as soon as LOAD_CHANGE_S has passed since the last beat
            return max(0.0, min(self._next_at, told_at + LOAD_CHANGE_S) - now)
        return max(0.0, self._next_at - now)


_NODE_ID = re.compile(r"^node_id: *(\S+)", re.MULTILINE)


def node_id_from_env(environ: Mapping[str, str], default: str) -> str:
    """This node's id in the dataflow: the ``node_id:`` line dora writes into ``DORA_NODE_CONFIG``, else ``default``."""
    match = _NODE_ID.search(environ.get("DORA_NODE_CONFIG", ""))
    return match.group(1) if match else default
