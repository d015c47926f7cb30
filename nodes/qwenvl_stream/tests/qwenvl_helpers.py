"""Helpers shared by this folder's tests: events as the server sends them, wire checks, images, a local HTTP server.

The recording node and the bounded wait are the protocol package's (``openai_stream_protocol.testing``).
"""

from __future__ import annotations

import base64
import http.server
import io
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
from qwenvl_stream.engine import QwenEngine
from qwenvl_stream.generation import GenerationParams, RowStream
from qwenvl_stream.settings import Settings

from openai_stream_protocol import USER_IMAGE_PREFIX, USER_TEXT_PREFIX, Chunk
from openai_stream_protocol.testing import RecordingNode, wait_for


def check_no_flush(node: RecordingNode) -> RecordingNode:
    """No message carries ``flush``: dora would empty the server's whole input queue.

    (docs/architecture.md, "``flush`` is never sent".)
    """
    assert all("flush" not in metadata for metadata in node.metadata())
    return node


class Waits:
    """Bounded waits inside an events generator, asserted after the run.

    The scheduler's reader thread runs the generator and logs an exception
    instead of raising it, so a failed wait there must be noted and checked
    by the test itself: ``assert waits.missed == []``.
    """

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.missed: list[str] = []

    def __call__(self, predicate: Callable[[], object], what: str) -> bool:
        if wait_for(predicate, self.timeout_s):
            return True
        self.missed.append(what)
        return False


def request(request_id: str, texts: list[str], **metadata: Any) -> dict[str, Any]:
    """An INPUT event as the server sends it."""
    return {
        "type": "INPUT",
        "id": "v1/chat/completions",
        "value": pa.array(texts, type=pa.string()),
        "metadata": {"request_id": request_id, "session_id": request_id, "model": "m", "stream": True, **metadata},
    }


def cancel(request_id: str) -> dict[str, Any]:
    return {
        "type": "INPUT",
        "id": "cancel",
        "value": pa.array([request_id], type=pa.string()),
        "metadata": {"request_id": request_id},
    }


def png_data_uri(size: tuple[int, int] = (60, 40), color: tuple[int, int, int] = (0, 128, 255)) -> str:
    from PIL import Image

    return image_data_uri(Image.new("RGB", size, color))


def image_data_uri(image: Any, image_format: str = "PNG") -> str:
    """A PIL image encoded in ``image_format``, as a base64 ``data:`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def bomb_png_data_uri(size: tuple[int, int] = (8192, 8192)) -> str:
    """A 1-bit black PNG: ~8 KB on the wire at 8192 x 8192, ~200 MB once converted to RGB."""
    from PIL import Image

    return image_data_uri(Image.new("1", size))


def _truncated_png_with_a_newline() -> str:
    png = base64.b64decode(png_data_uri((300, 300)).split(",", 1)[1])
    # A media-type parameter may hold anything; a node that logs the source's start with %s writes two lines.
    return "data:image/png;x=\nERROR forged line;base64," + base64.b64encode(png[: len(png) // 2]).decode()


TRUNCATED_PNG_WITH_A_NEWLINE = _truncated_png_with_a_newline()
"""A PNG whose header reads and whose data ends half-way: it fails only when decoded."""

# A PostScript header: PIL's EPS plugin reads it, and decoding it would run Ghostscript where installed.
EPS_DATA_URI = (
    "data:image/eps;base64,"
    + base64.b64encode(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
    ).decode()
)


def check_stream(chunks: list[Chunk]) -> Chunk:
    """The wire invariants of one request's chunks; returns the last one."""
    assert chunks, "no chunk was sent"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.fin for c in chunks] == [False] * (len(chunks) - 1) + [True]
    return chunks[-1]


def png_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    return base64.b64decode(png_data_uri(size).split(",", 1)[1])


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class LocalServer:
    """A real HTTP server on 127.0.0.1 (port 0) in a thread; ``routes`` maps a path to what answers it.

    ``hits`` records each request's path and ``Host`` header. ``stop`` is set
    when the test ends, so that slow routes finish at once.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.scheme = "https" if tls is not None else "http"
        self.routes: dict[str, Route] = {}
        self.hits: list[tuple[str, str]] = []
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits.append((self.path, self.headers.get("Host", "")))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="test-http", daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.hits]

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_bytes(body: bytes, content_type: str = "image/png") -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


USER = USER_TEXT_PREFIX
IMAGE = USER_IMAGE_PREFIX


class SpyEngine(QwenEngine):
    """The real engine, keeping each request's row stream (its token count goes on after a cancel, if it does)."""

    streams: dict[str, RowStream]

    def stream(
        self,
        request_id: str,
        params: GenerationParams,
        halt: threading.Event,
        prompt_tokens: int,
        continued_ids: Sequence[int] = (),
    ) -> RowStream:
        stream = super().stream(request_id, params, halt, prompt_tokens, continued_ids)
        self.streams[request_id] = stream
        return stream


def spy(loaded_model: Any, **settings: Any) -> SpyEngine:
    """A ``SpyEngine`` over the tiny model with these node settings."""
    engine = SpyEngine(loaded_model, Settings(model_name_or_path="tiny", **settings))
    engine.streams = {}
    return engine
