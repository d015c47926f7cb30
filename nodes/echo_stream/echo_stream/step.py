"""Step mode (``ECHO_STEP_MS``): echo like a batched engine, one dora message per step.

A batched engine produces one token for every active sequence per forward
step. ``StepEcho`` does the same on a clock: every ``step_ms`` it takes the
next token (or ``ECHO_TOKENS_PER_CHUNK`` tokens) of every active request and
sends them all as ONE batch message (``BatchSender``), instead of one message
per chunk. dora's Python receive costs ~17 us per message whatever it carries
(docs/architecture.md, "Facts measured"), so this is what lets 1,000 paced
streams through. Everything else (stop strings, ``max_tokens``, finish
reasons, token counts, a non-streaming request answered in one row, cancel)
is ``EchoStream``'s: the ``Plan`` is the same, only the pacing differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from openai_stream_protocol import BatchSender, ChunkSender, Heartbeat, OutputSender

from .engine import CHUNKS_OUTPUT, EARLY_S, EchoStream, Generation, crash
from .settings import Settings


class BatchRequest(ChunkSender):
    """One request's rows in the shared ``BatchSender``: what ``EchoStream`` sends through, queued for the next step."""

    __slots__ = ("batch",)

    def __init__(self, batch: BatchSender, request_metadata: Mapping[str, Any]) -> None:
        super().__init__(batch.node, request_metadata, output=batch.output)
        self.batch = batch
        batch.open(request_metadata)

    def send(self, text: str, **extra: Any) -> None:
        # ``extra`` is only ever ``sent_at``: the batch stamps every row itself when it is sent.
        self.batch.send(self.request_id, text)
        self.seq += 1

    def send_tool_call(
        self, index: int, arguments_delta: str = "", *, call_id: str | None = None, name: str | None = None, **extra: Any
    ) -> None:
        self.batch.send_tool_call(self.request_id, index, arguments_delta, call_id=call_id, name=name)
        self.seq += 1

    def send_reasoning(self, text: str, **extra: Any) -> None:
        self.batch.send_reasoning(self.request_id, text)
        self.seq += 1

    def finish(
        self,
        finish_reason: str = "stop",
        text: str = "",
        *,
        error: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        stop_sequence: str | None = None,
        error_code: str | None = None,
        reasoning_tokens: int | None = None,
        **extra: Any,
    ) -> None:
        self.batch.finish(
            self.request_id,
            finish_reason,
            text,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            stop_sequence=stop_sequence,
            error_code=error_code,
            reasoning_tokens=reasoning_tokens,
        )
        self.seq += 1
        self.finished = True


class StepEcho(EchoStream):
    """``EchoStream`` paced by one clock for all requests: every step, every active request's next chunk, one message."""

    def __init__(
        self,
        node: OutputSender,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        output: str = CHUNKS_OUTPUT,
        heartbeat: Heartbeat | None = None,
        on_exit: Callable[[], None] = crash,
    ) -> None:
        super().__init__(node, settings, clock=clock, output=output, heartbeat=heartbeat, on_exit=on_exit)
        if self.settings.step_ms <= 0:
            raise ValueError("StepEcho needs a step of more than 0 ms (ECHO_STEP_MS)")
        self.step_s = self.settings.step_ms / 1000
        self.batch = BatchSender(node, output, stamp=self.settings.stamp)
        self._next_step: float | None = None
        self.steps = 0
        """Steps that sent something (each one dora message)."""

    def open_sender(self, metadata: Mapping[str, Any]) -> ChunkSender:
        return BatchRequest(self.batch, metadata)

    def schedule(self, generation: Generation) -> None:
        # No due time of its own: the next step paces every request; a first request starts the clock.
        if self._next_step is None:
            self._next_step = self.clock() + self.step_s

    def on_cancel(self, request_id: str) -> None:
        super().on_cancel(request_id)
        self.batch.discard(request_id)  # not even a row already queued for the next step

    def step(self, now: float) -> float | None:
        """At a step's time, queue the next chunk of every active request; send what is queued as one message."""
        if self._next_step is not None and now + EARLY_S >= self._next_step:
            active = self.active
            # No per-row ``sent_at``: the batch stamps the whole message when it is sent.
            for generation in list(active.values()):
                if not generation.send_next():
                    del active[generation.sender.request_id]
            # Behind schedule (a busy machine), the next step follows at once, as the normal mode's heap does.
            self._next_step = max(self._next_step + self.step_s, now) if active else None
        # Rows queued outside a step (none today) go now rather than wait for a step that may never come.
        if self.batch.emit():
            self.steps += 1
        return self._next_step
