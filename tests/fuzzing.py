"""What the hypothesis fuzz tests share: the app on a thread, a dora-like backend, JSON strategies and the checks.

One app serves every example of a module, on one event loop in a thread, so that state left
behind by one body can break the next; every fuzz test ends by checking that the app still
serves each surface and drains (``assert_still_serves``), so that check holds whichever fuzz
test runs, alone or not. The backend refuses what the real dora bridge would: ``send_output``
raises on an integer outside i64 (checked on dora-rs 1.1.0: ``OverflowError``), which the bridge
turns into a 503.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from openai_stream_protocol import string_array
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.errors import BackendUnavailable
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend

I64 = (-(2**63), 2**63 - 1)

GUARD_STATUSES = {403, 415, 421}
"""openai_stream_server/guard.py's refusals: foreign Origin, non-JSON POST, foreign Host (before any id exists)."""

ID_PATTERNS = {
    "chat": re.compile(r"chatcmpl-[0-9a-f]+"),
    "completions": re.compile(r"cmpl-[0-9a-f]+"),
    "responses": re.compile(r"resp_[0-9a-f]+"),
    "messages": re.compile(r"msg_[0-9a-f]+"),
}
"""The id a surface names in ``X-Request-Id``: its own prefix and hex digits, nothing a client sent."""

ANY_ID = re.compile("|".join(p.pattern for p in ID_PATTERNS.values()))


def surface_of(path: str) -> str | None:
    """The surface a path belongs to (by its prefix), None for the others (health, models, static)."""
    for prefix, name in (
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/responses", "responses"),
        ("/v1/messages", "messages"),
    ):
        if path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + "?"):
            return name
    return None


def fuzz_settings(examples: int) -> Any:
    """Hypothesis settings for a fuzz test on the shared app: no per-example deadline (a 2-core CI machine)."""
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
    )


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
    """The app with its lifespan on an event loop in a thread; requests are synchronous for hypothesis.

    ``examples`` counts the requests each fuzz test made (by test), ``ids`` keeps the ids the
    app handed out (by surface), so that by-id routes are fuzzed with ids that exist too.
    """

    def __init__(self, **settings: Any) -> None:
        self.auth = [(b"authorization", f"Bearer {settings['api_key']}".encode())] if settings.get("api_key") else []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-app", daemon=True)
        self.backend = DoraLikeBackend()
        values = {"sweep_interval_s": 0.02, "first_chunk_timeout_s": 2, "header_grace_s": 0.1, **settings}
        self.app = create_app(Settings(**values), self.backend)
        self.examples: Counter[str] = Counter()
        self.statuses: dict[str, Counter[int]] = {}
        self.ids: dict[str, list[str]] = {name: [] for name in ID_PATTERNS}

    def __enter__(self) -> AppThread:
        self.thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://localhost", timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.client.aclose())
        self.run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def run(self, coro: Any, timeout_s: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def post(self, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
        headers = [(b"content-type", content_type.encode()), *self.auth]
        return self.run(self.client.post(path, content=content, headers=headers))  # type: ignore[no-any-return]

    def request(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None, content: bytes | None = None
    ) -> httpx.Response:
        # a raw URL: httpx would otherwise re-quote the path; headers as bytes, so any byte gets through
        url = httpx.URL("http://localhost").copy_with(raw_path=path.encode("ascii"))
        return self.run(self.client.request(method, url, headers=headers or [], content=content))  # type: ignore[no-any-return]

    def count(self, test: str, status: int) -> None:
        self.examples[test] += 1
        self.statuses.setdefault(test, Counter())[status] += 1

    def summary(self) -> str:
        """Examples and statuses per test, for the record (printed by the fuzz modules; ``-s`` shows it)."""
        return "\n".join(
            f"{test}: {self.examples[test]} requests, " + ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))
            for test, counts in self.statuses.items()
        )

    def known_id(self, surface: str, index: int) -> str | None:
        ids = self.ids[surface]
        return ids[index % len(ids)] if ids else None


