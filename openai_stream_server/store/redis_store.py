"""The Redis back end: records and live answer logs that every server process sees (``--store redis://...``).

Keys (prefix ``oss:`` by default; docs/store.md, "Redis keys"):

- ``oss:c:<id>`` — the encoded record (string), expiring with its TTL (``PX``).
- ``oss:log:<id>`` — the live answer log (a Redis Stream): one entry per delivered batch, field ``b``
  ``[start, pieces, tool calls]``; a last entry with field ``end`` once the final record is written.
  Expires a day after its first entry, ``LOG_LINGER_S`` after its end (the record then holds it all).
- ``oss:sizes`` (hash id -> bytes), ``oss:bytes`` (their sum), ``oss:order`` (zset id -> last write
  time) and ``oss:expiry`` (zset id -> expiry): the size cap, kept exact by Lua scripts that change
  a record and the totals in one step, and evict least recently written first.
- ``oss:instance:<instance id>`` — a server process's heartbeat (expires ``stale_after_s`` after the
  last): whether a record it left ``in_progress`` can still change.
- channel ``oss:control:<instance id>`` — ``cancel <id>`` / ``delete <id>`` for that process.

Writes never wait on the request path: ``put`` and ``append`` queue, and one writer task sends
everything queued as one pipeline (never a round trip per chunk). Redis lost: the writer keeps the
queue (bounded by ``max_pending``), ``problem`` names it, reads raise ``StoreUnavailable`` at once
(no retries, short socket timeouts), and a keeper task pings every second until Redis answers
again, then the queue is written and the control channel subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from openai_stream_protocol import ToolCallDelta

from .base import CONTROL_OPS, InstanceInfo, LogBatch, Store, StoreConfigError, StoreOptions, StoreUnavailable
from .record import CompletionRecord, RecordFormatError, decode, encode

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "oss:"
LIVE_LOG_TTL_S = 86400
"""A live log expires this long after its first entry unless its end comes first (a process that died mid-way)."""
LOG_LINGER_S = 60
"""How long a log stays after its end entry: a tailer that is reading it finishes; later readers read the record."""
TAIL_BLOCK_MS = 1000
"""A tailer's XREAD blocks this long, then looks at the record (its owner may have died without an end entry)."""

_FORGET = """
local function forget(p, id)
  local size = redis.call('HGET', p .. 'sizes', id)
  local existed = redis.call('DEL', p .. 'c:' .. id, p .. 'log:' .. id)
  if size then
    redis.call('HDEL', p .. 'sizes', id)
    redis.call('DECRBY', p .. 'bytes', size)
  end
  redis.call('ZREM', p .. 'order', id)
  redis.call('ZREM', p .. 'expiry', id)
  return existed
end
"""

_WRITE = (
    _FORGET
    + """
-- ARGV: prefix, now, cap, then (id, expires_at, data) per record. Returns {written, evicted, expired}.
local p, now, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local written, evicted, expired = 0, 0, 0
for i = 4, #ARGV, 3 do
  local id, exp, data = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local ttl = math.floor((exp - now) * 1000)
  if ttl > 0 then
    local old = tonumber(redis.call('HGET', p .. 'sizes', id) or '0')
    redis.call('SET', p .. 'c:' .. id, data, 'PX', ttl)
    redis.call('HSET', p .. 'sizes', id, #data)
    redis.call('INCRBY', p .. 'bytes', #data - old)
    redis.call('ZADD', p .. 'order', now, id)
    redis.call('ZADD', p .. 'expiry', exp, id)
    written = written + 1
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'expiry', '-inf', now, 'LIMIT', 0, 256)) do
  forget(p, id)
  expired = expired + 1
end
while tonumber(redis.call('GET', p .. 'bytes') or '0') > cap do
  local oldest = redis.call('ZRANGE', p .. 'order', 0, 0)
  if #oldest == 0 then break end
  forget(p, oldest[1])
  evicted = evicted + 1
end
return {written, evicted, expired}
"""
)

_APPEND = """
-- ARGV: prefix, a new log's TTL, the linger after an end, then (id, kind, batch) per entry: kind 'n' the first
-- batch of a log (which then expires after the TTL), 'b' a later batch, 'e' its end (the log lingers, then goes).
local p, ttl, linger = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV, 3 do
  local key, kind = p .. 'log:' .. ARGV[i], ARGV[i + 1]
  if kind == 'e' then
    redis.call('XADD', key, '*', 'end', '1')
    redis.call('EXPIRE', key, linger)
  else
    redis.call('XADD', key, '*', 'b', ARGV[i + 2])
    if kind == 'n' then redis.call('EXPIRE', key, ttl) end
  end
end
return 0
"""
"""Live-log entries, all of one flush in one script call: a pipeline of one XADD per entry cost the server
~10 us of CPU per entry in redis-py (packing and parsing each command), the script ~1.4 us
(1,000 entries per call, measured here); in step mode that is one entry per stream per step."""

