"""What a generation needs apart from the model: parameters, stop strings, the engine seam.

Importable without torch, so the scheduler and its tests run on a fake
engine; ``engine.py`` holds the transformers implementation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from openai_stream_protocol import Continuation, allowed_tools, as_int, request_parallel_tool_calls, request_reasoning

logger = logging.getLogger(__name__)

# The server's own bounds on ``stop`` (it answers more with a 400). A client that talks to the
# node directly is held to them too: every stop string is searched on every token, inside the
# batch's step (20,000 stops of 40 characters cost ~9 ms per token per row).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class RequestError(ValueError):
    """A request the node cannot serve (bad image, bad parameter, template refused): the client sees the message."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[dict[str, Any], ...] = ()
    """The function tools the model may call (``allowed_tools``: none for ``tool_choice: "none"``); empty: no tool calling."""
    parallel_tool_calls: bool = True
    """False: at most one call is sent (later ones are dropped)."""
    enable_thinking: bool | None = None
    """The request's reasoning wish (``reasoning`` metadata) for a template that takes ``enable_thinking``; None: the
    template's own default (docs/architecture.md, "Reasoning")."""

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, default_max_tokens: int, max_tokens_limit: int) -> GenerationParams:
        """Read the request metadata leniently; a value that makes no sense raises ``RequestError`` naming it."""
        max_tokens = _read(metadata, "max_tokens", as_int)
        if max_tokens is None or max_tokens <= 0:
            max_tokens = default_max_tokens
        temperature = _read(metadata, "temperature", _as_float)
        if temperature is not None and temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {temperature}")
        top_p = _read(metadata, "top_p", _as_float)
        if top_p is not None and not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}")
        return cls(
            max_tokens=min(max_tokens, max_tokens_limit),
            temperature=temperature,
            top_p=top_p,
            stop=_read_stop(metadata.get("stop"), metadata.get("request_id")),
            seed=_read(metadata, "seed", as_int),
            tools=tuple(allowed_tools(metadata)),
            parallel_tool_calls=request_parallel_tool_calls(metadata),
            enable_thinking=None if (wish := request_reasoning(metadata)) is None else wish.enabled,
        )


def _unset(value: Any) -> bool:
    # dora turns a None metadata value into the string "None".
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "null"))


def _read(metadata: Mapping[str, Any], key: str, cast: Callable[[Any], Any]) -> Any:
    value = metadata.get(key)
    if _unset(value):
        return None
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise RequestError(f"{key}: cannot read {value!r}") from None


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("bool")
    return float(value)


def _read_stop(value: Any, request_id: Any = None) -> tuple[str, ...]:
    """The request's stop strings: at most ``MAX_STOP_STRINGS`` of at most ``MAX_STOP_CHARS`` characters.

    Longer ones are ignored (a shortened stop string would stop where the client did not ask) and
    those past the count are dropped, with one warning for the request.
    """
    if _unset(value):
        return ()
    items = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise RequestError(f"stop: expected a string or a list of strings, got {_clip(value)}")
    given = [item for item in items if item]
    stops = tuple(item for item in given if len(item) <= MAX_STOP_CHARS)[:MAX_STOP_STRINGS]
    if len(stops) < len(given):
        logger.warning(
            "request %r: %d of its %d stop strings ignored (at most %d, of at most %d characters each)",
            request_id,
            len(given) - len(stops),
            len(given),
            MAX_STOP_STRINGS,
            MAX_STOP_CHARS,
        )
    return stops


def _clip(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: a refused value is quoted, not copied whole."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def sampling_kwargs(params: GenerationParams) -> dict[str, Any]:
    """``generate`` keyword arguments for temperature and top_p.

    Unset values keep the model's own generation config (as vLLM does).
    ``temperature: 0`` means greedy, as in the OpenAI API; transformers
    rejects a temperature of 0 with sampling on.
    """
    kwargs: dict[str, Any] = {}
    if params.temperature is not None:
        if params.temperature == 0:
            return {"do_sample": False}
        kwargs.update(do_sample=True, temperature=params.temperature)
    if params.top_p is not None:
        kwargs.update(do_sample=True, top_p=params.top_p)
    return kwargs


class StopFilter:
    """Cuts the streamed text at the first stop string, which is never sent.

    Text that could be the start of a stop string is held back until the
    next piece shows whether it is; ``flush`` releases it at the end.
    ``matched`` is the stop string that cut the text, once one did.
    """

    __slots__ = ("stops", "held", "hit", "matched", "_longest")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.hit = False
        self.matched: str | None = None
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held) that is safe to send now."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        buffer = self.held + text
        cuts = [(i, len(s), s) for i, s in ((buffer.find(s), s) for s in self.stops) if i >= 0]
        if cuts:
            at, _, self.matched = min(cuts)  # the earliest; at the same place, the shorter (as echo_stream)
            self.hit, self.held = True, ""
            return buffer[:at]
        keep = 0
        for k in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self.held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.hit else held


