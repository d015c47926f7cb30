"""The ``--store`` option: its forms, its default file, and the one-line errors that name it."""

from __future__ import annotations

from pathlib import Path

import pytest

from openai_stream_server.settings import Settings, load_settings
from openai_stream_server.store.base import StoreConfigError
from openai_stream_server.store.config import default_sqlite_path, open_store, parse_store_option, store_options
from openai_stream_server.store.memory_store import MemoryStore
from openai_stream_server.store.sqlite_store import SqliteStore
from tests.redis_server import free_port


@pytest.mark.parametrize(
    "value, kind, path, url",
    [
        pytest.param("memory", "memory", None, None, id="memory"),
        pytest.param("sqlite", "sqlite", None, None, id="sqlite-default-file"),
        pytest.param("sqlite:///var/lib/oss/s.db", "sqlite", "/var/lib/oss/s.db", None, id="sqlite-absolute"),
        pytest.param("sqlite:state/s.db", "sqlite", "state/s.db", None, id="sqlite-relative"),
        pytest.param("sqlite:~/s.db", "sqlite", "~/s.db", None, id="sqlite-home"),
        pytest.param("redis://127.0.0.1:6379/2", "redis", None, "redis://127.0.0.1:6379/2", id="redis"),
        pytest.param("rediss://cache.example:6380", "redis", None, "rediss://cache.example:6380", id="redis-tls"),
    ],
)
def test_accepted_forms(value: str, kind: str, path: str | None, url: str | None) -> None:
    spec = parse_store_option(value)
    assert (spec.kind, spec.path, spec.url) == (kind, path, url)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("postgres://x/y", id="unknown-scheme"),
        pytest.param("sqlite:", id="sqlite-no-path"),
        pytest.param("sqlite://host/file", id="sqlite-two-slashes"),
        pytest.param("redis://", id="redis-no-host"),
        pytest.param("redis://h:6379/zero", id="redis-bad-db"),
        pytest.param("redis://h:port/0", id="redis-bad-port"),
        pytest.param("", id="empty"),
    ],
)
def test_a_bad_value_stops_the_server_with_one_line_naming_the_option(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="--store"):
        parse_store_option(value)
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--store", value], environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--store" in err and err.count("\n") == 1


def test_the_variable_sets_it_too() -> None:
    assert load_settings([], environ={"OPENAI_STREAM_SERVER_STORE": "sqlite"}).store == "sqlite"
    assert Settings().store == "memory"


def test_the_default_file_follows_xdg_state_home(tmp_path: Path) -> None:
    assert default_sqlite_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "openai-stream-server" / "store.sqlite3"
    fallback = Path.home() / ".local" / "state" / "openai-stream-server" / "store.sqlite3"
    assert default_sqlite_path({}) == fallback
    assert default_sqlite_path({"XDG_STATE_HOME": "relative/dir"}) == fallback  # the spec ignores relative values


def test_options_take_the_retention_unless_a_completion_ttl_is_set() -> None:
    assert store_options(Settings(retention_s=42)).completion_ttl_s == 42
    assert store_options(Settings(retention_s=42, store_completion_ttl_s=7)).completion_ttl_s == 7
    assert store_options(Settings()).response_ttl_s == 30 * 86400


async def test_sqlite_default_file_is_created_on_first_use(tmp_path: Path) -> None:
    store = open_store(Settings(store="sqlite"), environ={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert isinstance(store, SqliteStore)
    await store.start()
    await store.aclose()
    assert (tmp_path / "state" / "openai-stream-server" / "store.sqlite3").is_file()


async def test_memory_is_the_default() -> None:
    assert isinstance(open_store(Settings()), MemoryStore)


async def test_a_sqlite_path_under_a_file_names_the_option(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a directory")
    store = open_store(Settings(store=f"sqlite://{tmp_path}/plain/s.db"))
    with pytest.raises(StoreConfigError, match=r"^--store sqlite://.*cannot open"):
        await store.start()


async def test_a_sqlite_path_that_is_a_directory_names_the_option(tmp_path: Path) -> None:
    store = open_store(Settings(store=f"sqlite://{tmp_path}"))
    with pytest.raises(StoreConfigError, match=r"^--store sqlite://.*cannot open"):
        await store.start()


async def test_a_sqlite_file_that_is_not_a_database_names_the_option(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all, just text" * 100)
    store = open_store(Settings(store=f"sqlite://{junk}"))
    with pytest.raises(StoreConfigError, match="^--store"):
        await store.start()


async def test_an_unreachable_redis_names_the_option() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    store = open_store(Settings(store=url))
    with pytest.raises(StoreConfigError, match=f"^--store {url}: cannot reach redis at 127.0.0.1"):
        await store.start()
