"""One frozen settings object: command-line flags > ``OPENAI_STREAM_SERVER_*`` variables > defaults.

No other module reads ``os.environ``; tests construct ``Settings(...)`` directly.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .gateway.models import parse_aliases
from .gateway.queue import parse_max_queued
from .store.config import parse_store_option

ENV_PREFIX = "OPENAI_STREAM_SERVER_"
DEFAULT_MODEL = "dora-stream"
REASONING_FIELDS = ("reasoning_content", "reasoning", "both")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 unless told otherwise."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    reuse_port: bool = False
    """Bind the port with SO_REUSEPORT (Linux), so that several server processes share it and the kernel spreads
    connections over them; every process on the port needs it. Off, a port already taken stops the server at start."""
    models: tuple[str, ...] = ()
    """Model names served. Empty: one default name (dora-stream) is listed and any requested name is accepted and echoed back."""
    model_alias: tuple[str, ...] = ()
    """ALIAS=MODEL pairs (comma-separated): a request for ALIAS is served, and answered, as MODEL."""
    strict_models: bool = False
    """Refuse (404 model_not_found) a model name no replica's hello names, even with one model group; without any
    group, any name but --model's (or the default)."""
    max_queued: tuple[str, ...] = ()
    """Requests that may wait in the server when a model group's replicas are full (comma-separated): N for every
    group, GROUP=N for one. Waiting needs the replicas' capacity (their hello's ``capacity``); beyond the bound,
    429 with Retry-After. Unset: nothing waits here, as before (docs/team.md, "Queue and tiers")."""
    api_key: str | None = None
    """When set, every /v1 route (and /metrics) needs ``Authorization: Bearer <api_key>``."""
    api_keys_file: str | None = None
    """A TOML or JSON file of named API keys (stored as SHA-256 hashes) with optional limits: requests and tokens per
    minute, completions open at once. Each key sees only the completions it made. Read again when it changes or on
    SIGHUP. --api-key, when also set, is one more key named ``default`` (docs/team.md)."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS (``*`` for any); empty turns CORS off. A POST, PUT, PATCH or DELETE
    from a browser page of any other origin (``Origin: null`` included) gets 403; the server's own
    pages and clients that send no ``Origin`` pass."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names accepted in the ``Host`` header besides localhost, loopback addresses and --host
    (any port); ``.example.com`` or ``*.example.com`` also match every subdomain; ``*`` turns the
    check off (behind a proxy that checks it). Bound to 0.0.0.0 or ::, any IP address is accepted
    too (a DNS-rebinding page always sends a name), names only when listed. Other hosts get 421."""
    public_metrics: bool = False
    """With --api-key set, /metrics needs the key too unless this is on; /health is always open."""
    log_level: str = "info"
    """Python logging level for the server and uvicorn."""

    first_chunk_timeout_s: float = 60.0
    """No first chunk within this time: 504 (or an error event once streaming), and ``cancel`` downstream."""
    idle_timeout_s: float = 30.0
    """No chunk within this time after the previous one: an error event, and ``cancel`` downstream."""
    gap_timeout_s: float = 5.0
    """A missing ``seq`` that does not arrive within this time ends the stream with an error naming it."""
    model_wait_s: float = 5.0
    """A request that arrives while no model replica is live (one is restarting) waits this long for one, then gets 503;
    a request whose replica failed it waits as long to be re-sent or continued."""
    replica_silence_s: float = 3.0
    """A model replica that sends heartbeats, holds requests and has said nothing for this long is treated as dead: its
    requests continue on another replica, and it gets no new work until it speaks again (0: never)."""
    max_attempts: int = 3
    """Sends of one request at most, the first included: re-sends after its replica died, answered busy or timed out."""
    attempt_timeout_s: float = 20.0
    """No chunk from the replica a request (or its continuation) went to within this time, while another replica could
    take it: that counts as the replica's failure and the request goes to another (0: never; the first-chunk and idle
    timeouts still bound the whole request)."""
    header_grace_s: float = 2.0
    """How long a streaming response holds its headers back waiting for the first chunk or an error."""
    ping_interval_s: float = 15.0
    """Comment pings on quiet streams so that proxies keep the connection."""
    sweep_interval_s: float = 0.25
    """How often timeouts and retention are checked."""
    request_read_timeout_s: float = 30.0
    """A request's headers must arrive within this time of the connection opening (or of the request's first byte
    on a kept-alive connection), and its body within as long again; else 408 and the connection closes. Never cuts a
    response. Raise it for large bodies over slow links. 0: no deadline."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Larger request bodies get 413 (images travel as data: URIs, hence the generous default)."""
    max_images_per_request: int = 16
    """Image parts one request may hold, on every surface that takes images; one more gets 400 naming it. 0: no cap."""
    max_active_requests: int = 4096
    """Requests in flight, with those whose body is being read; beyond this 429 with ``Retry-After``, before the body is read."""
    max_connections: int = 4096
    """Open HTTP connections at most (lowered to fit the process's open-file limit). A new one beyond it closes the
    connection that has waited longest on its client (sending a request, or idle); if every one is serving a request,
    it gets 503 with ``Retry-After``. 0: no cap."""
    max_buffered_chunks: int = 4096
    """Out-of-order chunks held per request while waiting for a gap to fill; beyond it the stream fails."""
    max_completion_bytes: int = 16 * 1024 * 1024
    """Bytes held per request: its text plus 64 per chunk (320 per chunk held for reordering); beyond it the stream fails."""
    max_total_bytes: int = 1024 * 1024 * 1024
    """Bytes held over all completions, in flight and retained (counted as for max_completion_bytes), with the
    request bodies being read and prepared and the prompts kept while in flight (in encoded bytes). Over it retained
    ones are evicted oldest first; a new request that would take it past three quarters gets 503 with Retry-After,
    judged from its declared size before its body is read; past it the largest in flight fails. 0: no bound."""
    retention_s: float = 300.0
    """How long a finished completion stays available for GET and reattach."""
    max_retained: int = 1024
    """Finished completions retained at most (oldest evicted first)."""
    max_retained_bytes: int = 64 * 1024 * 1024
    """Answer text retained over all finished completions at most (oldest evicted first)."""
    store: str = "memory"
    """Where completions are kept beyond this process (docs/store.md): ``memory`` (nothing outlives it),
    ``sqlite`` (the file $XDG_STATE_HOME/openai-stream-server/store.sqlite3, else
    ~/.local/state/openai-stream-server/store.sqlite3), ``sqlite:///abs/path``, ``sqlite:relative/path``, or
    ``redis://host:port/db`` (shared by several server processes)."""
    store_response_ttl_s: float = 30 * 86400.0
    """How long a stored response (Responses API, ``store: true``) stays in the store: 30 days, as OpenAI keeps them."""
    store_completion_ttl_s: float = 0.0
    """How long any other completion stays in the store; 0: as long as retention_s."""
    store_max_bytes: int = 1024 * 1024 * 1024
    """Encoded records the store holds at most (SQLite, Redis, memory); past it the least recently written go first."""
    store_flush_interval_s: float = 0.5
    """Queued store writes are flushed at least this often (a crash loses at most this much; keep it <= 1)."""
    reasoning_field: str = "reasoning_content"
    """Where chat completions put a reasoning model's thinking: ``delta.reasoning_content`` and
    ``message.reasoning_content`` (DeepSeek's name, read by langchain, litellm, Open WebUI), ``reasoning`` (vLLM's
    current name), or ``both``."""
    close_stream_after_events: int = 0
    """Test-only: close each reattach stream after this many events (0: never), to exercise reconnects."""
    sse_retry_ms: int = 1000
    """Reattach streams open with ``retry: <ms>``: how soon an EventSource reconnects after a drop (browsers default to 3 s)."""
    relay_sent_at: bool = False
    """Benchmark-only: streamed chunks carry ``x_sent_at``, the node's ``sent_at`` of the oldest chunk in the event."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value!r}")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        parse_store_option(self.store)  # a bad --store stops the server before anything starts
        if self.store_flush_interval_s <= 0:
            raise ValueError(f"store_flush_interval_s must be > 0, got {self.store_flush_interval_s!r}")
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"reasoning_field must be one of {', '.join(REASONING_FIELDS)}, got {self.reasoning_field!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or None to run without one")
        parse_aliases(self.model_alias)  # a bad --model-alias stops the server at start
        parse_max_queued(self.max_queued)  # and so does a bad --max-queued
        if self.api_keys_file is not None and not self.api_keys_file.strip():
            raise ValueError("api_keys_file is empty: name a file, or None to run without one")

    @property
    def default_model(self) -> str:
        return self.models[0] if self.models else DEFAULT_MODEL


def field_docs() -> dict[str, str]:
    """Each field's attribute docstring (the string below it), for ``--help`` and docs/configuration.md."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(Settings)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _cast(name: str, raw: str, kind: Any) -> Any:
    """Cast one textual value; the error names the variable and the value."""
    try:
        if kind == "tuple[str, ...]":
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            value = raw.strip().lower()
            if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(value)
            return value in ("1", "true", "yes", "on")
        return raw
    except ValueError as exc:
        raise ValueError(f"{name}: cannot read {raw!r} as {kind}") from exc


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from flags and environment; raises ``SystemExit`` with a message on a bad value."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="openai-stream-server",
        description="Streaming OpenAI-compatible API server node for dora-rs dataflows. "
        f"Every flag can also be set as {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT).",
    )
    docs = field_docs()
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default in (None, ()) else f" Default: {f.default}."
        if f.name == "models":
            help_text = f"{docs['models']} Repeatable. (env {ENV_PREFIX}MODEL, comma-separated)"
            parser.add_argument("--model", dest="models", action="append", help=help_text)
        else:
            help_text = f"{docs.get(f.name, '')}{default} (env {ENV_PREFIX}{f.name.upper()})"
            # a bare boolean flag (``--public-metrics``) means true; ``--public-metrics false`` still works
            extra: dict[str, Any] = {"nargs": "?", "const": "true"} if f.type == "bool" else {}
            parser.add_argument(flag, dest=f.name, default=None, help=help_text.replace("%", "%%"), **extra)
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        env_name = ENV_PREFIX + ("MODEL" if f.name == "models" else f.name.upper())
        raw = getattr(args, f.name)
        source = f"--{f.name.replace('_', '-')}"
        if f.name == "models" and raw:
            raw = ",".join(raw)
        if raw is None and env_name in environ:
            raw, source = environ[env_name], env_name
        if raw is None:
            continue
        if f.name == "api_key" and not raw.strip():
            # Taken as "no key" it would turn the key check off unnoticed, on 0.0.0.0 too (docs/architecture.md, "Security").
            _refuse(parser, f"{source} is empty: give a key, or leave it unset to run without one")
        try:
            values[f.name] = _cast(source, raw, f.type)
        except ValueError as exc:
            _refuse(parser, str(exc))
    try:
        return Settings(**values)
    except ValueError as exc:
        _refuse(parser, str(exc))


def _refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """A bad value: one line naming the flag or variable (the usage of every flag would bury it), exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")
