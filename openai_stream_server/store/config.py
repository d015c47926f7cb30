"""The ``--store`` option: which back end, where, and its TTLs and cap (docs/store.md, "Choosing a store").

Values: ``memory``; ``sqlite`` (the default file, below); ``sqlite:///abs/path`` or
``sqlite:relative/path`` (relative to the working directory, ``~`` expanded);
``redis://host:port/db`` (or ``rediss://`` for TLS). ``parse_store_option`` checks the form (the
settings call it, so a bad value stops the server before anything starts); ``open_store``
builds the back end, whose ``start`` then checks that it can be used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .base import Store, StoreOptions

if TYPE_CHECKING:
    from ..settings import Settings

OPTION = "--store"
FORMS = "memory, sqlite, sqlite:///abs/path, sqlite:relative/path or redis://host:port/db"
STORE_DIR = "openai-stream-server"
STORE_FILE = "store.sqlite3"


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A parsed ``--store`` value."""

    kind: str
    """``memory``, ``sqlite`` or ``redis``."""
    text: str
    """The value as given, for messages."""
    path: str | None = None
    """SQLite: the file as given (None: the default file)."""
    url: str | None = None
    """Redis: the URL."""


def parse_store_option(value: str) -> StoreSpec:
    """The parsed value; ``ValueError`` naming ``--store`` and the accepted forms otherwise."""
    text = value.strip()
    if text == "memory":
        return StoreSpec("memory", text)
    if text == "sqlite":
        return StoreSpec("sqlite", text)
    if text.startswith("sqlite:"):
        rest = text.removeprefix("sqlite:")
        if rest.startswith("///") and len(rest) > 3:
            return StoreSpec("sqlite", text, path="/" + rest[3:].lstrip("/"))
        if rest and not rest.startswith("/"):
            return StoreSpec("sqlite", text, path=rest)
        raise ValueError(f"{OPTION}: cannot read {value!r}: a SQLite file is sqlite:///abs/path or sqlite:relative/path")
    if text.startswith(("redis://", "rediss://")):
        try:
            parts = urlsplit(text)
            port = parts.port
            db = parts.path.strip("/")
        except ValueError as exc:
            raise ValueError(f"{OPTION}: cannot read {value!r}: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"{OPTION}: cannot read {value!r}: no host (redis://host:port/db)")
        if db and not db.isdigit():
            raise ValueError(f"{OPTION}: cannot read {value!r}: the database is a number (redis://host:{port or 6379}/0)")
        return StoreSpec("redis", text, url=text)
    raise ValueError(f"{OPTION}: unknown store {value!r}: use {FORMS}")


def default_sqlite_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/openai-stream-server/store.sqlite3``, else ``~/.local/state/openai-stream-server/store.sqlite3``.

    Where the XDG base directory specification puts state that should survive a restart but is
    not worth a backup; never inside the installed package. Reads the environment (as the settings
    do) because the location is the desktop's, not a setting of this server.
    """
    environ = os.environ if environ is None else environ
    state_home = environ.get("XDG_STATE_HOME", "").strip()
    base = Path(state_home) if state_home and Path(state_home).is_absolute() else Path.home() / ".local" / "state"
    return base / STORE_DIR / STORE_FILE


def store_options(settings: Settings) -> StoreOptions:
    """The TTLs, cap and flush interval the settings ask for (``store_completion_ttl_s`` 0: ``retention_s``)."""
    return StoreOptions(
        response_ttl_s=settings.store_response_ttl_s,
        completion_ttl_s=settings.store_completion_ttl_s or settings.retention_s,
        max_bytes=settings.store_max_bytes,
        flush_interval_s=settings.store_flush_interval_s,
    )


def open_store(
    settings: Settings, instance_id: str | None = None, environ: Mapping[str, str] | None = None
) -> Store:
    """The back end ``settings.store`` names, not yet started (``await store.start()`` checks it can be used)."""
    spec = parse_store_option(settings.store)
    options = store_options(settings)
    if spec.kind == "sqlite":
        from .sqlite_store import SqliteStore

        path = default_sqlite_path(environ) if spec.path is None else Path(spec.path).expanduser()
        return SqliteStore(path, options, instance_id, option_text=spec.text)
    if spec.kind == "redis":
        assert spec.url is not None
        from .redis_store import RedisStore  # redis is imported only when asked for

        return RedisStore(spec.url, options, instance_id)
    from .memory_store import MemoryStore

    return MemoryStore(options, instance_id)