_DELETE = (
    _FORGET
    + """
-- ARGV: prefix, id, the deleting instance. Tells the record's owner, if another, to forget its copy
-- (docs/store.md, "Control"). Returns 1 if the record or its log existed.
local p, id = ARGV[1], ARGV[2]
local data = redis.call('GET', p .. 'c:' .. id)
if data then
  local ok, record = pcall(cjson.decode, data)
  if ok and type(record) == 'table' and type(record.i) == 'string' and record.i ~= ARGV[3] then
    redis.call('PUBLISH', p .. 'control:' .. record.i, 'delete ' .. id)
  end
end
return math.min(1, forget(p, id))
"""
)

_ERRORS = (RedisError, OSError)


def _batch_bytes(batch: LogBatch) -> bytes:
    calls = [[i, d.index, d.id, d.name] for i, d in batch.tool_calls.items()] if batch.tool_calls else []
    if batch.reasoning:  # a fourth element only for a batch with reasoning pieces
        return orjson.dumps([batch.start, batch.pieces, calls, sorted(batch.reasoning)])
    return orjson.dumps([batch.start, batch.pieces, calls])


def _batch_of(data: bytes) -> LogBatch:
    start, pieces, calls, *rest = orjson.loads(data)
    reasoning = {int(i) for i in rest[0]} if rest else set()
    return LogBatch(start, pieces, {int(i): ToolCallDelta(index, cid, name) for i, index, cid, name in calls}, reasoning)


