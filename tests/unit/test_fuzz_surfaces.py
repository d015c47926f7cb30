"""Fuzz: /v1/completions, /v1/responses (every route) and /v1/messages (+ count_tokens) never answer a 5xx
other than the dataflow's own 503/504, always name their own id, and answer errors in their own shape.

Bodies are the surface's schema with right keys and wrong values, wrong keys, nesting, huge numbers
and odd text (``tests/fuzzing.py``); the Responses by-id routes are fuzzed with ids the fuzz itself
created as well as made-up and malformed ones, and with odd query values. One app serves the
module; every test ends by checking that it still serves every surface (``assert_still_serves``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

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
    json_object,
    json_value,
    legal_completion_body,
    legal_count_tokens_body,
    legal_message_body,
    legal_response_body,
    maybe,
    shaped,
    stop,
    stream_options,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def app_thread() -> Iterator[AppThread]:
    with AppThread() as app:
        yield app
        print("\n" + app.summary())


@pytest.fixture
def fuzzed(app_thread: AppThread, request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    yield Fuzzed(app_thread, request.node.name)
    assert_still_serves(app_thread, request.node.name)


def post(fuzzed: Fuzzed, path: str, body: Any) -> None:
    fuzzed.post(path, json.dumps(body).encode())


tool_name = st.sampled_from(["get_weather", "lookup", "f", "a" * 65, "bad name", ""]) | any_text

# -- /v1/completions ---------------------------------------------------------------

completion_body = fuzz_of(
    legal_completion_body,
    shaped(
        {"prompt": st.one_of(any_text, any_text, st.lists(any_text, max_size=3), st.lists(ints, max_size=3), json_value)},
        {
            "model": maybe(any_text),
            "stream": maybe(st.booleans()),
            "stream_options": stream_options,
            "max_tokens": maybe(ints),
            "temperature": maybe(floats),
            "top_p": maybe(floats),
            "n": maybe(ints),
            "stop": stop,
            "seed": maybe(ints),
            "echo": maybe(st.booleans()),
            "logprobs": json_value,
            "suffix": json_value,
            "best_of": maybe(ints),
            "user": json_value,
        },
    ),
)


@fuzz_settings(250)
@given(body=completion_body)
def test_completion_bodies_never_get_a_5xx(fuzzed: Fuzzed, body: dict[str, Any]) -> None:
    post(fuzzed, "/v1/completions", body)


# -- /v1/responses -------------------------------------------------------------------

response_part = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(st.sampled_from(["input_text", "input_image", "output_text", "input_file", "refusal"])),
        "text": maybe(any_text),
        "image_url": maybe(st.sampled_from(["http://127.0.0.1/x.png", "data:image/png;base64,AAAA", ""]) | any_text),
        "detail": maybe(st.sampled_from(["low", "high", "auto"])),
    },
)
response_message = shaped(
    {
        "role": maybe(st.sampled_from(["user", "system", "developer", "assistant", "tool", "wizard"])),
        "content": st.one_of(any_text, st.lists(response_part, max_size=3), json_value),
    },
    {"type": maybe(st.just("message"))},
)
function_call_item = shaped(
    {"type": st.just("function_call"), "call_id": maybe(any_text), "name": maybe(tool_name), "arguments": maybe(any_text)},
    {"id": json_value, "status": json_value},
)
function_call_output_item = shaped(
    {
        "type": st.just("function_call_output"),
        "call_id": maybe(any_text),
        "output": st.one_of(
            any_text,
            st.lists(
                st.fixed_dictionaries({"type": maybe(st.sampled_from(["input_text", "output_text"])), "text": maybe(any_text)})
            ),
            json_value,
        ),
    },
    {"id": json_value, "status": json_value},
)
response_item = st.one_of(response_message, response_message, function_call_item, function_call_output_item, json_value)
plain_input = st.one_of(
    any_text,
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]), "content": any_text}),
        min_size=1,
        max_size=3,
    ),
)
response_tool = shaped(
    {"type": maybe(st.just("function")), "name": maybe(tool_name)},
    {"description": maybe(any_text), "parameters": maybe(json_object), "strict": maybe(st.booleans())},
)
KNOWN = "<a response id the fuzz created>"
"""Stands for an id this app handed out, drawn when the example runs (the strategies are built before any exists)."""
response_id = st.one_of(
    st.just(KNOWN),
    st.just(KNOWN),
    st.text("0123456789abcdef", min_size=1, max_size=70).map(lambda h: "resp_" + h),
    st.sampled_from(["resp_", "resp_XYZ", "chatcmpl-0123", "msg_0123", "resp_%0Aevil", "%00", "..", "resp_" + "0" * 300]),
    st.text(max_size=12).map(lambda t: quote(t, safe="")),
)
responses_body = fuzz_of(
    legal_response_body,
    shaped(
        {"input": st.one_of(plain_input, plain_input, st.lists(response_item, min_size=1, max_size=4), json_value)},
        {
            "model": maybe(any_text),
            "instructions": maybe(any_text),
            "max_output_tokens": maybe(ints),
            "temperature": maybe(floats),
            "top_p": maybe(floats),
            "stream": maybe(st.booleans()),
            "background": maybe(st.booleans()),
            "store": maybe(st.booleans()),
            "metadata": st.one_of(st.dictionaries(any_text, any_text, max_size=3), json_value),
            "previous_response_id": maybe(response_id),
            "tools": st.one_of(st.lists(response_tool, max_size=3), json_value),
            "tool_choice": st.one_of(
                st.sampled_from(["none", "auto", "required"]),
                shaped({"type": maybe(st.just("function")), "name": maybe(tool_name)}, {}),
                json_value,
            ),
            "parallel_tool_calls": maybe(st.booleans()),
            "text": json_value,
            "reasoning": json_value,
            "truncation": json_value,
            "include": json_value,
            "user": json_value,
        },
    ),
)


def with_known_ids(app: AppThread, value: Any, index: int) -> Any:
    """``value`` with every ``KNOWN`` replaced by an id the app handed out (left as is before there is one)."""
    if value == KNOWN:
        return app.known_id("responses", index) or "resp_0"
    if isinstance(value, dict):
        return {k: with_known_ids(app, v, index) for k, v in value.items()}
    return value


@fuzz_settings(250)
@given(body=responses_body, index=st.integers(0, 1000))
def test_response_bodies_never_get_a_5xx(fuzzed: Fuzzed, body: dict[str, Any], index: int) -> None:
    post(fuzzed, "/v1/responses", with_known_ids(fuzzed.app, body, index))


query_value = st.one_of(
    st.sampled_from(["", "true", "false", "1", "0", "-1", "-2", "asc", "desc", "100", "101", "9" * 30, "%00", "%0A", "x"]),
    st.text(max_size=8).map(lambda t: quote(t, safe="")),
)
response_query = st.lists(
    st.tuples(st.sampled_from(["stream", "starting_after", "order", "limit", "after", "include", "x"]), query_value),
    max_size=3,
)
response_route = st.sampled_from(
    [("GET", ""), ("GET", "?stream=true"), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items"), ("GET", "/x")]
    + [("PUT", ""), ("POST", ""), ("GET", "/cancel"), ("POST", "/input_items")]
)


@fuzz_settings(300)
@given(
    seed=st.one_of(st.none(), plain_input),
    background=st.booleans(),
    route=response_route,
    rid=response_id,
    query=response_query,
    index=st.integers(0, 1000),
)
def test_response_routes_by_id_never_get_a_5xx(
    fuzzed: Fuzzed,
    seed: Any,
    background: bool,
    route: tuple[str, str],
    rid: str,
    query: list[tuple[str, str]],
    index: int,
) -> None:
    """Retrieve, cancel, delete, input_items and the event stream (``stream``, ``starting_after``) of
    responses that exist (finished, in the background, deleted) and of ones that never did."""
    app = fuzzed.app
    if seed is not None:  # a fresh one now and then, in the background half the time, so that live ones are hit too
        post(fuzzed, "/v1/responses", {"input": seed, "background": background})
    method, suffix = route
    rid = with_known_ids(app, rid, index)
    separator = "&" if "?" in suffix else "?"
    path = f"/v1/responses/{rid}{suffix}" + (separator + "&".join(f"{k}={v}" for k, v in query) if query else "")
    r = app.request(method, path)
    app.count(fuzzed.test, r.status_code)
    assert_answer_shape(r, path, f"{method} {path}")


# -- /v1/messages ------------------------------------------------------------------

text_block = shaped({"type": maybe(st.just("text")), "text": maybe(any_text)}, {"cache_control": json_value})
image_source = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(st.sampled_from(["base64", "url", "file"])),
        "media_type": maybe(st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp", "text/plain"])),
        "data": maybe(st.sampled_from(["", "iVBORw0KGgo=", "!!", "AAAA"]) | any_text),
        "url": maybe(st.sampled_from(["http://127.0.0.1/x.png", "file:///etc/passwd", ""]) | any_text),
    },
)
content_block = st.fixed_dictionaries(
    {},
    optional={
        "type": maybe(st.sampled_from(["text", "image", "tool_use", "tool_result", "document", "thinking"])),
        "text": maybe(any_text),
        "source": maybe(image_source),
        "id": maybe(st.sampled_from(["toolu_01", "toolu_01A09q90qw90lq917835lq9", "bad id"]) | any_text),
        "name": maybe(tool_name),
        "input": maybe(json_object),
        "tool_use_id": maybe(st.sampled_from(["toolu_01"]) | any_text),
        "content": st.one_of(any_text, st.lists(text_block, max_size=2), json_value),
        "is_error": maybe(st.booleans()),
        "cache_control": json_value,
    },
)
anthropic_message = shaped(
    {
        "role": maybe(st.sampled_from(["user", "assistant", "system", "tool"])),
        "content": st.one_of(any_text, st.lists(content_block, max_size=3), json_value),
    },
    {},
)
plain_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": any_text}), min_size=1, max_size=3
)
anthropic_tool = shaped(
    {"name": maybe(tool_name), "input_schema": maybe(json_object)},
    {"type": maybe(st.just("custom")), "description": maybe(any_text), "cache_control": json_value},
)
prompt_fields = {
    "system": st.one_of(any_text, st.lists(text_block, max_size=2), json_value),
    "tools": st.one_of(st.lists(anthropic_tool, max_size=3), json_value),
    "tool_choice": st.one_of(
        shaped(
            {"type": maybe(st.sampled_from(["auto", "any", "tool", "none"]))},
            {"name": maybe(tool_name), "disable_parallel_tool_use": maybe(st.booleans())},
        ),
        json_value,
    ),
    "thinking": json_value,
}
messages_body = fuzz_of(
    legal_message_body,
    shaped(
        {
            "model": maybe(any_text),
            "max_tokens": maybe(ints),
            "messages": st.one_of(
                plain_messages, plain_messages, st.lists(anthropic_message, min_size=1, max_size=3), json_value
            ),
        },
        {
            **prompt_fields,
            "stop_sequences": st.one_of(st.lists(any_text, max_size=6), json_value),
            "stream": maybe(st.booleans()),
            "temperature": maybe(floats),
            "top_p": maybe(floats),
            "top_k": maybe(ints),
            "metadata": st.one_of(st.fixed_dictionaries({}, optional={"user_id": maybe(any_text)}), json_value),
            "service_tier": json_value,
        },
    ),
)
count_tokens_body = fuzz_of(
    legal_count_tokens_body,
    shaped(
        {
            "model": maybe(any_text),
            "messages": st.one_of(plain_messages, plain_messages, st.lists(anthropic_message, max_size=3), json_value),
        },
        prompt_fields,
    ),
)


@fuzz_settings(250)
@given(body=messages_body)
def test_message_bodies_never_get_a_5xx(fuzzed: Fuzzed, body: dict[str, Any]) -> None:
    post(fuzzed, "/v1/messages", body)


@fuzz_settings(150)
@given(body=count_tokens_body)
def test_count_tokens_bodies_never_get_a_5xx(fuzzed: Fuzzed, body: dict[str, Any]) -> None:
    post(fuzzed, "/v1/messages/count_tokens", body)


@fuzz_settings(100)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"]),
    body=json_value,
)
def test_any_json_on_every_surface_never_gets_a_5xx(fuzzed: Fuzzed, path: str, body: Any) -> None:
    post(fuzzed, path, body)
