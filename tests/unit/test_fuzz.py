"""Fuzz: hypothesis-generated request bodies never get a 5xx or stop the server (issue 3).

The bodies are random JSON shapes and types around the chat schema (right
keys with wrong values, wrong keys, nesting, huge numbers, odd text) plus raw
bytes. They go through ``ASGITransport`` into the app with a backend that
refuses what the real dora bridge would: ``send_output`` raises on an
integer outside i64 (checked on dora-rs 1.1.0: ``OverflowError``), which the
bridge turns into a 503. One app serves every example, on one event loop
in a thread, so that state left behind by one body can break the next.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_stream_protocol import string_array
from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.errors import BackendUnavailable
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend

pytestmark = pytest.mark.timeout(300)

I64 = (-(2**63), 2**63 - 1)


def _dora_can_send(value: Any) -> bool:
    """What ``dora.Node.send_output`` accepts as a metadata value (bool, i64, float, str, list of them)."""
    if isinstance(value, bool | float | str):
        return True
    if isinstance(value, int):
        return I64[0] <= value <= I64[1]
    if isinstance(value, list):
        return all(_dora_can_send(v) for v in value)
    return False


class DoraLikeBackend(FakeBackend):
    """The fake echo, but ``submit`` refuses what the real bridge could not send, as the bridge does (503)."""

    def submit(self, request: DownstreamRequest) -> None:
        string_array(request.texts)
        bad = {k: v for k, v in request.metadata.items() if not _dora_can_send(v)}
        if bad:
            raise BackendUnavailable(f"could not send to the dataflow: metadata {bad!r}")
        super().submit(request)


class AppThread:
    """The app with its lifespan on an event loop in a thread; ``post`` is synchronous for hypothesis."""

    def __init__(self, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-app", daemon=True)
        self.backend = DoraLikeBackend()
        values = {"sweep_interval_s": 0.02, "first_chunk_timeout_s": 2, "header_grace_s": 0.5, **settings}
        self.app = create_app(Settings(**values), self.backend)

    def __enter__(self) -> AppThread:
        self.thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://localhost", timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self.client.aclose())
        self._run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def post(self, content: bytes, content_type: str = "application/json") -> httpx.Response:
        return self._run(self.client.post("/v1/chat/completions", content=content, headers={"content-type": content_type}))  # type: ignore[no-any-return]

    def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]], content: bytes | None) -> httpx.Response:
        # a raw URL: httpx would otherwise re-quote the path; headers as bytes, so any byte gets through
        url = httpx.URL("http://localhost").copy_with(raw_path=path.encode("ascii"))
        return self._run(self.client.request(method, url, headers=headers, content=content))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def app_thread() -> Iterator[AppThread]:
    with AppThread() as app:
        yield app


# -- strategies ------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["", " ", "\x00", "<|user|>\n", "\u2028", "😀" * 3, "a" * 300, "\\ud800"]
)
ints = st.integers() | st.sampled_from([0, -1, 1, I64[1], I64[1] + 1, I64[0], I64[0] - 1, 2**200])
floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, -0.0, 2.0, 2.0000001, 1e308, 5e-324])
leaf = st.none() | st.booleans() | ints | floats | any_text
json_value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3), max_leaves=8
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right type, sometimes anything."""
    return st.one_of(strategy, strategy, json_value)


image_url = st.fixed_dictionaries(
    {}, optional={"url": maybe(any_text), "detail": maybe(st.sampled_from(["auto", "low", "high"]))}
)
part = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(st.sampled_from(["text", "image_url", "input_audio", "file", "refusal"])),
        "text": maybe(any_text),
        "image_url": maybe(image_url),
    },
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard"])),
        "content": st.one_of(any_text, st.lists(part, max_size=3), json_value),
        "name": maybe(any_text),
        "tool_call_id": maybe(any_text),
        "tool_calls": json_value,
    },
)
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": any_text}), min_size=1, max_size=3
)
chat_body = st.fixed_dictionaries(
    {},
    optional={
        # valid messages half the time, so that the other fields get past validation and reach the backend
        "messages": st.one_of(valid_messages, st.lists(message, min_size=1, max_size=3), json_value),
        "model": maybe(any_text),
        "stream": maybe(st.booleans()),
        "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": maybe(st.booleans())})),
        "max_tokens": maybe(ints),
        "max_completion_tokens": maybe(ints),
        "temperature": maybe(floats),
        "top_p": maybe(floats),
        "n": maybe(ints),
        "stop": st.one_of(any_text, st.lists(any_text, max_size=6), json_value),
        "seed": maybe(ints),
        "background": maybe(st.booleans()),
        "tools": json_value,
        "response_format": json_value,
        "user": json_value,
    },
)


