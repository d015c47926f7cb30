"""The team's API keys: read from ``--api-keys-file`` (TOML or JSON), kept hashed, read again when the file changes.

The file holds no key in clear: each entry names a key by the SHA-256 of its text (``key_sha256``),
which ``python -m openai_stream_server.gateway.keys <key>`` prints (docs/team.md, "Keys"). A presented
key is hashed once and looked up; the clear text never stays in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0
"""How often, at most, a request looks at the file's modification time (one ``stat``)."""

_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_queued")
_TIER_FIELDS = ("service_tier", "max_service_tier")
_TIERS = ("priority", "default", "flex")  # gateway/queue.py's TIERS, best first


def hash_key(key: str | bytes) -> str:
    """The SHA-256 hex digest a key file names a key by."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key of the file: its owner's name and its limits (None: no limit)."""

    name: str
    """Who holds it: completions made with it belong to this name; the log line and metrics carry it."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Prompt and answer tokens of its completions, counted when each ends."""
    max_concurrent: int | None = None
    """Completions (streams or not) it may have open at once."""
    max_queued: int | None = None
    """Its requests that may wait in one model group's queue at once (docs/team.md, "Queue and tiers")."""
    service_tier: str | None = None
    """The tier of its requests that ask none (or ``auto``); None: ``default``."""
    max_service_tier: str | None = None
    """The best tier it may have: a request asking better gets this one."""


class KeyFileError(ValueError):
    """A key file that cannot be read: the message names the file and the entry."""


def parse_keys(text: str, path: str) -> dict[str, ApiKey]:
    """``{sha256 hex: ApiKey}`` from the text of a key file (TOML, or JSON when ``path`` ends in ``.json``)."""
    try:
        data: Any = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f"{path}: expected a list 'keys' ([[keys]] in TOML)")
    keys: dict[str, ApiKey] = {}
    for number, entry in enumerate(entries, 1):
        where = f"{path}: key {number}"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: not a table")
        digest = str(entry.get("key_sha256", "")).strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(f"{where}: key_sha256 must be 64 hex digits (python -m openai_stream_server.gateway.keys <key>)")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise KeyFileError(f"{where}: needs a name")
        unknown = set(entry) - {"key_sha256", "name", *_LIMIT_FIELDS, *_TIER_FIELDS}
        if unknown:
            raise KeyFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        limits: dict[str, int | None] = {}
        for field in _LIMIT_FIELDS:
            value = entry.get(field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KeyFileError(f"{where}: {field} must be a whole number >= 1, got {value!r}")
            limits[field] = value
        tiers: dict[str, str | None] = {}
        for field in _TIER_FIELDS:
            value = entry.get(field)
            if value is not None and value not in _TIERS:
                raise KeyFileError(f"{where}: {field} must be one of {', '.join(_TIERS)}, got {value!r}")
            tiers[field] = value
        if digest in keys:
            raise KeyFileError(f"{where}: the same key is listed twice")
        keys[digest] = ApiKey(name.strip(), **limits, **tiers)  # type: ignore[arg-type]
    return keys


class KeyRing:
    """The keys of one file, read again when its modification time changes or on ``request_reload`` (SIGHUP).

    A file that no longer reads keeps the keys it had (and says so in the log): a typo while editing
    must not lock the team out.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.keys: dict[str, ApiKey] = {}
        self.reloads = 0
        self._mtime_ns: int | None = None
        self._checked_at = 0.0
        self._reload_asked = False
        self._load(strict=True)

    def _load(self, *, strict: bool) -> None:
        try:
            stat = self.path.stat()
            keys = parse_keys(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, KeyFileError) as exc:
            if strict:
                raise KeyFileError(str(exc)) from exc
            logger.error("API key file not reloaded, the previous keys stay: %s", exc)
            return
        self._mtime_ns = stat.st_mtime_ns
        self.keys = keys
        self.reloads += 1
        logger.info("API keys: %d read from %s", len(keys), self.path)

    def request_reload(self) -> None:
        """Read the file again before the next lookup (safe to call from a signal handler)."""
        self._reload_asked = True

    def maybe_reload(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if not self._reload_asked and now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        if self._reload_asked:
            self._reload_asked = False
            self._load(strict=False)
            return
        try:
            mtime_ns = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime_ns != self._mtime_ns:
            self._load(strict=False)

    def lookup(self, presented: bytes) -> ApiKey | None:
        self.maybe_reload()
        return self.keys.get(hash_key(presented)) if presented else None


if __name__ == "__main__":  # pragma: no cover - a helper for writing key files
    for arg in sys.argv[1:] or [sys.stdin.readline().strip()]:
        print(f'key_sha256 = "{hash_key(arg)}"')