class RedisStore(Store):
    name = "redis"
    shared = True
    persistent = True

    def __init__(
        self,
        url: str,
        options: StoreOptions | None = None,
        instance_id: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 1.0,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 15.0,
        probe_interval_s: float = 1.0,
    ) -> None:
        super().__init__(options, instance_id)
        self.url = url
        self.prefix = prefix
        self._heartbeat_s = heartbeat_s
        self._stale_after_s = stale_after_s
        self._probe_interval_s = probe_interval_s
        # No retries and short timeouts: an operation on a lost Redis fails at once (the keeper notices
        # its return). socket_timeout must exceed TAIL_BLOCK_MS, or a tailer's XREAD would time out.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=max(socket_timeout_s, TAIL_BLOCK_MS / 1000 + 1),
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._write_script = self._client.register_script(_WRITE)
        self._delete_script = self._client.register_script(_DELETE)
        self._append_script = self._client.register_script(_APPEND)
        self._records: dict[str, tuple[float, bytes, bool]] = {}
        """Queued record writes by id: (expires_at, encoded, ended)."""
        self._logs: list[tuple[str, bytes]] = []
        """Queued live-log entries, in delivery order: (completion id, encoded batch)."""
        self._deletes: set[str] = set()
        """Queued deletions (``discard``), sent after the queued writes."""
        self._live: set[str] = set()
        """Completions of this process with a live log started (their first entry set its expiry)."""
        self._wakeup = asyncio.Event()
        self._up = asyncio.Event()
        """Set while Redis answers: the writer and the listener wait on it."""
        self._gone = asyncio.Event()
        """Set while it does not: wakes the keeper at once to start probing."""
        self._problem: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._alive_cache: dict[str, tuple[float, bool]] = {}
        self._closed = False

    @property
    def where(self) -> str:
        kw = self._client.connection_pool.connection_kwargs
        return f"redis at {kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"

    def _key(self, kind: str, completion_id: str) -> str:
        return f"{self.prefix}{kind}:{completion_id}"

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._client.ping()
            await self._register()
        except _ERRORS as exc:
            await self._client.aclose()
            raise StoreConfigError(f"--store {self.url}: cannot reach {self.where}: {exc}") from exc
        self._up.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._writer(), name="oss-redis-writer"),
            loop.create_task(self._keeper(), name="oss-redis-keeper"),
            loop.create_task(self._listener(), name="oss-redis-listener"),
        ]

    async def flush(self) -> None:
        """Write what is queued now; ``StoreUnavailable`` if Redis cannot take it."""
        try:
            await self._flush_once()
        except _ERRORS as exc:
            self._down(exc)
            raise StoreUnavailable(self._problem) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # redis-py can swallow a cancel that lands while it connects; each loop also stops on _closed
            await asyncio.wait(self._tasks, timeout=3)
        try:
            await self._flush_once()
            await self._client.delete(self._key("instance", self.instance_id))
        except _ERRORS as exc:
            if self._records or self._logs or self._deletes:
                logger.error(
                    "%s: %d records, %d log batches and %d deletions not written before the stop: %s",
                    self.where,
                    len(self._records),
                    len(self._logs),
                    len(self._deletes),
                    exc,
                )
        await self._client.aclose()

    def problem(self) -> str | None:
        return self._problem

    def _down(self, exc: BaseException) -> None:
        if self._problem is None:
            logger.warning("%s lost: %s", self.where, exc)
        self._problem = f"{self.where} unreachable: {exc}"
        self._up.clear()
        self._gone.set()

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        self._down(exc)
        return StoreUnavailable(f"the shared store is unavailable ({self._problem})")

    # -- records -----------------------------------------------------------

    def _put(self, record: CompletionRecord) -> None:
        data = encode(record)
        if len(data) > self.options.max_bytes:
            self.stats.dropped += 1
            self._warn.warning(
                logger, "completion %s (%d bytes) is larger than the store's cap: not stored", record.id, len(data)
            )
            return
        self._deletes.discard(record.id)
        self._records[record.id] = (record.expires_at, data, record.ended)
        if len(self._records) > self.options.max_pending:
            del self._records[next(iter(self._records))]
            self.stats.dropped += 1
        self._wakeup.set()

    async def _get(self, completion_id: str) -> CompletionRecord | None:
        if completion_id in self._deletes:  # deleted, not sent yet
            return None
        queued = self._records.get(completion_id)
        if queued is not None:
            return decode(queued[1])
        try:
            data = await self._client.get(self._key("c", completion_id))
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc
        if data is None:
            return None
        try:
            return decode(data)
        except RecordFormatError:
            logger.warning("%s: record %s cannot be read; treated as missing", self.where, completion_id)
            return None

    async def _delete(self, completion_id: str) -> bool:
        queued = self._records.pop(completion_id, None) is not None
        self._live.discard(completion_id)
        self._deletes.discard(completion_id)
        try:
            existed = await self._delete_script(args=[self.prefix, completion_id, self.instance_id])
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc
        return bool(existed) or queued

    def _discard(self, completion_id: str) -> None:
        self._records.pop(completion_id, None)
        self._live.discard(completion_id)
        self._deletes.add(completion_id)
        self._wakeup.set()

    async def alive(self, instance_id: str) -> bool:
        if instance_id == self.instance_id:
            return True
        now = time.monotonic()
        cached = self._alive_cache.get(instance_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answer = bool(await self._client.exists(self._key("instance", instance_id)))
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc
        if len(self._alive_cache) > 1024:
            self._alive_cache.clear()
        self._alive_cache[instance_id] = (now + 1.0, answer)
        return answer

    # -- live logs ---------------------------------------------------------

    def append(self, completion_id: str, batch: LogBatch) -> None:
        self._logs.append((completion_id, _batch_bytes(batch)))
        if len(self._logs) > self.options.max_pending:
            del self._logs[: len(self._logs) - self.options.max_pending]
            self.stats.dropped += 1
        self._wakeup.set()

    async def tail(self, completion_id: str, after: int = -1) -> AsyncIterator[LogBatch | CompletionRecord]:
        """Batches of the live log holding pieces past ``after``, then the final record; ends after the record.

        Reads the stream from its start (entries are batches; the pieces up to ``after`` are cut off
        here), blocks ``TAIL_BLOCK_MS`` at a time, and between blocks looks at the record: one that has
        ended, or whose owner died (``get`` settles it as failed), ends the tail without an end entry.
        ``StoreUnavailable`` when Redis is lost meanwhile.
        """
        key = self._key("log", completion_id)
        cursor = "0-0"
        next_piece = after + 1
        try:
            while True:
                reply = await self._client.xread({key: cursor}, count=512, block=TAIL_BLOCK_MS)
                ended = False
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        cursor = entry_id
                        if b"end" in fields:
                            ended = True
                            break
                        batch = _batch_of(fields[b"b"])
                        end = batch.start + len(batch.pieces)
                        if end <= next_piece:
                            continue
                        if batch.start < next_piece:
                            cut = next_piece - batch.start
                            batch = LogBatch(
                                next_piece,
                                batch.pieces[cut:],
                                {i: d for i, d in batch.tool_calls.items() if i >= next_piece},
                                {i for i in batch.reasoning if i >= next_piece},
                            )
                        next_piece = end
                        yield batch
                if ended or not reply:
                    record = await self.get(completion_id)
                    if record is None:
                        raise StoreUnavailable(f"completion {completion_id} is gone from {self.where}")
                    if record.ended:
                        yield record
                        return
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc

    # -- control -----------------------------------------------------------

    def _channel(self, instance_id: str) -> str:
        return f"{self.prefix}control:{instance_id}"

    async def send_control(self, instance_id: str, op: str, completion_id: str) -> None:
        if op not in CONTROL_OPS:
            raise ValueError(f"unknown control message {op!r}")
        try:
            await self._client.publish(self._channel(instance_id), f"{op} {completion_id}")
        except _ERRORS as exc:
            raise self._unavailable(exc) from exc

    # -- tasks -------------------------------------------------------------

    async def _register(self) -> None:
        info = InstanceInfo.here()
        value = orjson.dumps({"host": info.host, "pid": info.pid})
        await self._client.set(self._key("instance", self.instance_id), value, ex=max(1, int(self._stale_after_s)))

    async def _flush_once(self) -> None:
        records, logs, deletes = self._records, self._logs, self._deletes
        if not records and not logs and not deletes:
            return
        self._records, self._logs, self._deletes = {}, [], set()
        if deletes:
            logs = [entry for entry in logs if entry[0] not in deletes]
        try:
            pipe = self._client.pipeline(transaction=False)
            if logs:
                entries: list[Any] = [self.prefix, LIVE_LOG_TTL_S, LOG_LINGER_S]
                started: set[str] = set()
                live = self._live
                for cid, data in logs:
                    if cid in live or cid in started:
                        entries += (cid, "b", data)
                    else:
                        entries += (cid, "n", data)
                        started.add(cid)
                await self._append_script(args=entries, client=pipe)
            if records:
                args: list[Any] = [self.prefix, time.time(), self.options.max_bytes]
                for cid, (expires_at, data, _) in records.items():
                    args += (cid, expires_at, data)
                await self._write_script(args=args, client=pipe)
            # An end entry only where a live log was started: a stream costs ~4 KB of Redis memory even
            # with one entry, and a tailer of a completion without one reads its end from the record.
            logged = {cid for cid, _ in logs}
            ended = [cid for cid, (_, _, done) in records.items() if done and (cid in self._live or cid in logged)]
            if ended:  # after the records: a tailer that reads an end finds the final record
                ends: list[Any] = [self.prefix, LIVE_LOG_TTL_S, LOG_LINGER_S]
                for cid in ended:
                    ends += (cid, "e", b"")
                await self._append_script(args=ends, client=pipe)
            for cid in deletes:
                await self._delete_script(args=[self.prefix, cid, self.instance_id], client=pipe)
            results = await pipe.execute()
        except BaseException:
            # keep them (newer queued writes of the same id win) for the writer's next try
            records.update(self._records)
            self._records = records
            self._logs = logs + self._logs
            self._deletes |= {cid for cid in deletes if cid not in self._records}
            raise
        for cid, _ in logs:
            self._live.add(cid)
        self._live.difference_update(ended)
        self.stats.batches += 1
        self.stats.log_batches += len(logs)
        if records:
            written, evicted, expired = next(r for r in results if isinstance(r, list) and len(r) == 3)
            self.stats.records_written += int(written)
            self.stats.evicted += int(evicted)
            self.stats.expired += int(expired)

    async def _writer(self) -> None:
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._up.wait()
            try:
                await self._flush_once()
            except _ERRORS as exc:
                self.stats.write_errors += 1
                self._down(exc)
                self._wakeup.set()  # try again once the keeper sees Redis back
            except Exception:
                logger.exception("%s: write failed", self.where)

    async def _keeper(self) -> None:
        """Heartbeat while up; while down, ping every ``probe_interval_s`` until Redis answers."""
        next_purge = time.monotonic() + self.options.purge_interval_s
        while not self._closed:
            if self._up.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gone.wait(), self._heartbeat_s)
            if not self._up.is_set():
                await asyncio.sleep(self._probe_interval_s)
            try:
                await self._register()
                if time.monotonic() >= next_purge:  # expired records' totals, when nothing is written
                    next_purge = time.monotonic() + self.options.purge_interval_s
                    _, _, expired = await self._write_script(args=[self.prefix, time.time(), self.options.max_bytes])
                    self.stats.expired += int(expired)
            except _ERRORS as exc:
                self._down(exc)
                continue
            if not self._up.is_set():
                logger.warning("%s reachable again", self.where)
                self._problem = None
                self._gone.clear()
                self._up.set()

    async def _listener(self) -> None:
        """Control messages for this process; subscribes again after Redis comes back."""
        channel = self._channel(self.instance_id)
        while not self._closed:
            await self._up.wait()
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    op, _, completion_id = bytes(message["data"]).decode().partition(" ")
                    if op in CONTROL_OPS and completion_id:
                        self._dispatch_control(op, completion_id)
            except _ERRORS as exc:
                self._down(exc)
                await asyncio.sleep(self._probe_interval_s)
            finally:
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()
