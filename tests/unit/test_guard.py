"""openai_stream_server/guard.py and what goes with it, one table per concern.

A web page must not drive a server on the user's machine: non-JSON POSTs (415),
foreign ``Host`` headers (421, DNS rebinding), foreign ``Origin`` on
state-changing methods (403), /metrics behind the API key. User input never
forges a log line, never reaches a header, and a path id we could not have
made is a 404, not a 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from openai_stream_protocol import Chunk
from openai_stream_server.app import create_app
from openai_stream_server.guard import RequestGuard
from openai_stream_server.settings import Settings, load_settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(30)

MSG = [{"role": "user", "content": "hi there"}]
BODY = {"messages": MSG}


def fast(**overrides: Any) -> Settings:
    return Settings(**{"sweep_interval_s": 0.02, **overrides})


def assert_error(r: Any, status: int, param: str | None, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)


# -- 1. Content-Type: only JSON (or none) on a POST ---------------------------------


@pytest.mark.parametrize(
    "content_type, status",
    [
        pytest.param("application/json", 200, id="json"),
        pytest.param("application/json; charset=utf-8", 200, id="json-charset"),
        pytest.param("Application/JSON ;charset=UTF-8", 200, id="json-any-case"),
        pytest.param(None, 200, id="missing-like-curl"),
        pytest.param("text/plain", 415, id="text-plain-no-preflight"),
        pytest.param("text/plain;charset=UTF-8", 415, id="text-plain-charset"),
        pytest.param("application/x-www-form-urlencoded", 415, id="form"),
        pytest.param("multipart/form-data; boundary=x", 415, id="multipart"),
        pytest.param("application/jsonp", 415, id="json-prefix"),
        pytest.param("", 415, id="empty"),
    ],
)
async def test_post_needs_a_json_content_type(content_type: str | None, status: int) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    async with make_client(fast()) as (client, backend):
        r = await client.post("/v1/chat/completions", content=json.dumps(BODY).encode(), headers=headers)
    if status == 200:
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi there"
    else:
        assert_error(r, 415, "Content-Type", "unsupported_media_type")
        assert backend.submitted == []


async def test_cancel_with_a_text_plain_body_is_refused_too() -> None:
    async with make_client(fast()) as (client, _):
        created = await client.post("/v1/chat/completions", json={**BODY, "background": True})
        r = await client.post(f"/v1/chat/completions/{created.json()['id']}/cancel", headers={"content-type": "text/plain"})
        bare = await client.post(f"/v1/chat/completions/{created.json()['id']}/cancel")  # the demo page's cancel
    assert_error(r, 415, "Content-Type", "unsupported_media_type")
    assert bare.status_code == 200


# -- 2. Host allow-list: 421 ---------------------------------------------------------


@pytest.mark.parametrize(
    "settings, host, status",
    [
        pytest.param({}, "localhost:8000", 200, id="localhost"),
        pytest.param({}, "LOCALHOST.", 200, id="localhost-any-case-trailing-dot"),
        pytest.param({}, "127.0.0.1:8000", 200, id="127.0.0.1"),
        pytest.param({}, "[::1]:8000", 200, id="ipv6-loopback"),
        pytest.param({}, "127.0.0.2", 200, id="other-loopback"),
        pytest.param({}, "evil.example:8000", 421, id="foreign-name-rebinding"),
        pytest.param({}, "localhost.evil.example", 421, id="localhost-prefix"),
        pytest.param({}, "192.168.1.5:8000", 421, id="lan-ip-when-bound-to-loopback"),
        pytest.param({}, "", 421, id="empty"),
        pytest.param({}, "local host", 421, id="space"),
        pytest.param({}, "localhost:99999", 421, id="bad-port"),
        pytest.param({}, "::1", 421, id="unbracketed-ipv6"),
        pytest.param({"host": "gpu-box.lan"}, "gpu-box.lan:8000", 200, id="bound-name"),
        pytest.param({"host": "::1"}, "[::1]", 200, id="bound-ipv6"),
        pytest.param({"allowed_hosts": ("api.example.com",)}, "API.example.com:443", 200, id="listed"),
        pytest.param({"allowed_hosts": ("api.example.com",)}, "x.api.example.com", 421, id="listed-no-subdomain"),
        pytest.param({"allowed_hosts": (".example.com",)}, "a.b.example.com", 200, id="dot-wildcard-subdomain"),
        pytest.param({"allowed_hosts": (".example.com",)}, "example.com", 200, id="dot-wildcard-itself"),
        pytest.param({"allowed_hosts": (".example.com",)}, "badexample.com", 421, id="dot-wildcard-not-a-suffix-match"),
        pytest.param({"allowed_hosts": ("*.example.com",)}, "x.example.com", 200, id="star-wildcard"),
        pytest.param({"allowed_hosts": ("*",)}, "anything.example", 200, id="star-turns-it-off"),
        pytest.param({"host": "0.0.0.0"}, "192.168.1.5:8000", 200, id="bind-all-lan-ip"),
        pytest.param({"host": "0.0.0.0"}, "[fe80::1]:8000", 200, id="bind-all-ipv6"),
        pytest.param({"host": "0.0.0.0"}, "evil.example", 421, id="bind-all-still-no-names"),
        pytest.param({"host": "::"}, "10.0.0.1", 200, id="bind-all-v6-lan-ip"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/models", "/health", "/"])
async def test_host_allow_list(settings: dict[str, Any], host: str, status: int, path: str) -> None:
    async with make_client(fast(**settings)) as (client, _):
        r = await client.get(path, headers={"host": host})
    if status == 200:
        assert r.status_code == 200
    else:
        assert_error(r, 421, "Host", "host_not_allowed")


async def test_a_request_without_host_passes() -> None:
    """HTTP/1.0 and raw clients may send none; a browser (and so a rebinding page) always does."""
    app = create_app(fast(), FakeBackend())
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.0",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/models",
        "raw_path": b"/v1/models",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "app": app,
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 200


# -- 3. Origin on state-changing methods: 403 ----------------------------------------


@pytest.mark.parametrize(
    "settings, method, path, headers, status",
    [
        pytest.param({}, "POST", "/v1/chat/completions", {}, 200, id="no-origin-curl-sdk"),
        pytest.param({}, "POST", "/v1/chat/completions", {"origin": "http://localhost"}, 200, id="same-origin"),
        pytest.param(
            {},
            "POST",
            "/v1/chat/completions",
            {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"},
            200,
            id="same-origin-demo-page",
        ),
        pytest.param(
            {"allowed_hosts": ("chat.example.com",)},
            "POST",
            "/v1/chat/completions",
            {"host": "chat.example.com", "origin": "https://chat.example.com"},
            200,
            id="same-origin-behind-tls-proxy",
        ),
        pytest.param({}, "POST", "/v1/chat/completions", {"origin": "http://localhost:3000"}, 403, id="same-host-other-port"),
        pytest.param({}, "POST", "/v1/chat/completions", {"origin": "https://evil.example"}, 403, id="foreign"),
        pytest.param({}, "POST", "/v1/chat/completions", {"origin": "null"}, 403, id="null"),
        pytest.param({}, "POST", "/v1/chat/completions", {"origin": "file://"}, 403, id="file"),
        pytest.param({}, "POST", "/v1/chat/completions", {"origin": "http://[::1"}, 403, id="unclosed-ipv6-bracket"),
        pytest.param({}, "POST", "/v1/chat/completions/chatcmpl-0/cancel", {"origin": "https://evil.example"}, 403, id="cancel"),
        pytest.param({}, "DELETE", "/v1/chat/completions/chatcmpl-0", {"origin": "https://evil.example"}, 403, id="delete"),
        pytest.param({}, "PUT", "/v1/models", {"origin": "https://evil.example"}, 403, id="put"),
        pytest.param({}, "GET", "/v1/models", {"origin": "https://evil.example"}, 200, id="get-is-not-state-changing"),
        pytest.param(
            {"cors_origins": ("https://chat.example.com",)},
            "POST",
            "/v1/chat/completions",
            {"origin": "https://chat.example.com"},
            200,
            id="cors-listed",
        ),
        pytest.param(
            {"cors_origins": ("https://chat.example.com",)},
            "POST",
            "/v1/chat/completions",
            {"origin": "https://other.example.com"},
            403,
            id="cors-not-listed",
        ),
        pytest.param(
            {"cors_origins": ("*",)}, "POST", "/v1/chat/completions", {"origin": "https://any.example"}, 200, id="cors-star"
        ),
        pytest.param({"cors_origins": ("*",)}, "POST", "/v1/chat/completions", {"origin": "null"}, 403, id="cors-star-not-null"),
        pytest.param({"cors_origins": ("null",)}, "POST", "/v1/chat/completions", {"origin": "null"}, 200, id="null-when-listed"),
    ],
)
async def test_foreign_origin_cannot_change_state(
    settings: dict[str, Any], method: str, path: str, headers: dict[str, str], status: int
) -> None:
    async with make_client(fast(**settings)) as (client, backend):
        kwargs: dict[str, Any] = {"json": BODY} if method == "POST" else {}
        r = await client.request(method, path, headers=headers, **kwargs)
    if status == 200:
        assert r.status_code in (200, 404, 405), r.text  # past the guard: the route decides
        if path == "/v1/chat/completions":
            assert r.status_code == 200
    else:
        assert_error(r, 403, "Origin", "origin_not_allowed")
        assert backend.submitted == []


# -- 4. /metrics behind the API key ---------------------------------------------------


@pytest.mark.parametrize(
    "settings, path, authorization, status",
    [
        pytest.param({"api_key": "k"}, "/metrics", None, 401, id="metrics-needs-the-key"),
        pytest.param({"api_key": "k"}, "/metrics", "Bearer wrong", 401, id="metrics-wrong-key"),
        pytest.param({"api_key": "k"}, "/metrics", "Bearer k", 200, id="metrics-with-the-key"),
        pytest.param({"api_key": "k", "public_metrics": True}, "/metrics", None, 200, id="public-metrics"),
        pytest.param({}, "/metrics", None, 200, id="no-key-no-auth"),
        pytest.param({"api_key": "k"}, "/health", None, 200, id="health-stays-open"),
        pytest.param({"api_key": "k"}, "/", None, 200, id="demo-page-stays-open"),
        pytest.param({"api_key": "k"}, "/static/app.js", None, 200, id="demo-script-stays-open"),
    ],
)
async def test_metrics_need_the_key(settings: dict[str, Any], path: str, authorization: str | None, status: int) -> None:
    headers = {"authorization": authorization} if authorization else {}
    async with make_client(fast(**settings)) as (client, _):
        r = await client.get(path, headers=headers)
    if status == 401:
        assert_error(r, 401, None, "invalid_api_key")
    else:
        assert r.status_code == 200


# -- 5. bounded model name, no forged log lines ---------------------------------------


@pytest.mark.parametrize(
    "model, status",
    [
        pytest.param("m" * 256, 200, id="256-chars"),
        pytest.param("m" * 257, 400, id="257-chars"),
        pytest.param("m" * 100_000, 400, id="100k-chars"),
    ],
)
async def test_model_name_is_bounded(model: str, status: int) -> None:
    async with make_client(fast()) as (client, backend):
        r = await client.post("/v1/chat/completions", json={**BODY, "model": model})
    if status == 200:
        assert r.status_code == 200 and r.json()["model"] == model
    else:
        assert_error(r, 400, "model", "invalid_value")
        assert backend.submitted == []


FORGED = "\nINFO openai_stream_server.registry completion chatcmpl-forged status=completed\r\u2028x"


def _node_error(request: Any, chunks: list[Chunk]) -> list[Chunk]:
    return [Chunk(request.request_id, 0, "", fin=True, finish_reason="error", error="boom" + FORGED)]


@pytest.mark.parametrize(
    "method, path, body, backend",
    [
        pytest.param("POST", "/v1/chat/completions", {**BODY, "model": "m" + FORGED}, FakeBackend(), id="model"),
        pytest.param(
            "POST", "/v1/chat/completions", {**BODY, "model": "m" + FORGED, "stream": True}, FakeBackend(), id="model-stream"
        ),
        pytest.param("POST", "/v1/chat/completions", BODY, FakeBackend(plan=_node_error), id="node-error-message"),
        pytest.param("GET", "/v1/chat/completions/chatcmpl-1%0aINFO%20forged", None, FakeBackend(), id="path-id"),
    ],
)
async def test_user_input_cannot_forge_a_log_line(
    caplog: pytest.LogCaptureFixture, method: str, path: str, body: Any, backend: FakeBackend
) -> None:
    caplog.set_level(logging.DEBUG, logger="openai_stream_server")
    async with make_client(fast(), backend) as (client, _):
        await client.request(method, path, json=body)
    messages = [record.getMessage() for record in caplog.records]
    assert all(not any(c in m for c in "\n\r\u2028") for m in messages), messages
    if method == "POST":
        assert any(m.startswith("completion chatcmpl-") for m in messages)  # the line we looked at was written


# -- 6. path ids we could not have made: 404, never a 500 ----------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("GET", "/v1/chat/completions/%E2%9C%93", id="non-ascii"),
        pytest.param("GET", "/v1/chat/completions/%0d%0a/stream", id="crlf-stream"),
        pytest.param("POST", "/v1/chat/completions/%0d%0a/cancel", id="crlf-cancel"),
        pytest.param("GET", "/v1/chat/completions/chatcmpl-%E2%9C%93", id="prefix-then-non-ascii"),
        pytest.param("GET", "/v1/chat/completions/chatcmpl-ab%00", id="nul"),
        pytest.param("GET", "/v1/chat/completions/chatcmpl-ab%7F/stream", id="del"),
        pytest.param("GET", "/v1/chat/completions/" + "chatcmpl-" + "a" * 5000, id="very-long"),
        pytest.param("GET", "/v1/chat/completions/chatcmpl-nope", id="plain-unknown"),
    ],
)
async def test_bad_path_ids_are_a_404_error_object(method: str, path: str) -> None:
    async with make_client(fast()) as (client, _):
        r = await client.request(method, path, headers={"Last-Event-ID": "1"})
    assert_error(r, 404, "id", "not_found")
    assert "x-request-id" not in r.headers  # the id was never ours: nothing to name
    assert len(r.json()["error"]["message"]) < 200


async def test_a_real_id_still_names_itself_in_the_header() -> None:
    async with make_client(fast()) as (client, _):
        created = await client.post("/v1/chat/completions", json=BODY)
        request_id = created.headers["x-request-id"]
        r = await client.get(f"/v1/chat/completions/{request_id}")
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id


@pytest.mark.parametrize(
    "content_length",
    [pytest.param(b"\xb2", id="superscript-two-isdigit"), pytest.param(b"\xd9\xa3", id="arabic-three-bytes")],
)
async def test_odd_content_length_is_not_a_500(content_length: bytes) -> None:
    """Regression (found by the fuzz): ``"\\xb2".isdigit()`` is true and ``int("\\xb2")`` raised."""
    async with make_client(fast()) as (client, _):
        r = await client.post(
            "/v1/chat/completions",
            content=json.dumps(BODY).encode(),
            headers={"content-type": "application/json", "content-length": content_length},
        )
    assert r.status_code == 200


# -- the middleware itself and its settings ------------------------------------------


async def test_the_guard_hands_the_app_the_servers_own_send() -> None:
    """Pure ASGI: nothing wraps ``receive`` or ``send``, so an SSE stream cannot be buffered on the way."""
    seen: list[tuple[object, object]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((receive, send))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    guard = RequestGuard(inner, bound_host="127.0.0.1", allowed_hosts=(), cors_origins=())
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"host", b"localhost")]}
    await guard(scope, receive, send)
    assert seen == [(receive, send)]


@pytest.mark.parametrize(
    "argv, environ, allowed_hosts, public_metrics",
    [
        pytest.param([], {}, (), False, id="defaults"),
        pytest.param(["--allowed-hosts", "*"], {}, ("*",), False, id="star"),
        pytest.param(
            [], {"OPENAI_STREAM_SERVER_ALLOWED_HOSTS": "a.example, .b.example"}, ("a.example", ".b.example"), False, id="env"
        ),
        pytest.param(["--public-metrics"], {}, (), True, id="bare-bool-flag"),
        pytest.param(["--public-metrics", "false"], {}, (), False, id="bool-flag-false"),
        pytest.param([], {"OPENAI_STREAM_SERVER_PUBLIC_METRICS": "yes"}, (), True, id="bool-env"),
    ],
)
def test_guard_settings_from_flags_and_environment(
    argv: list[str], environ: dict[str, str], allowed_hosts: tuple[str, ...], public_metrics: bool
) -> None:
    settings = load_settings(argv, environ)
    assert (settings.allowed_hosts, settings.public_metrics) == (allowed_hosts, public_metrics)
