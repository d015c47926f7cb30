"""An in-process backend that answers like echo_stream, for HTTP-layer tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from openai_stream_protocol import Chunk, last_user_text, parse_request_texts, split_tokens
from openai_stream_server.backend import ChunkSink, DownstreamRequest, OnLost, OnOrphaned
from openai_stream_server.errors import BackendUnavailable
from openai_stream_server.replicas import Replica

Plan = Callable[[DownstreamRequest, list[Chunk]], list[Chunk]]
"""Rewrites the chunks of one answer before delivery: reorder, duplicate, drop, add."""


@dataclass
class FakeBackend:
    """Echoes the last user text, one chunk per token, ``delay_s`` apart.

    ``plan`` may rewrite a request's chunks (chaos); ``silent`` answers nothing;
    ``fail_submit`` makes ``submit`` raise.
    """

    delay_s: float = 0.0
    plan: Plan | None = None
    silent: bool = False
    fail_submit: bool = False
    legacy: bool = False
    submitted: list[DownstreamRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _sink: ChunkSink | None = None
    _on_stop: Callable[[], None] | None = None
    _on_lost: OnLost | None = None
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    released: list[tuple[str, bool]] = field(default_factory=list)
    malformed_chunks: int = 0

    async def start(
        self, sink: ChunkSink, on_stop: Callable[[], None], on_lost: OnLost, on_orphaned: OnOrphaned | None = None
    ) -> None:
        self._sink, self._on_stop, self._on_lost = sink, on_stop, on_lost

    async def wait_live(self, timeout_s: float) -> bool:
        return True

    def release(self, request_id: str, completed: bool) -> None:
        self.released.append((request_id, completed))

    def replica_failed(self, request_id: str) -> str | None:
        """One replica: a busy answer or a timeout has nowhere else to go (``can_retry`` is False)."""
        self.released.append((request_id, False))
        return None

    def can_retry(self, request_id: str, *, continuing: bool) -> bool:
        return False

    def submit(self, request: DownstreamRequest) -> None:
        if self.fail_submit:
            raise BackendUnavailable("fake backend refuses")
        self.submitted.append(request)
        if not self.silent:
            self._tasks[request.request_id] = asyncio.ensure_future(self._answer(request))

    def answer_chunks(self, request: DownstreamRequest) -> list[Chunk]:
        text = last_user_text(parse_request_texts(request.texts))
        rid = request.request_id
        if self.legacy:
            return [Chunk(None, None, text, fin=True, finish_reason="stop")]
        tokens = split_tokens(text)
        limit = request.metadata.get("max_tokens") or 0
        finish = "stop"
        if limit and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        chunks = [Chunk(rid, i, t) for i, t in enumerate(tokens)]
        chunks.append(Chunk(rid, len(tokens), "", fin=True, finish_reason=finish, completion_tokens=len(tokens)))
        return chunks

    async def _answer(self, request: DownstreamRequest) -> None:
        chunks = self.answer_chunks(request)
        if self.plan is not None:
            chunks = self.plan(request, chunks)
        for chunk in chunks:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(0)
            self.deliver([chunk])

    def deliver(self, chunks: list[Chunk]) -> None:
        """To the registry. This fake is one legacy replica: a reply with neither id nor seq answers the oldest
        request it still holds, as the bridge names it (docs/architecture.md, "Legacy replies (no seq)")."""
        assert self._sink is not None
        if any(_unnamed(c) for c in chunks):
            ended = {request_id for request_id, _ in self.released}
            held = [r.request_id for r in self.submitted if r.request_id not in ended]
            chunks = [replace(c, request_id=held.pop(0)) if _unnamed(c) and held else c for c in chunks]
        self._sink(chunks)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    def stop(self) -> None:
        assert self._on_stop is not None
        self._on_stop()

    def lose(self, reason: str = "the model node is gone") -> None:
        """What the bridge does when every answer input closed: fail in flight, refuse new requests."""
        assert self._on_lost is not None
        self.fail_submit = True
        self._on_lost(BackendUnavailable(reason))

    def health(self) -> dict[str, Any]:
        return {"connected": True}

    def replica_stats(self) -> list[Replica]:
        return []

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()


def _unnamed(chunk: Chunk) -> bool:
    return chunk.request_id is None and chunk.seq is None
