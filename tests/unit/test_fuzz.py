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
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.errors import BackendUnavailable
from openai_stream_server.protocol import string_array
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

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-app", daemon=True)
        self.backend = DoraLikeBackend()
        self.app = create_app(Settings(sweep_interval_s=0.02, first_chunk_timeout_s=2, header_grace_s=0.5), self.backend)

    def __enter__(self) -> AppThread:
        self.thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://fuzz", timeout=10)
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


def check(app: AppThread, content: bytes, content_type: str = "application/json") -> httpx.Response:
    r = app.post(content, content_type)
    assert r.status_code < 500, f"{r.status_code} {r.text[:500]} for {content[:500]!r}"
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