GUARD_STATUSES = {403, 415, 421}
"""openai_stream_server/guard.py's refusals: foreign Origin, non-JSON POST, foreign Host."""


def check(app: AppThread, content: bytes, content_type: str = "application/json") -> httpx.Response:
    r = app.post(content, content_type)
    assert r.status_code < 500, f"{r.status_code} {r.text[:500]} for {content[:500]!r}"
    if r.status_code not in GUARD_STATUSES:  # the guard answers before a completion id exists
        assert r.headers["x-request-id"].startswith("chatcmpl-")
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return r


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=chat_body)
def test_chat_shaped_bodies_never_get_a_5xx(app_thread: AppThread, body: dict[str, Any]) -> None:
    check(app_thread, json.dumps(body).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=json_value)
def test_any_json_never_gets_a_5xx(app_thread: AppThread, body: Any) -> None:
    check(app_thread, json.dumps(body).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
def test_any_bytes_never_get_a_5xx(app_thread: AppThread, raw: bytes, content_type: str) -> None:
    check(app_thread, raw, content_type)


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("seed", 2**63, id="seed-above-i64"),
        pytest.param("seed", -(2**63) - 1, id="seed-below-i64"),
        pytest.param("max_tokens", 2**63, id="max-tokens-above-i64"),
        pytest.param("max_completion_tokens", 2**64, id="max-completion-tokens-above-i64"),
    ],
)
def test_integers_dora_cannot_carry_are_a_400_not_a_503(app_thread: AppThread, field: str, value: int) -> None:
    """Regression: a seed of 2**63 passed validation, then dora's send_output raised OverflowError -> 503."""
    r = check(app_thread, json.dumps({"messages": [{"role": "user", "content": "x"}], field: value}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_the_server_still_answers_after_the_fuzz(app_thread: AppThread) -> None:
    r = check(app_thread, json.dumps({"messages": [{"role": "user", "content": "still alive"}], "stream": True}).encode())
    assert r.status_code == 200 and "still" in r.text and r.text.endswith("data: [DONE]\n\n")
    assert app_thread._run(_active(app_thread)) == 0


async def _active(app: AppThread) -> int:
    for _ in range(100):  # background requests from the fuzz may still be finishing
        if not app.app.state.registry.active:
            break
        await asyncio.sleep(0.05)
    return len(app.app.state.registry.active)


# -- whole requests: paths, methods, headers and bodies (issue 9) ----------------------


@pytest.fixture(scope="module")
def keyed_app_thread() -> Iterator[AppThread]:
    """The same with an API key and a CORS origin, so that the key and origin paths are fuzzed too."""
    with AppThread(api_key="k", cors_origins=("http://ok.example",)) as app:
        yield app


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[str]]:
    """Statuses seen by the request fuzz; printed at the end for the record (run with ``-s`` to see it)."""
    counts: Counter[str] = Counter()
    yield counts
    statuses = sorted((k for k in counts if k.isdigit()), key=int)
    print(
        f"\nrequest fuzz over ASGI: {counts['requests']} requests, {len(statuses)} distinct statuses: "
        + ", ".join(f"{k}x{counts[k]}" for k in statuses)
    )


def _percent(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


any_bytes = st.binary(max_size=24)
id_segment = st.one_of(
    st.text("0123456789abcdef", min_size=1, max_size=30).map(lambda h: "chatcmpl-" + h),
    st.binary(min_size=1, max_size=12).map(_percent),
    st.text(max_size=12).map(lambda t: quote(t, safe="")),
    st.sampled_from(
        ["%0d%0a", "%E2%9C%93", "chatcmpl-%E2%9C%93", "%00", "..", "%2e%2e%2f", "%ff%fe", "chatcmpl-nope", "a" * 3000]
    ),
)
fuzz_path = st.one_of(
    st.just("/v1/chat/completions"),
    st.sampled_from(
        ["/", "/health", "/metrics", "/v1", "/v1/models", "/v1/models/", "/v1/chat/completions", "/v1/chat/completions/"]
        + ["/static/app.js", "/static/", "/static/..%2f..%2fsettings.py", "/nope", "//", "/v1/chat/completions//stream"]
    ),
    st.builds(
        lambda i, suffix: f"/v1/chat/completions/{i}{suffix}",
        id_segment,
        st.sampled_from(["", "/stream", "/cancel", "/x", "/stream/"]),
    ),
    st.builds(lambda i: f"/v1/models/{i}", id_segment),
)
fuzz_query = st.one_of(
    st.just(""),
    st.builds(lambda k, v: f"?{k}={v}", st.sampled_from(["api_key", "starting_after", "x", ""]), id_segment),
)


def mostly(good: list[bytes], odd: list[bytes]) -> st.SearchStrategy[bytes]:
    """Usually a value that gets past the guard (so that the routes behind it are fuzzed too), else an odd one."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(good), st.sampled_from(odd), any_bytes)


fuzz_headers = st.fixed_dictionaries(
    {},
    optional={
        b"host": mostly(
            [b"localhost", b"127.0.0.1:1", b"[::1]:8000", b"LOCALHOST."],
            [b"evil.example", b"", b"[", b"[::1", b"a:b:c", b"localhost:", b"localhost:99999999999999999999"]
            + [b"\xff\xfe", "ünïcode.example".encode(), b"0.0.0.0"],
        ),
        b"origin": mostly(
            [b"http://localhost", b"http://ok.example"],
            [b"null", b"https://evil.example", b"http://localhost:8000", b"file://", b"http://[::1", b"\xff"]
            + [b"http://localhost/path", b"HTTP://LOCALHOST"],
        ),
        b"content-type": mostly(
            [b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON;"],
            [b"text/plain", b"", b"multipart/form-data; boundary=--x", b"\xe9", b"application/json\xff"],
        ),
        b"content-length": mostly([b"0", b"5"], [b"-1", b"1e3", b"9" * 30, b"\xb2", b"\xd9\xa3", b" 5", b"5, 5"]),
        b"authorization": mostly([b"Bearer k"], [b"Bearer wrong", b"Bearer ", b"Basic a2V5", b"\xff", b"Bearer k\x00"]),
        b"last-event-id": mostly([b"0", b"3"], [b"-1", b"-2", b"x", b"\xb2", b"9" * 30]),
        b"x-anything": any_bytes,
    },
)

fuzz_body = st.one_of(
    st.none(),
    chat_body.map(lambda b: json.dumps(b).encode()),
    json_value.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=200),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    keyed=st.booleans(),
    method=st.sampled_from(["GET", "POST"]) | st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW"]),
    path=fuzz_path,
    query=fuzz_query,
    headers=fuzz_headers,
    body=fuzz_body,
)
def test_any_request_never_gets_a_5xx(
    app_thread: AppThread,
    keyed_app_thread: AppThread,
    tally: Counter[str],
    keyed: bool,
    method: str,
    path: str,
    query: str,
    headers: dict[bytes, bytes],
    body: bytes | None,
) -> None:
    """No answer is a 5xx other than 503/504 (the dataflow's own), whatever the request; errors are error objects."""
    app = keyed_app_thread if keyed else app_thread
    r = app.request(method, path + query, list(headers.items()), body)
    tally["requests"] += 1
    tally[str(r.status_code)] += 1
    assert r.status_code < 500 or r.status_code in (503, 504), f"{r.status_code} {r.text[:300]} for {method} {path}{query}"
    request_id = r.headers.get("x-request-id")
    assert request_id is None or re.fullmatch(r"chatcmpl-[0-9a-f]+", request_id), request_id
    if r.status_code >= 400 and method != "HEAD" and r.headers.get("content-type", "").startswith("application/json"):
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
