"""Console script ``openai-stream-server``: the server as a dora node."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

import uvicorn
from starlette.applications import Starlette

from openai_stream_protocol import check_zenoh_overlay, node_id_from_env

from .app import create_app
from .bridge import DoraBridge
from .connection_limits import limited_protocol
from .errors import BackendUnavailable
from .frontdoor import DEFAULT_NAME, BindError, ServerIdentity, listen_socket
from .gateway.keys import KeyFileError
from .settings import Settings, load_settings
from .store.base import StoreConfigError
from .store.config import open_store

logger = logging.getLogger(__name__)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level.upper())
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


FDS_SPARE = 256
"""File descriptors kept out of ``--max-connections``: dora's channels, shared memory, logs, the listening socket."""


def connection_cap(max_connections: int) -> int:
    """``--max-connections``, lowered to fit the open-file limit: past that limit ``accept`` fails and nothing evicts."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return max_connections
    fits = max(1, soft - FDS_SPARE)
    if max_connections and soft != resource.RLIM_INFINITY and max_connections > fits:
        logger.warning("at most %d connections: the open-file limit is %d (ulimit -n)", fits, soft)
        return fits
    return max_connections


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    """uvicorn as the server runs it: httptools with a read deadline and a connection cap (``connection_limits``)."""
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"  # 1.2-2x the events of asyncio + h11 (docs/architecture.md, Facts measured)
    except ImportError:
        loop = "asyncio"
    protocol = limited_protocol(settings.request_read_timeout_s, connection_cap(settings.max_connections))
    stats, metrics = protocol.stats, app.state.metrics
    metrics.count_from("oss_request_read_timeouts", "Requests not read in time (408)", lambda: stats.read_timeouts)
    metrics.count_from("oss_connections_evicted", "Connections waiting on their client, closed at the cap", lambda: stats.evicted)
    metrics.count_from("oss_connections_refused", "New connections refused (503) at the cap", lambda: stats.refused)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop=loop,
        http=protocol,
        ws="none",  # no route speaks WebSocket: an Upgrade is an ordinary request
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )


class _Server(uvicorn.Server):
    """uvicorn, minus raising SIGINT/SIGTERM again once it has shut down gracefully.

    uvicorn handles these signals while it serves (``serve`` below then gives in-flight streams an
    error event and [DONE]) and afterwards raises the signal again with the previous handler: the
    process then dies by SIGTERM or in a KeyboardInterrupt traceback, and dora marks the whole
    dataflow failed although the shutdown was clean. Forgetting the captured signals makes it exit
    with status 0 (tests/e2e/test_robustness.py::test_sigterm_to_the_server_ends_streams_...).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29
                if captured:
                    logger.info("shut down on signal %s", ", ".join(str(s) for s in captured))
                    captured.clear()


async def check_store(settings: Settings) -> None:
    """Open and close the store ``--store`` names: one that cannot be used stops the server before it joins the
    dataflow, with one line naming the option (docs/store.md, "Choosing a store"). Creates the SQLite file."""
    store = open_store(settings)
    try:
        await store.start()
    except StoreConfigError as exc:
        sys.stderr.write(f"openai-stream-server: error: {exc}\n")  # the status and form of a bad setting
        raise SystemExit(2) from None
    await store.aclose()


async def serve(settings: Settings, node_name: str | None = None) -> None:
    from dora import Node  # imported here: importing the package must not need a dataflow

    await check_store(settings)
    # A relative overlay path does not resolve where `dora start` runs nodes: one line, not a failure in Node() that
    # a restart policy repeats (docs/deploy.md, "Several machines").
    check_zenoh_overlay("openai-stream-server")
    # Bound before joining the dataflow: a server that cannot listen stops here, with one line that says why
    # (docs/architecture.md, "Several server processes"); with --reuse-port several processes share the port.
    try:
        sock = listen_socket(settings.host, settings.port, reuse_port=settings.reuse_port)
    except BindError as exc:
        sys.stderr.write(f"openai-stream-server: error: {exc}\n")
        raise SystemExit(2) from None

    node = Node(node_name) if node_name else Node()
    server_id = node_name or node_id_from_env(os.environ, DEFAULT_NAME)
    bridge = DoraBridge(node, replica_silence_s=settings.replica_silence_s, server_id=server_id)
    try:
        app = create_app(settings, bridge, identity=ServerIdentity.here(server_id))
    except KeyFileError as exc:  # a key file that does not read stops the server with one line (docs/team.md)
        sys.stderr.write(f"openai-stream-server: error: {exc}\n")
        raise SystemExit(2) from None
    if app.state.keys is not None:  # SIGHUP reads the key file again (docs/team.md, "Keys")
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, app.state.keys.request_reload)
    server = _Server(uvicorn_config(app, settings))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    host, port = sock.getsockname()[:2]
    logger.info("%s on http://%s:%d%s", server_id, host, port, " (SO_REUSEPORT)" if settings.reuse_port else "")
    while not serving.done():
        stopped = getattr(app.state, "stopped", None)
        if server.should_exit or (stopped is not None and stopped.is_set()):
            # In-flight streams get an error event and [DONE] before the server closes them.
            app.state.registry.fail_all(BackendUnavailable("the server is shutting down"))
            await asyncio.sleep(0.2)
            server.should_exit = True
            break
        await asyncio.wait({serving}, timeout=0.1)
    await serving


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["dataflow"]:  # `openai-stream-server dataflow ...`: write a dataflow, run nothing
        from .generate import main as generate

        generate(args[1:])
        return
    node_name = None
    if "--name" in args:
        i = args.index("--name")
        node_name = args[i + 1] if i + 1 < len(args) else None
        del args[i : i + 2]
    settings = load_settings(args)
    _configure_logging(settings.log_level)
    # uvicorn's ``loop=`` only takes effect in ``Server.run()``; ``serve()`` runs on the caller's loop,
    # so pick uvloop here (measured: benchmarks/README.md, "What changed in the server").
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    # The cyclic GC took a quarter of the CPU of non-streaming requests (every request allocates a
    # StreamState, tasks and dicts; gen-2 passes walked every imported module's objects): freeze what
    # start-up allocated and collect the young generation less often (benchmarks/README.md).
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, node_name))


if __name__ == "__main__":
    main()