@dataclass(frozen=True, slots=True)
class Outcome:
    finish_reason: str
    """``stop`` (end of text, a stop string, or halted) or ``length`` (``max_tokens`` reached)."""
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None
    """The stop string that ended the text (then ``finish_reason`` is ``stop``)."""


class Engine(Protocol):
    """Runs one generation, in a worker thread, calling ``emit`` for every decoded piece.

    ``images`` are the request's images, already loaded (RGB PIL images, in
    prompt order): nothing is fetched while the generation slot is held.

    It stops early, within a token or two, once ``halt`` is set (cancel or a
    stop string). A ``RequestError`` is the client's fault and its message
    is sent as is; any other exception is reported as a failed generation.
    """

    def generate(
        self,
        texts: list[str],
        params: GenerationParams,
        emit: Callable[[str], None],
        halt: threading.Event,
        *,
        images: Sequence[Any] = (),
    ) -> Outcome: ...


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """One row's token ids in, text out, never ending in half a UTF-8 character.

    A byte-level BPE token can carry part of a character: decoding it alone
    gives U+FFFD. Text is released only once it no longer ends in U+FFFD,
    and each step decodes only a short window (from ``prefix`` on), not the
    whole answer again: the offsets scheme of vLLM's detokenizer. Special
    tokens (end of text) are skipped, as the single-request engine did.

    ``context``: the last tokens of an answer being continued (already
    delivered, never released again), so that the first new token is decoded
    after them as it would have been in the uninterrupted answer.
    """

    __slots__ = ("tokenizer", "tokens", "prefix", "read", "context")

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(context)
        self.prefix = 0
        self.read = len(self.tokens)
        self.context = len(self.tokens)
        """How many of ``tokens`` are context, not this answer's own."""

    def push(self, token_id: int) -> str:
        self.tokens.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """What is still held at the end (a character the answer left unfinished comes out as U+FFFD)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before) :]


@dataclass(frozen=True, slots=True)
class StepRow:
    """What one decode step produced for one request: text, and on its last step how it ended."""

    request_id: str
    text: str = ""
    outcome: Outcome | None = None
    error: str | None = None
    tokens: int = 0
    """Tokens the request has generated so far (for the log line of a cancel)."""

    @property
    def ended(self) -> bool:
        return self.outcome is not None or self.error is not None


OnStep = Callable[[list[StepRow]], None]
"""Called once per decode step with that step's rows; the scheduler sends them as one message."""


DETOKENIZER_CONTEXT = 5
"""Delivered tokens a continued answer's detokenizer starts after (vLLM's detokenizer keeps 5 before its window)."""


