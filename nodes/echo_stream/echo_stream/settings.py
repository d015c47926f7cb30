"""The node's settings, read once from the environment in ``main()``.

No other module reads ``os.environ``; tests construct ``Settings(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class Settings:
    tokens_per_chunk: int = 1
    """``ECHO_TOKENS_PER_CHUNK``: word tokens per chunk (and per argument chunk in tool mode)."""
    token_delay_s: float = 0.02
    """``ECHO_TOKEN_DELAY_S``: seconds per token, the first chunk's included; 0 sends as fast as it can."""
    stamp: bool = False
    """``ECHO_STAMP``: add ``sent_at`` (``time.time()``) to every chunk's metadata, for benchmarks."""
    step_ms: float = 0.0
    """``ECHO_STEP_MS``: above 0, step mode (``step.py``): every step, one message with every active request's next chunk."""
    max_concurrent: int = 0
    """``ECHO_MAX_CONCURRENT``: above 0, at most this many requests generate at once; the rest wait in arrival order
    (a model's capacity, so that replicas have something to share; ignored in step mode)."""
    heartbeat_s: float = 0.25
    """``ECHO_HEARTBEAT_S``: a heartbeat this often while the node holds requests (0: none, and the hello promises none)."""
    busy: bool = False
    """``ECHO_BUSY`` (tests): turn every request away with a busy error chunk, as a model whose queue is full."""
    exit_on: str | None = None
    """``ECHO_EXIT_ON`` (tests): the process exits at once when an echo reaches this text, before sending it:
    a request that crashes its replica (a poison request). Unset: never."""
    drop_every: int = 0
    """``ECHO_DROP_EVERY`` (tests): lose every Nth chunk message on the way out, as a congested transport would
    (``drop.py``); 0: never."""
    models: tuple[str, ...] = ()
    """``ECHO_MODELS``: comma-separated model names this replica says it serves in its hello and heartbeats (its model
    group on the server); unset: it names none and serves whatever it is sent."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read the ``ECHO_*`` variables; a bad value raises ``ValueError`` naming the variable."""
        tokens = _env_number(environ, "ECHO_TOKENS_PER_CHUNK", "1", int)
        delay = _env_number(environ, "ECHO_TOKEN_DELAY_S", "0.02", float)
        if tokens < 1:
            raise ValueError(f"ECHO_TOKENS_PER_CHUNK must be at least 1, got {tokens}")
        if not 0 <= delay <= 60:
            raise ValueError(f"ECHO_TOKEN_DELAY_S must be between 0 and 60 seconds, got {delay}")
        stamp = environ.get("ECHO_STAMP", "0").strip().lower() in ("1", "true", "yes")
        step_ms = _env_number(environ, "ECHO_STEP_MS", "0", float)
        if not 0 <= step_ms <= 60_000:
            raise ValueError(f"ECHO_STEP_MS must be between 0 and 60000 ms, got {step_ms}")
        max_concurrent = _env_number(environ, "ECHO_MAX_CONCURRENT", "0", int)
        if max_concurrent < 0:
            raise ValueError(f"ECHO_MAX_CONCURRENT must be 0 (no limit) or more, got {max_concurrent}")
        heartbeat_s = _env_number(environ, "ECHO_HEARTBEAT_S", "0.25", float)
        if not 0 <= heartbeat_s <= 60:
            raise ValueError(f"ECHO_HEARTBEAT_S must be between 0 (off) and 60 seconds, got {heartbeat_s}")
        busy = environ.get("ECHO_BUSY", "0").strip().lower() in ("1", "true", "yes")
        exit_on = environ.get("ECHO_EXIT_ON") or None
        drop_every = _env_number(environ, "ECHO_DROP_EVERY", "0", int)
        if drop_every == 1 or drop_every < 0:
            raise ValueError(f"ECHO_DROP_EVERY must be 0 (off) or at least 2, got {drop_every}")
        models = tuple(dict.fromkeys(m.strip() for m in environ.get("ECHO_MODELS", "").split(",") if m.strip()))
        return cls(
            models=models,
            tokens_per_chunk=tokens,
            token_delay_s=delay,
            stamp=stamp,
            step_ms=step_ms,
            max_concurrent=max_concurrent,
            heartbeat_s=heartbeat_s,
            busy=busy,
            exit_on=exit_on,
            drop_every=drop_every,
        )


def _env_number(environ: Mapping[str, str], name: str, default: str, cast: Callable[[str], _N]) -> _N:
    raw = environ.get(name, default)
    try:
        return cast(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
