"""Per-key limits: requests per minute, tokens per minute, completions open at once; OpenAI's rate-limit headers.

Each per-minute limit is a bucket that holds up to the limit and fills at limit/60 per second, so a key
may burst to its limit and then goes on at its rate, as OpenAI documents its limits. Tokens are known
only once a completion ends: it is let in while the key's token bucket is above zero and charged at
its end (prompt + answer), which may take the bucket below zero for a while (docs/team.md, "Limits").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..errors import TooManyRequests
from .keys import ApiKey

RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")
)
"""The headers every answer to a key with limits carries, as OpenAI names them."""


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class RateLimited(TooManyRequests):
    """A key over one of its limits: OpenAI's ``rate_limit_exceeded`` with the wait in ``Retry-After``."""

    error_type, code = "requests", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, kind: str = "requests") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.error_type = kind  # type: ignore[misc]  # "requests" or "tokens", as OpenAI types them

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


@dataclass(slots=True)
class Bucket:
    """``limit`` per minute: holds up to ``limit``, fills at ``limit / 60`` per second."""

    limit: int
    level: float = field(init=False)
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = float(self.limit)

    def fill(self, now: float) -> None:
        if now > self.at:  # a bucket made after ``now`` was read has nothing to add
            self.level = min(float(self.limit), self.level + (now - self.at) * self.limit / 60.0)
            self.at = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount``."""
        return max(0.0, (amount - self.level) * 60.0 / self.limit)

    def reset_s(self) -> float:
        return self.wait_for(self.limit)


@dataclass(slots=True)
class KeyUsage:
    """What one key name has used: its buckets (made from its limits) and its completions open now."""

    requests: Bucket | None
    tokens: Bucket | None
    max_concurrent: int | None
    open: int = 0

    @classmethod
    def of(cls, key: ApiKey) -> KeyUsage:
        return cls(
            Bucket(key.requests_per_minute) if key.requests_per_minute else None,
            Bucket(key.tokens_per_minute) if key.tokens_per_minute else None,
            key.max_concurrent,
        )

    def matches(self, key: ApiKey) -> bool:
        return (
            (self.requests.limit if self.requests else None) == key.requests_per_minute
            and (self.tokens.limit if self.tokens else None) == key.tokens_per_minute
            and self.max_concurrent == key.max_concurrent
        )


class RateLimiter:
    """The usage of every key name seen, kept across key-file reloads unless that key's limits changed."""

    def __init__(self) -> None:
        self.usage: dict[str, KeyUsage] = {}

    def _usage(self, key: ApiKey) -> KeyUsage:
        usage = self.usage.get(key.name)
        if usage is None or not usage.matches(key):
            usage = self.usage[key.name] = KeyUsage.of(key)
        return usage

    def admit(self, key: ApiKey, *, opens: bool, now: float | None = None) -> KeyUsage:
        """Count one request of ``key`` (``opens``: it opens a completion); raises ``RateLimited`` over a limit.

        Nothing is taken from a refused request's budget.
        """
        now = time.monotonic() if now is None else now
        usage = self._usage(key)
        if usage.requests is not None:
            usage.requests.fill(now)
        if usage.tokens is not None:
            usage.tokens.fill(now)
        if opens:
            if usage.requests is not None and usage.requests.level < 1:
                raise RateLimited(
                    f"Rate limit reached for key '{key.name}': {usage.requests.limit} requests per minute.",
                    retry_after_s=usage.requests.wait_for(1),
                )
            if usage.tokens is not None and usage.tokens.level <= 0:
                raise RateLimited(
                    f"Rate limit reached for key '{key.name}': {usage.tokens.limit} tokens per minute.",
                    retry_after_s=usage.tokens.wait_for(1),
                    kind="tokens",
                )
            if usage.max_concurrent is not None and usage.open >= usage.max_concurrent:
                raise RateLimited(
                    f"Key '{key.name}' has {usage.open} completions open (limit {usage.max_concurrent}).",
                    retry_after_s=1,
                )
            if usage.requests is not None:
                usage.requests.level -= 1
            usage.open += 1
        return usage

    @staticmethod
    def close(usage: KeyUsage, tokens: int) -> None:
        """A completion ``admit(opens=True)`` let in has ended, having used ``tokens``."""
        usage.open -= 1
        if usage.tokens is not None and tokens:
            usage.tokens.fill(time.monotonic())
            usage.tokens.level -= tokens

    @staticmethod
    def headers(usage: KeyUsage) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits the key has."""
        out: list[tuple[bytes, bytes]] = []
        for kind, bucket in (("requests", usage.requests), ("tokens", usage.tokens)):
            if bucket is None:
                continue
            out += [
                (f"x-ratelimit-limit-{kind}".encode(), str(bucket.limit).encode()),
                (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, math.floor(bucket.level))).encode()),
                (f"x-ratelimit-reset-{kind}".encode(), duration(bucket.reset_s()).encode()),
            ]
        return out
