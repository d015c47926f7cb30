"""Fuzz: hypothesis-generated chat bodies and whole requests never get a 5xx or stop the server.

The bodies are random JSON shapes and types around the chat schema (right keys with wrong
values, wrong keys, nesting, huge numbers, odd text) plus raw bytes; the request fuzz varies
paths (every surface's), methods, headers and bodies. The harness (one app on a thread, the
dora-like backend, the checks run after every fuzz test) is ``tests/fuzzing.py``; the other
surfaces' bodies are fuzzed in ``test_fuzz_surfaces.py``, large legal bodies in ``test_fuzz_large.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import (
    AppThread,
    Fuzzed,
    any_text,
    assert_answer_shape,
    assert_still_serves,
    floats,
    fuzz_of,
    fuzz_settings,
    ints,
    json_value,
    legal_chat_body,
    maybe,
    stop,
    stream_options,
)

pytestmark = pytest.mark.timeout(300)

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def app_thread() -> Iterator[AppThread]:
    with AppThread() as app:
        yield app
        print("\n" + app.summary())


@pytest.fixture
def fuzzed(app_thread: AppThread, request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    """The shared app for one test; afterwards every surface must still answer (``assert_still_serves``)."""
    yield Fuzzed(app_thread, request.node.name)
    assert_still_serves(app_thread, request.node.name)


# -- strategies ------------------------------------------------------------------

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
chat_body = fuzz_of(
    legal_chat_body,
    st.fixed_dictionaries(
        {},
        optional={
            # valid messages half the time, so that the other fields get past validation and reach the backend
            "messages": st.one_of(valid_messages, st.lists(message, min_size=1, max_size=3), json_value),
            "model": maybe(any_text),
            "stream": maybe(st.booleans()),
            "stream_options": stream_options,
            "max_tokens": maybe(ints),
            "max_completion_tokens": maybe(ints),
            "temperature": maybe(floats),
            "top_p": maybe(floats),
            "n": maybe(ints),
            "stop": stop,
            "seed": maybe(ints),
            "background": maybe(st.booleans()),
            "tools": json_value,
            "response_format": json_value,
            "user": json_value,
        },
    ),
)


def check(fuzzed: Fuzzed, content: bytes, content_type: str = "application/json") -> httpx.Response:
    return fuzzed.post(CHAT, content, content_type)


@fuzz_settings(400)
@given(body=chat_body)
def test_chat_shaped_bodies_never_get_a_5xx(fuzzed: Fuzzed, body: dict[str, Any]) -> None:
    check(fuzzed, json.dumps(body).encode())


@fuzz_settings(150)
@given(body=json_value)
def test_any_json_never_gets_a_5xx(fuzzed: Fuzzed, body: Any) -> None:
    check(fuzzed, json.dumps(body).encode())


@fuzz_settings(150)
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
def test_any_bytes_never_get_a_5xx(fuzzed: Fuzzed, raw: bytes, content_type: str) -> None:
    check(fuzzed, raw, content_type)


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("seed", 2**63, id="seed-above-i64"),
        pytest.param("seed", -(2**63) - 1, id="seed-below-i64"),
        pytest.param("max_tokens", 2**63, id="max-tokens-above-i64"),
        pytest.param("max_completion_tokens", 2**64, id="max-completion-tokens-above-i64"),
    ],
)
def test_integers_dora_cannot_carry_are_a_400_not_a_503(fuzzed: Fuzzed, field: str, value: int) -> None:
    """Regression: a seed of 2**63 passed validation, then dora's send_output raised OverflowError -> 503."""
    r = check(fuzzed, json.dumps({"messages": [{"role": "user", "content": "x"}], field: value}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == field


# -- whole requests: paths, methods, headers and bodies ----------------------


@pytest.fixture(scope="module")
def keyed_app_thread() -> Iterator[AppThread]:
    """The same with an API key and a CORS origin, so that the key and origin paths are fuzzed too."""
    with AppThread(api_key="k", cors_origins=("http://ok.example",)) as app:
        yield app


@pytest.fixture
def keyed_fuzzed(keyed_app_thread: AppThread, request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    yield Fuzzed(keyed_app_thread, request.node.name)
    assert_still_serves(keyed_app_thread, request.node.name)


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
ID_PREFIXES = ["chatcmpl-", "cmpl-", "resp_", "msg_"]
id_segment = st.one_of(
    st.builds(lambda p, h: p + h, st.sampled_from(ID_PREFIXES), st.text("0123456789abcdef", min_size=1, max_size=50)),
    st.binary(min_size=1, max_size=12).map(_percent),
    st.text(max_size=12).map(lambda t: quote(t, safe="")),
    st.sampled_from(
        ["%0d%0a", "%E2%9C%93", "chatcmpl-%E2%9C%93", "%00", "..", "%2e%2e%2f", "%ff%fe", "chatcmpl-nope", "a" * 3000]
        + ["resp_%0Aevil", "resp_" + "a" * 200, "msg_x"]
    ),
)
SURFACE_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"]
fuzz_path = st.one_of(
    st.sampled_from(SURFACE_PATHS),
    st.sampled_from(
        ["/", "/health", "/metrics", "/v1", "/v1/models", "/v1/models/", "/v1/chat/completions/", "/v1/responses/"]
        + ["/static/app.js", "/static/", "/static/..%2f..%2fsettings.py", "/nope", "//", "/v1/chat/completions//stream"]
        + ["/v1/completions/", "/v1/completions/x", "/v1/messages/", "/v1/messages/batches", "/v1/messages//count_tokens"]
    ),
    st.builds(
        lambda i, suffix: f"/v1/chat/completions/{i}{suffix}",
        id_segment,
        st.sampled_from(["", "/stream", "/cancel", "/x", "/stream/"]),
    ),
    st.builds(
        lambda i, suffix: f"/v1/responses/{i}{suffix}",
        id_segment,
        st.sampled_from(["", "/cancel", "/input_items", "/input_items/", "/x"]),
    ),
    st.builds(lambda i: f"/v1/models/{i}", id_segment),
)
fuzz_query = st.one_of(
    st.just(""),
    st.builds(
        lambda k, v: f"?{k}={v}",
        st.sampled_from(["api_key", "starting_after", "stream", "order", "limit", "after", "include_obfuscation", "x", ""]),
        id_segment | st.sampled_from(["true", "false", "1", "-1", "asc", "desc", "0", "101", "9" * 30]),
    ),
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
    st.fixed_dictionaries(
        {"model": any_text, "max_tokens": ints, "messages": json_value, "prompt": any_text, "input": json_value}
    ).map(lambda b: json.dumps(b).encode()),
    json_value.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=200),
)


@fuzz_settings(300)
@given(
    keyed=st.booleans(),
    method=st.sampled_from(["GET", "POST"]) | st.sampled_from(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW"]),
    path=fuzz_path,
    query=fuzz_query,
    headers=fuzz_headers,
    body=fuzz_body,
)
def test_any_request_never_gets_a_5xx(
    fuzzed: Fuzzed,
    keyed_fuzzed: Fuzzed,
    tally: Counter[str],
    keyed: bool,
    method: str,
    path: str,
    query: str,
    headers: dict[bytes, bytes],
    body: bytes | None,
) -> None:
    """No answer is a 5xx other than 503/504 (the dataflow's own), whatever the request; ids are the surface's own;
    errors are the surface's error objects."""
    target = keyed_fuzzed if keyed else fuzzed
    r = target.app.request(method, path + query, list(headers.items()), body)
    target.app.count(target.test, r.status_code)
    tally["requests"] += 1
    tally[str(r.status_code)] += 1
    assert_answer_shape(r, path, f"{method} {path}{query}")
