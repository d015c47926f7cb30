"""The dora bridge: owns the ``dora.Node`` (docs/architecture.md, "Room 3: dora bridge").

One thread blocks on ``node.next()`` (it releases the GIL), takes whatever
else is queued with ``node.drain()`` (up to 25 % more throughput than one
hand-over per event, docs/architecture.md) and hands the batch to the event loop with
``loop.call_soon_threadsafe``. ``send_output`` is called from the loop thread
only. Dora and pyarrow errors become ``BackendUnavailable`` here, so the HTTP
layer never names a dora type.

The hand-over is bounded: at most ``MAX_BATCHES_IN_FLIGHT`` batches wait in
the loop's callback queue. Past that the reader waits for the loop to catch
up, and the chunks it has not read wait in dora's own input queue (whose
``queue_size`` and ``queue_policy`` the dataflow sets), not in our memory.

Replica liveness (docs/architecture.md, "Failover"): the reader reports each
hello and heartbeat; on the loop, a replica that promised heartbeats, holds
requests and has said nothing for ``replica_silence_s`` is treated as dead
until it speaks again, and a request goes to the least loaded replica that
has not failed it, that its circuit breaker does not keep away and, for a
continuation, that can continue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from openai_stream_protocol import (
    DEFAULT_HEARTBEAT_S,
    SERVER_KEY,
    Chunk,
    NodeStatus,
    ResendAsk,
    is_batch,
    is_resend_missed,
    is_status,
    parse_batch,
    parse_chunk,
    parse_resend_missed,
    parse_status,
    send_resend_ask,
    string_array,
    texts_of,
)

from .backend import ChunkSink, DownstreamRequest, OnLost, OnOrphaned
from .errors import BackendUnavailable, UpstreamError
from .frontdoor import per_server_replicas, server_place
from .replicas import DownReason, LegacyReplicas, Replica, ReplicaSet, discover, is_tick
from .resend import ResendRoutes
from .restarts import RestartLog

logger = logging.getLogger(__name__)


MAX_BATCHES_IN_FLIGHT = 64
"""Batches handed to the event loop and not yet delivered, at most; then the reader thread waits.

Each batch is everything dora had queued at one wake-up, so a loop that keeps up holds one or two;
64 only comes into play when the loop falls behind (a burst of slow clients, a long GC pause), and
then waiting costs nothing: the next ``drain()`` takes more at once, which is cheaper per chunk.
"""

RESTART_GRACE_S = 10.0
"""A node dora restarted that has never sent a hello (a third-party node) counts as live again after this long.

One that sends hellos (echo_stream, qwenvl_stream) is used again only on its hello: sending to it
before its new process has subscribed would lose the request (docs/architecture.md, "Replicas and failover").
"""

LIVENESS_INTERVAL_S = 0.25
"""How often the loop looks for silent replicas (at most; a quarter of ``replica_silence_s`` when that is shorter)."""

SLOT_WAIT_S = 0.1
"""How long one wait for a free slot lasts before the reader checks whether the bridge stopped."""

PROBE_REQUEST_ID = "resend-probe"
"""The request a silent replica is asked about (``probe_silent``): no request has this id, so it answers ``resend_missed``."""

ERROR_LOG_INTERVAL_S = 60.0
"""An unexpected exception on a chunk is logged (with its traceback) at most once per this long, with a count of
those since: a node that sends something odd on every token must not flood the log."""


class _Batch(list[Chunk]):
    """The chunks of one hand-over to the loop; remembers how far the sink's ``for`` loop got.

    Should the sink raise, the chunk it was on is the one it could not take: that one is dropped and the
    rest of the batch is delivered. A plain list iterator tracks its position at no cost per chunk.
    """

    __slots__ = ("_reading",)

    def __iter__(self) -> Iterator[Chunk]:
        self._reading = reading = super().__iter__()
        return reading

    def unread(self) -> int | None:
        """How many chunks the sink's last ``for`` loop had not reached; None if it never iterated."""
        reading = getattr(self, "_reading", None)
        return None if reading is None else reading.__length_hint__()