class RowStream:
    """One request's tokens through the detokenizer, its stop strings and its ``max_tokens``.

    Shared by both batching schemes in ``engine.py``, so that a request's
    text and finish reason do not depend on which scheme served it.

    A continued answer (``continued_ids``: the delivered text's tokens, already
    in the prompt) may generate only what ``max_tokens`` leaves after them, and
    counts only its own tokens.
    """

    __slots__ = (
        "request_id",
        "params",
        "halt",
        "eos_token_ids",
        "detok",
        "stops",
        "count",
        "prompt_tokens",
        "ended",
        "max_tokens",
    )

    def __init__(
        self,
        request_id: str,
        params: GenerationParams,
        halt: threading.Event,
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        prompt_tokens: int,
        continued_ids: Sequence[int] = (),
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.halt = halt
        self.eos_token_ids = eos_token_ids
        self.detok = IncrementalDetokenizer(tokenizer, continued_ids[-DETOKENIZER_CONTEXT:])
        self.stops = StopFilter(params.stop)
        self.count = 0
        self.prompt_tokens = prompt_tokens
        self.ended = False
        self.max_tokens = params.max_tokens - len(continued_ids)
        """New tokens this answer may still generate (``max_tokens`` counts the delivered ones too)."""

    def push(self, token_id: int) -> StepRow | None:
        """The row for this token (``None`` when there is nothing to send); ends the row on EOS, a stop string or the limit."""
        if self.ended:
            return None
        if self.halt.is_set():  # cancelled (or STOP): nothing more is sent for it
            self.ended = True
            return StepRow(self.request_id, outcome=Outcome("stop", self.prompt_tokens, self.count))
        self.count += 1
        text = self.stops.feed(self.detok.push(token_id))
        if self.stops.hit:
            self.halt.set()
            return self._end(text, "stop")
        if token_id in self.eos_token_ids:
            return self._end(text, "stop")
        if self.count >= self.max_tokens:
            return self._end(text, "length")
        return StepRow(self.request_id, text, tokens=self.count) if text else None

    def end(self) -> StepRow | None:
        """End a row the generation stopped without a reason of its own (halted); ``None`` if it already ended."""
        if self.ended:
            return None
        return self._end("", "stop")

    def spent(self) -> StepRow | None:
        """The finish of a continued answer that ``max_tokens`` leaves no token (``None`` when it may generate)."""
        if self.max_tokens > 0:
            return None
        return self._end("", "length")

    def _end(self, text: str, finish_reason: str) -> StepRow:
        self.ended = True
        if not self.stops.hit:
            text += self.stops.feed(self.detok.flush()) + self.stops.flush()
        if self.stops.hit:
            finish_reason = "stop"
        return StepRow(self.request_id, text, Outcome(finish_reason, self.prompt_tokens, self.count, self.stops.matched))


class BatchRow(Protocol):
    """What a batch engine needs of one request (the scheduler's ``Job``)."""

    request_id: str
    texts: list[str]
    params: GenerationParams
    halt: threading.Event
    """Set on cancel or STOP: the row ends within a step or two and nothing more is sent for it."""
    continuation: Continuation | None
    """What the client already has of this answer (another replica started it): the row continues after it."""

    @property
    def row_images(self) -> Sequence[Any]: ...


class BatchEngine(Protocol):
    """Generates for many requests at once (``engine.py``); the scheduler drives it.

    ``start``, ``generate_batch`` and ``close`` run in the scheduler's engine
    thread; the ``*_continuous`` methods in the thread that owns the node.
    ``on_step`` gets each decode step's rows; every request that was given
    to the engine gets exactly one ending row (an outcome or an error),
    unless it was cancelled. An exception from ``generate_batch`` ends that
    batch's open rows with an error.
    """

    max_batch: int

    def start(self, on_step: OnStep) -> None: ...

    def close(self) -> None: ...

    def accepts_continuous(self, params: GenerationParams, has_images: bool) -> bool: ...

    def start_continuous(self, row: BatchRow) -> bool: ...

    def cancel_continuous(self, request_id: str) -> None: ...

    def generate_batch(self, rows: Sequence[BatchRow], on_step: OnStep) -> None: ...


class SerialEngine:
    """A one-request ``Engine`` (the scheduler tests' fakes) behind the batch interface: batches of one."""

    max_batch = 1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(self, on_step: OnStep) -> None:
        pass

    def close(self) -> None:
        pass

    def accepts_continuous(self, params: GenerationParams, has_images: bool) -> bool:
        return False

    def start_continuous(self, row: BatchRow) -> bool:
        return False

    def cancel_continuous(self, request_id: str) -> None:
        pass

    def generate_batch(self, rows: Sequence[BatchRow], on_step: OnStep) -> None:
        for row in rows:
            self._one(row, on_step)

    def _one(self, row: BatchRow, on_step: OnStep) -> None:
        stops = StopFilter(row.params.stop)

        def emit(piece: str) -> None:
            text = stops.feed(piece)
            if text:
                on_step([StepRow(row.request_id, text)])
            if stops.hit:
                row.halt.set()

        try:
            outcome = self.engine.generate(row.texts, row.params, emit, row.halt, images=row.row_images)
        except RequestError as exc:
            on_step([StepRow(row.request_id, error=str(exc))])
            return
        if stops.hit:
            outcome = Outcome("stop", outcome.prompt_tokens, outcome.completion_tokens, stops.matched)
        on_step([StepRow(row.request_id, stops.flush(), outcome)])
