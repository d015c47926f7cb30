"""What a generation needs apart from the model: parameters, stop strings, the engine seam.

Importable without torch, so the scheduler and its tests run on a fake
engine; ``engine.py`` holds the transformers implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from openai_stream_protocol import as_int


class RequestError(ValueError):
    """A request the node cannot serve (bad image, bad parameter, template refused): the client sees the message."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

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
            stop=_read_stop(metadata.get("stop")),
            seed=_read(metadata, "seed", as_int),
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


def _read_stop(value: Any) -> tuple[str, ...]:
    if _unset(value):
        return ()
    items = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(item, str) for item in items):
        raise RequestError(f"stop: expected a string or a list of strings, got {value!r}")
    return tuple(item for item in items if item)


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
    """

    __slots__ = ("stops", "held", "hit", "_longest")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.hit = False
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held) that is safe to send now."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        buffer = self.held + text
        cuts = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.held = True, ""
            return buffer[: min(cuts)]
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