class _ThrottledLog:
    """``logger.error`` with the traceback, at most once per ``ERROR_LOG_INTERVAL_S``; one per thread (no lock)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.unlogged = 0
        self.logged_at: float | None = None

    def error(self, exc: BaseException) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if self.logged_at is not None and now - self.logged_at < ERROR_LOG_INTERVAL_S:
            return
        logger.error("%s (%d since the last report); dropped as malformed, serving on", self.what, self.unlogged, exc_info=exc)
        self.unlogged, self.logged_at = 0, now


class DoraBridge:
    def __init__(self, node: Any, *, replica_silence_s: float = 0.0, server_id: str = "") -> None:
        self._node = node
        self.server_id = server_id
        """This server's dora node id: what a request to a replica with an output for each server names (``server``)."""
        self._per_server: frozenset[str] = frozenset()
        """Replicas that answer this server on an output of its own (``frontdoor.per_server_replicas``)."""
        self.replica_silence_s = replica_silence_s
        """A replica that promised heartbeats, holds requests and said nothing this long is treated as dead (0: never)."""
        self._reader_waiting = False
        """The reader waits for the loop (``_wait_for_slot``): what it has not read is no silence of the replicas."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.stopped = False
        self.lost: str | None = None
        """Why no model replica is live (the last one's answer inputs closed), else None."""
        self.replicas = ReplicaSet(discover(None))
        self._seen_at: dict[str, float] = {}
        """Answer input -> when its last event came (written by the reader thread, read by /health)."""
        self._live: asyncio.Event | None = None
        self._on_lost: OnLost | None = None
        self._on_orphaned: OnOrphaned | None = None
        self.last_event_at: float | None = None
        self._unreadable = 0
        """Chunks the reader thread could not read (written by that thread only)."""
        self._undeliverable = 0
        """Chunks the sink raised on (written on the loop thread only)."""
        self._read_errors = _ThrottledLog("an unexpected error reading a dora event")
        self._deliver_errors = _ThrottledLog("an unexpected error delivering a chunk")
        self._slots = threading.Semaphore(MAX_BATCHES_IN_FLIGHT)
        """One per batch handed to the loop and not yet delivered (``MAX_BATCHES_IN_FLIGHT``)."""
        self.resend_routes = ResendRoutes(None, ())
        """Which replicas take resend asks for lost chunks, on which output (docs/architecture.md, "Resend")."""
        self.on_resend_missed: Callable[[str, int, str | None], None] | None = None
        """A replica answered an ask that it no longer holds the range: ``(wire id, first seq, replica id)``."""
        self.restart_log = RestartLog()
        """Restarts per replica over the last minute (``/health`` names one that keeps restarting)."""

    async def start(
        self, sink: ChunkSink, on_stop: Callable[[], None], on_lost: OnLost, on_orphaned: OnOrphaned | None = None
    ) -> None:
        self._loop = asyncio.get_running_loop()
        config = _node_config(self._node)
        self.replicas = ReplicaSet(discover(config))
        self._per_server = per_server_replicas(config, self.server_id)
        if self._per_server:
            self.replicas.spread = server_place(self.server_id)
        self.resend_routes = ResendRoutes(config, self.replicas.replicas)
        self._live = asyncio.Event()
        self._live.set()
        self._on_lost, self._on_orphaned = on_lost, on_orphaned
        names = ", ".join(f"{r.replica_id} ({r.request_output})" for r in self.replicas.replicas)
        logger.info("model replicas: %s", names)
        self._thread = threading.Thread(target=self._read, args=(sink, on_stop), name="dora-reader", daemon=True)
        self._thread.start()
        if self.replica_silence_s > 0:
            self._loop.call_later(self._liveness_interval_s, self._check_liveness)

    def _read(self, sink: ChunkSink, on_stop: Callable[[], None]) -> None:
        assert self._loop is not None
        node, loop, slots = self._node, self._loop, self._slots
        answer_inputs = frozenset(self.replicas.by_input)
        node_inputs = {node: replica.inputs for node, replica in self.replicas.by_node.items()}
        closed: set[str] = set()
        """Answer inputs dora closed (reader-owned): an event on one again means its replica is back."""
        seen_at = self._seen_at
        legacy = LegacyReplicas(self.replicas)
        numbered = legacy.numbered

        def deliver(batch: _Batch, unnamed: list[tuple[int, Replica]]) -> None:  # on the loop thread
            try:
                if unnamed:
                    try:
                        self._name_legacy_replies(batch, unnamed)
                    except Exception as exc:  # those replies stay unnamed: dropped (and counted) as unknown
                        self._deliver_errors.error(exc)
                # A bug costs the chunk it tripped on, not the batch (docs/architecture.md, "Limits and failure behaviour").
                while batch:
                    try:
                        sink(batch)
                        break
                    except Exception as exc:
                        unread = batch.unread()
                        self._undeliverable += 1 if unread is not None else len(batch)
                        self._deliver_errors.error(exc)
                        batch = _Batch(batch[len(batch) - unread :] if unread else ())
            finally:
                slots.release()

        try:
            while True:
                event = node.next()
                if event is None:
                    break
                events = [event]
                if event["type"] != "STOP":
                    try:
                        events.extend(node.drain())
                    except RuntimeError:  # the channel closed after this event: the dataflow is stopping
                        pass
                self.last_event_at = now = time.monotonic()
                batch = _Batch()
                unnamed: list[tuple[int, Replica]] = []  # where a legacy reply without an id sits in ``batch``
                signals: list[tuple[str, str, NodeStatus | None]] = []
                missed: list[tuple[str, int, str]] = []  # resend asks a replica could not answer (docs/architecture.md, "Resend")
                stop = False
                for ev in events:
                    try:
                        kind = ev["type"]
                        if kind == "INPUT":
                            input_id = ev["id"]
                            if is_tick(input_id):
                                continue
                            seen_at[input_id] = now
                            metadata = ev["metadata"]
                            if is_resend_missed(metadata):
                                if (answer := parse_resend_missed(metadata)) is not None:
                                    missed.append((*answer, input_id))
                                continue
                            if is_status(metadata):  # a hello or a heartbeat: the node speaking of itself, not a chunk
                                status = parse_status(metadata)
                                numbered.add(input_id)
                                if status is not None and status.kind == "hello":
                                    closed.discard(input_id)
                                signals.append((status.kind if status is not None else "heartbeat", input_id, status))
                                continue
                            if input_id in closed:  # after `dora node restart` the input carries events again
                                closed.discard(input_id)
                                signals.append(("seen", input_id, None))
                            value = ev["value"]
                            if is_batch(value):
                                # One message, one chunk per row of many requests (docs/architecture.md, "Batch form").
                                numbered.add(input_id)
                                try:
                                    batch.extend(parse_batch(value))
                                except Exception as exc:  # whatever a node sends: parsing it must not end the reader
                                    self._unreadable += max(1, len(value))  # every row is a chunk dropped
                                    logger.warning("dropping a malformed batch of %d on %s: %r", len(value), ev["id"], str(exc))
                                continue
                            try:
                                chunk = parse_chunk(texts_of(value), ev["metadata"])
                            except Exception as exc:
                                self._unreadable += 1
                                logger.warning("dropping a malformed chunk on %s: %r", ev["id"], str(exc))  # %r: one log line
                                continue
                            if chunk.seq is not None:
                                numbered.add(input_id)
                            elif chunk.request_id is None and (replica := legacy.replica_of(input_id)) is not None:
                                unnamed.append((len(batch), replica))
                            batch.append(chunk)
                        elif kind == "STOP":
                            stop = True
                        elif kind == "INPUT_CLOSED":
                            if ev["id"] in answer_inputs:
                                closed.add(ev["id"])
                                signals.append(("closed", ev["id"], None))
                        elif kind == "NODE_RESTARTED":  # a restart policy brought a node back; its inputs stay open
                            node_id = str(ev["id"])
                            closed.update(node_inputs.get(node_id, ()))  # its first event (a hello) says it is up
                            signals.append(("restarted", node_id, None))
                        elif kind == "ERROR":
                            logger.error("dora error event: %r", ev.get("error"))
                    except Exception as exc:  # one odd event must not end the reader, and the server with it
                        self._unreadable += 1
                        self._read_errors.error(exc)
                if batch:
                    if not slots.acquire(blocking=False) and not self._wait_for_slot(loop):
                        break  # stopped, or the loop is gone: nobody left to deliver to
                    loop.call_soon_threadsafe(deliver, batch, unnamed)
                if signals and not stop:  # after the chunks that came before them
                    loop.call_soon_threadsafe(self._replica_events, signals)
                if missed:
                    loop.call_soon_threadsafe(self._resend_missed, missed)
                if stop:
                    break
        except Exception:
            logger.exception("the dora reader thread failed")
        finally:
            self.stopped = True
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_stop)

    @property
    def malformed_chunks(self) -> int:
        """Chunks dropped unread or undelivered (``oss_malformed_chunks_total``): malformed, or one the code tripped on."""
        return self._unreadable + self._undeliverable

    def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> bool:
        """The loop is ``MAX_BATCHES_IN_FLIGHT`` batches behind: wait until it delivers one; False if it never will."""
        self._reader_waiting = True
        try:
            while not self.stopped and not loop.is_closed():
                if self._slots.acquire(timeout=SLOT_WAIT_S):
                    return True
            return False
        finally:
            self._reader_waiting = False

    def _name_legacy_replies(self, batch: list[Chunk], unnamed: list[tuple[int, Replica]]) -> None:
        """Replies with neither id nor ``seq``, each from a legacy replica: each answers that replica's oldest request.

        Never another replica's: with several model nodes, "the oldest request waiting" of all of them could
        be one a modern node is streaming. One that finds no request stays unnamed and is dropped as unknown
        (docs/architecture.md, "Legacy replies (no seq)").
        """
        named: set[str] = set()
        for at, replica in unnamed:
            wire_id = self.replicas.oldest_held(replica, named)
            if wire_id is not None:
                named.add(wire_id)
                batch[at] = dataclasses.replace(batch[at], request_id=wire_id)

    # -- replicas (loop thread) -------------------------------------------------

    def _replica_events(self, signals: list[tuple[str, str, NodeStatus | None]]) -> None:
        """What the reader saw about replicas, in order: an input closed, a node restarted, an input came back,
        a hello, a heartbeat."""
        replicas = self.replicas
        for kind, ident, status in signals:
            if kind == "heartbeat":
                self._heartbeat(ident, status)
            elif kind == "closed":
                replica = replicas.input_closed(ident)
                if replica is not None:
                    self._down(replica, f"input '{ident}' closed", restarted=False)
            elif kind == "restarted":
                replica = replicas.node_restarted(ident)
                if replica is None:
                    logger.info("node %r restarted (not a model replica)", ident)
                else:
                    self.restart_log.note(replica.replica_id)
                    self._down(replica, f"node '{ident}' was restarted by dora", restarted=True)
                    if not replica.hellos:  # one that sends hellos is used again on its hello alone
                        assert self._loop is not None
                        self._loop.call_later(RESTART_GRACE_S, self._assume_up, replica, replica.failures)
            elif kind == "hello":
                self._hello(ident, status)
            else:
                self._seen(ident)

    def _seen(self, input_id: str) -> None:
        """An event on an answer input dora had closed: the replica is back, unless it sends hellos (then on its hello)."""
        replica = self.replicas.by_input.get(input_id)
        if replica is not None and not replica.live and replica.hellos and replica.down_reason is not DownReason.SILENT:
            # A chunk the old process left in dora's queue, or a third party: the new process says hello first.
            return
        if (replica := self.replicas.input_seen(input_id)) is not None:
            logger.warning("model replica %r is back (events on %r again)", replica.replica_id, input_id)
            self._liveness_changed(None)

    def _heartbeat(self, input_id: str, status: NodeStatus | None) -> None:
        """A replica's heartbeat: it is there (a silent one is back), its load and whether it can continue answers."""
        replica = self.replicas.of_input(input_id)
        if replica is None or status is None:
            return
        replica.load = (status.active or 0, status.queued or 0)
        replica.load_at, replica.load_base = time.monotonic(), replica.in_flight  # routing on it: Replica.routing_load
        replica.can_continue = status.can_continue
        if status.models:
            replica.models = status.models
        self.resend_routes.said(replica.replica_id, status.can_resend)
        if replica.heartbeat_s is None:
            replica.heartbeat_s = DEFAULT_HEARTBEAT_S
        if not replica.live and replica.down_reason is DownReason.SILENT:
            self._revive(replica, "it speaks again")

    def _revive(self, replica: Replica, why: str) -> None:
        replica.live = True
        replica.down_since = None
        replica.down_reason = None
        replica.open_inputs = set(replica.inputs)
        logger.warning("model replica %r is back (%s)", replica.replica_id, why)
        self._liveness_changed(None)

    def _hello(self, input_id: str, status: NodeStatus | None) -> None:
        """A replica's process started. If it was live, the process before it is gone: what it held is orphaned.

        That is the only news of a restart across machines: dora 1.1.0 neither closes the input nor sends
        ``NODE_RESTARTED`` to a subscriber on another daemon (docs/architecture.md, "Facts measured").
        The hello also says what the node can do (``can_continue``, ``heartbeat_s``).
        """
        replicas = self.replicas
        replica = replicas.by_input.get(input_id)
        if replica is None:
            anyone = replicas.of_input(input_id)  # the one replica of an unknown layout: its capabilities only
            if anyone is not None and status is not None:
                anyone.can_continue, anyone.heartbeat_s = status.can_continue, status.heartbeat_s
                anyone.models, anyone.capacity = status.models, status.capacity
                self.resend_routes.said(anyone.replica_id, status.can_resend)
            return
        if status is not None:
            replica.can_continue, replica.heartbeat_s = status.can_continue, status.heartbeat_s
            replica.models = status.models  # its model group (docs/team.md, "Models by name")
            replica.capacity = status.capacity  # for the admission queue (docs/team.md, "Queue and tiers")
            self.resend_routes.said(replica.replica_id, status.can_resend)
        replica.hellos += 1
        if replica.hellos > 1 and replica.down_reason is not DownReason.RESTARTED:  # that one was counted at NODE_RESTARTED
            self.restart_log.note(replica.replica_id)
        if replica.live:
            if replica.held or replica.hellos > 1:
                self._down(replica, "a new process said hello (it was restarted)", restarted=True)
        elif replicas.input_seen(input_id) is not None:
            logger.warning("model replica %r is back (hello on %r)", replica.replica_id, input_id)
            self._liveness_changed(None)

    def _assume_up(self, replica: Replica, failures: int) -> None:
        if self.replicas.assume_up(replica, failures):
            logger.warning(
                "model replica %r sent no hello %g s after its restart: using it again", replica.replica_id, RESTART_GRACE_S
            )
            self._liveness_changed(None)

    def _check_liveness(self) -> None:
        """Every ``_liveness_interval_s``: a replica that promised heartbeats, holds requests and has said nothing for
        ``replica_silence_s`` is treated as dead; a silent one that spoke again is back."""
        if self.stopped or self._loop is None or self._loop.is_closed():
            return
        try:
            now = time.monotonic()
            silence = self.replica_silence_s
            for replica in self.replicas.replicas:
                heard = self._last_heard(replica)
                if replica.live:
                    if not replica.held or replica.heartbeat_s is None or self._reader_waiting:
                        continue
                    quiet_since = max(heard or 0.0, replica.busy_since or 0.0)
                    if now - quiet_since > silence:
                        self.replicas.went_silent(replica)
                        why = f"it held requests and said nothing for {now - quiet_since:.1f} s (--replica-silence-s)"
                        self._down(replica, why, restarted=False, cancel_held=True)
                elif replica.down_reason is DownReason.SILENT and heard is not None and heard > (replica.down_since or now):
                    self._revive(replica, "it speaks again")
        except Exception:
            logger.exception("checking the replicas' liveness failed")
        finally:
            self._loop.call_later(self._liveness_interval_s, self._check_liveness)

    @property
    def _liveness_interval_s(self) -> float:
        return min(LIVENESS_INTERVAL_S, self.replica_silence_s / 4)

    def _last_heard(self, replica: Replica) -> float | None:
        """When the replica last said anything (a chunk, a hello, a heartbeat), as the reader thread stamped it."""
        seen = self._seen_at
        inputs = replica.inputs or list(seen)  # the one replica of an unknown layout: every input is its
        times = [t for i in inputs if (t := seen.get(i)) is not None]
        return max(times) if times else None

    def _down(self, replica: Replica, why: str, *, restarted: bool, cancel_held: bool = False) -> None:
        """A replica died, went silent or was restarted: hand what it held to the registry, which continues, re-sends or
        fails it."""
        held = self.replicas.take_held(replica)
        logger.error("model replica %r: %s; %d request(s) in flight on it", replica.replica_id, why, len(held))
        if (restarted or cancel_held) and replica.cancel_output is not None:
            # A new process may still get requests queued for the old one, and a stopped one may resume: tell it to drop them.
            for request_id in held:
                self._cancel_on(replica, request_id)
        self._liveness_changed(f"the model node is gone (replica '{replica.replica_id}': {why})")
        if self._on_orphaned is not None:
            if held:
                cut = UpstreamError(f"the model node is gone (replica '{replica.replica_id}': {why}); the answer was cut off")
                self._on_orphaned(held, cut, replica.replica_id)
        elif self.lost is not None and self._on_lost is not None:
            self._on_lost(BackendUnavailable(self.lost))

    def _liveness_changed(self, why: str | None) -> None:
        assert self._live is not None
        if self.replicas.any_live:
            self.lost = None
            self._live.set()
        else:
            self.lost = why or self.lost or "no model replica is live"
            self._live.clear()
            logger.error("%s: no model replica is live; new requests wait for one, then get 503", self.lost)

    async def wait_live(self, timeout_s: float) -> bool:
        if self.stopped:
            return False
        if self._live is None or self._live.is_set():
            return True
        try:
            await asyncio.wait_for(self._live.wait(), timeout_s)
        except TimeoutError:
            return False
        return not self.stopped

    # -- sending (loop thread) --------------------------------------------------

    def submit(self, request: DownstreamRequest) -> None:
        """Send to the best replica (``ReplicaSet.pick``); a failed ``send_output`` counts against that replica and the
        next one is tried, each at most once."""
        if self.stopped:
            raise BackendUnavailable("the dora dataflow has stopped")
        replicas = self.replicas
        avoid = set(request.avoid)
        if request.retry_of is not None:
            avoid.add(request.retry_of)
        failed: set[str] = set()
        elsewhere = replicas.outside_group(request.metadata.get("model"))  # another model's replicas: never
        while True:
            replica = replicas.pick(avoid, continuing=request.continuing, skip=failed | elsewhere)
            if replica is None:
                if failed:
                    raise BackendUnavailable(f"could not send the request to any model replica ({', '.join(sorted(failed))})")
                if request.continuing and replicas.any_live:
                    raise BackendUnavailable("no live model replica can continue the answer")
                raise BackendUnavailable(self.lost or "no model replica is live")
            try:
                metadata = request.metadata
                if replica.replica_id in self._per_server:  # several servers: answer on this one's output
                    metadata = {**metadata, SERVER_KEY: self.server_id}
                self._send(replica.request_output, request.texts, metadata)
            except BackendUnavailable as exc:
                if self.stopped:
                    raise
                replica.failed(time.monotonic())
                failed.add(replica.replica_id)
                logger.warning("model replica %r: %s; trying another", replica.replica_id, exc.message)
                continue
            break
        if request.retry_of is not None and (origin := replicas.by_id.get(request.retry_of)) is not None:
            origin.retries += 1
        replicas.assign(request.request_id, replica)

    def replica_failed(self, request_id: str) -> str | None:
        replica = self.replicas.holder.get(request_id)
        if replica is None:
            return None
        if replica.live:
            self._cancel_on(replica, request_id)
        self.replicas.release(request_id, completed=False)
        replica.failed(time.monotonic())
        return replica.replica_id

    def can_retry(self, request_id: str, *, continuing: bool) -> bool:
        holder = self.replicas.holder.get(request_id)
        group = set(holder.models) if holder is not None else set()  # only its model group may take it over
        return any(
            r.live and r is not holder and (r.can_continue or not continuing) and (not group or group & set(r.models))
            for r in self.replicas.replicas
        )

    def cancel(self, request_id: str) -> None:
        replica = self.replicas.holder.get(request_id)
        if replica is None or not replica.live:
            return  # never sent, already forgotten, or nobody left to tell
        self._cancel_on(replica, request_id)

    def _cancel_on(self, replica: Replica, request_id: str) -> None:
        if replica.cancel_output is None:
            return
        try:
            self._send(replica.cancel_output, [request_id], {"request_id": request_id})
        except BackendUnavailable:
            logger.warning("could not send cancel for %s", request_id)

    def release(self, request_id: str, completed: bool) -> None:
        self.replicas.release(request_id, completed)

    def _send(self, output: str, texts: list[str], metadata: dict[str, Any]) -> None:
        if self.stopped:
            raise BackendUnavailable("the dora dataflow has stopped")
        try:
            self._node.send_output(output, string_array(texts), metadata)
        except Exception as exc:  # dora raises RuntimeError / pyo3 exceptions
            raise BackendUnavailable(f"could not send to the dataflow: {exc}") from exc

    def health(self) -> dict[str, Any]:
        age = None if self.last_event_at is None else round(time.monotonic() - self.last_event_at, 3)
        status: dict[str, Any] = {"connected": not self.stopped and self.lost is None, "last_event_age_s": age}
        if self.lost is not None:
            status["error"] = self.lost
        status["replicas"] = self.replicas.stats(self._seen_at)
        self.restart_log.annotate(status)
        return status

    # -- resend asks (loop thread; docs/architecture.md, "Resend") ----------------

    def replica_of(self, request_id: str) -> str | None:
        replica = self.replicas.holder.get(request_id)
        return None if replica is None else replica.replica_id

    def ask_resend(self, request_id: str, first: int, end: int | None) -> bool:
        """Ask the replica holding ``request_id`` to send ``seq`` ``first`` to ``end`` again; False when it takes no asks."""
        replica = self.replicas.holder.get(request_id)
        output = None if replica is None or not replica.live else self.resend_routes.output_for(replica.replica_id)
        if output is None or self.stopped:
            return False
        try:
            send_resend_ask(self._node, output, ResendAsk(request_id, first, end))
        except Exception as exc:  # dora refused: the gap timeout ends the stream, as without resends
            logger.warning("could not send a resend ask for %s: %s", request_id, exc)
            return False
        return True

    def probe_silent(self) -> int:
        """Send a resend ask about a request no replica holds to each silent replica that takes asks; how many were sent.

        Its answer (``resend_missed``) is a word from it, which brings it back ("it speaks again"). Needed when
        requests to it were lost on the way between machines: it never had them, so it is idle, and an idle
        replica sends no heartbeats; without a probe it would stay silent, and down, for good
        (docs/architecture.md, "Resend").
        """
        sent = 0
        for replica in self.replicas.replicas:
            if replica.live or replica.down_reason is not DownReason.SILENT or self.stopped:
                continue
            output = self.resend_routes.output_for(replica.replica_id)
            if output is None:
                continue
            try:
                send_resend_ask(self._node, output, ResendAsk(PROBE_REQUEST_ID, 0))
                sent += 1
            except Exception as exc:
                logger.warning("could not probe the silent replica %r: %s", replica.replica_id, exc)
        return sent

    def _resend_missed(self, missed: list[tuple[str, int, str]]) -> None:
        for wire_id, first, input_id in missed:
            replica = self.replicas.of_input(input_id)
            if self.on_resend_missed is not None:
                self.on_resend_missed(wire_id, first, None if replica is None else replica.replica_id)

    def replica_stats(self) -> list[Replica]:
        """The replicas, for the per-replica series of /metrics (read when it renders)."""
        return self.replicas.replicas

    async def aclose(self) -> None:
        self.stopped = True


def _node_config(node: Any) -> dict[str, Any] | None:
    """The server node's inputs and outputs from the dataflow (replicas are declared there); None if unknown.

    When every answer input of a replica has closed, its node has exited (a crash, say): dora 1.1.0
    keeps the dataflow running for the server (its timer input stays open), so without this a
    client would wait out the first-chunk or idle timeout (tests/e2e/test_robustness.py).
    """
    try:
        config = node.node_config()
    except Exception:  # older dora, or a test double
        return None
    return config if isinstance(config, dict) else None