@dataclass(frozen=True)
class Fuzzed:
    """One fuzz test's view of the shared app: what it sends is counted under its name."""

    app: AppThread
    test: str

    def post(self, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
        return check_post(self.app, self.test, path, content, content_type)


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
json_object = st.dictionaries(any_text, json_value, max_size=3)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right type, sometimes anything."""
    return st.one_of(strategy, strategy, json_value)


def shaped(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A body with its required keys most of the time (so that the optional ones get validated), else any subset."""
    full = st.fixed_dictionaries(required, optional=optional)
    return st.one_of(full, full, full, st.fixed_dictionaries({}, optional={**required, **optional}))


stop = st.one_of(any_text, st.lists(any_text, max_size=6), json_value)
stream_options = maybe(st.fixed_dictionaries({}, optional={"include_usage": maybe(st.booleans())}))


def fuzz_of(legal: st.SearchStrategy[dict[str, Any]], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Legal bodies (they reach the backend and the renderers), legal ones with one field replaced by anything
    (each field's check meets an otherwise good body), and wild ones, in equal parts."""

    def one_field_wrong(body: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.builds(lambda key, value: {**body, key: value}, st.sampled_from(sorted(body)) | any_text, json_value)

    return st.one_of(legal, legal.flatmap(one_field_wrong), wild)


# Legal values: right types, in range. Sizes stay small here; test_fuzz_large.py makes them large.
short_text = st.text(max_size=20)
some_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
good_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,20}", fullmatch=True)
object_schema = st.just({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
legal_stops = st.lists(st.text(min_size=1, max_size=8), max_size=4)
few_tokens = st.integers(1, 64)

legal_chat_body = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": some_text}),
            min_size=1,
            max_size=4,
        )
    },
    optional={
        "model": short_text,
        "stream": st.booleans(),
        "max_tokens": few_tokens,
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stop": legal_stops,
        "seed": st.integers(*I64),
        "tools": st.lists(
            st.fixed_dictionaries(
                {"type": st.just("function"), "function": st.fixed_dictionaries({"name": good_name, "parameters": object_schema})}
            ),
            max_size=3,
        ),
        "tool_choice": st.sampled_from(["none", "auto"]),
        "user": short_text,
    },
)
legal_completion_body = st.fixed_dictionaries(
    {"prompt": some_text},
    optional={
        "model": short_text,
        "stream": st.booleans(),
        "max_tokens": few_tokens,
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stop": legal_stops,
        "seed": st.integers(*I64),
        "n": st.just(1),
    },
)
legal_response_input = st.one_of(
    some_text,
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]), "content": some_text}),
        min_size=1,
        max_size=4,
    ),
)
legal_response_body = st.fixed_dictionaries(
    {"input": legal_response_input},
    optional={
        "model": short_text,
        "instructions": some_text,
        "max_output_tokens": few_tokens,
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stream": st.booleans(),
        "background": st.booleans(),
        "metadata": st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": good_name, "parameters": object_schema})),
        "tool_choice": st.sampled_from(["none", "auto", "required"]),
        "parallel_tool_calls": st.booleans(),
    },
)
legal_anthropic_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": some_text}), min_size=1, max_size=4
).map(lambda ms: [{"role": "user", "content": "hi"}, *ms] if ms[0]["role"] != "user" else ms)
legal_anthropic_prompt = {
    "system": some_text,
    "tools": st.lists(st.fixed_dictionaries({"name": good_name, "input_schema": object_schema}), max_size=3),
    "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "none"])}),
}
legal_message_body = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=20), "max_tokens": few_tokens, "messages": legal_anthropic_messages},
    optional={
        **legal_anthropic_prompt,
        "stop_sequences": legal_stops,
        "stream": st.booleans(),
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1),
        "top_k": st.integers(0, 100),
        "metadata": st.fixed_dictionaries({"user_id": short_text}),
    },
)
legal_count_tokens_body = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=20), "messages": legal_anthropic_messages}, optional=legal_anthropic_prompt
)


# -- checks ----------------------------------------------------------------------


def assert_answer_shape(r: httpx.Response, path: str, what: str) -> None:
    """No 5xx but the dataflow's own (503/504); the surface's id in ``X-Request-Id``; errors in the surface's shape."""
    assert r.status_code < 500 or r.status_code in (503, 504), f"{r.status_code} {r.text[:500]} for {what[:500]}"
    surface = surface_of(path)
    request_id = r.headers.get("x-request-id")
    if request_id is not None:
        pattern = ID_PATTERNS[surface] if surface else ANY_ID
        assert pattern.fullmatch(request_id), f"{request_id!r} on {path}"
    if r.status_code < 400 or r.request.method == "HEAD" or not r.headers.get("content-type", "").startswith("application/json"):
        return
    body = r.json()
    if surface == "messages":  # Anthropic's shape (docs/architecture.md, "Anthropic Messages API")
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    else:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body


def check_post(app: AppThread, test: str, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    """POST a fuzzed body to a surface's create route; an accepted request names its new id, which is kept."""
    r = app.post(path, content, content_type)
    app.count(test, r.status_code)
    assert_answer_shape(r, path, repr(content))
    surface = surface_of(path)
    if r.status_code not in GUARD_STATUSES and surface is not None and not path.endswith("/count_tokens"):
        request_id = r.headers["x-request-id"]  # every answer past the guard names its id, refusals too
        if r.status_code < 300:
            app.ids[surface].append(request_id)
    return r


def assert_still_serves(app: AppThread, test: str) -> None:
    """After a fuzz test: it ran examples, every surface still answers a plain request in full, nothing stays in flight.

    Part of every fuzz test rather than a test of its own, so that it cannot pass by running alone.
    """
    assert app.examples[test] > 0, f"{test} ran no examples"
    chat = app.post(
        "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "still alive"}], "stream": True}).encode()
    )
    assert chat.status_code == 200 and chat.text.endswith("data: [DONE]\n\n"), chat.text[:500]
    pieces = [json.loads(line[6:]) for line in chat.text.split("\n\n") if line.startswith("data: {")]
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"]) == "still alive"
    completion = app.post("/v1/completions", json.dumps({"prompt": "still here"}).encode())
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == "still here", completion.text
    response = app.post("/v1/responses", json.dumps({"input": "still there"}).encode())
    assert response.status_code == 200 and response.json()["output"][0]["content"][0]["text"] == "still there", response.text
    message = app.post(
        "/v1/messages",
        json.dumps({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "still up"}]}).encode(),
    )
    assert message.status_code == 200 and message.json()["content"][0]["text"] == "still up", message.text
    # Background requests from the fuzz may still be finishing; the sweeper ends what the fake never answers.
    registry = app.app.state.registry  # read on the app's loop: the wait runs there
    app.run(wait_until_async(lambda: not registry.active, 10, interval_s=0.02, what="no completion in flight"), 15)
