"""Fuzz: large but legal bodies on every surface are answered in full, not refused, truncated or a 5xx.

Legal means what a client may send under the default limits: many messages (up to 100,000),
long texts (up to 3 MB), many tools with long descriptions (up to 300 x 2 KB), the whole body
under ``max_body_bytes`` (8 MB). Hypothesis picks the sizes; the explicit ``@example`` rows pin the
largest ones, which a run would otherwise seldom draw. The content is generated from the sizes
(hypothesis would spend its time building megabytes of random text), and the last user turn is
short, so that the echo answer is small and exact: a body cut or misread anywhere shows as a
wrong answer or a wrong token count. Every test ends by checking that the app still serves
(``assert_still_serves``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from openai_stream_protocol import split_tokens
from tests.fuzzing import AppThread, Fuzzed, assert_still_serves, fuzz_settings

pytestmark = pytest.mark.timeout(300)

MAX_BODY_BYTES = 8 * 1024 * 1024  # the documented default of --max-body-bytes: what a client may count on
EXAMPLES = 6  # per surface, on top of the explicit largest ones: each example sends megabytes
MAX_TOKENS = 8
LAST = "and now the last question of this long conversation, in a dozen words"  # 13 tokens: the answer is cut

messages_count = st.one_of(st.integers(1, 2_000), st.sampled_from([20_000, 100_000]))
text_bytes = st.one_of(st.integers(0, 200_000), st.sampled_from([1_000_000, 3_000_000]))
tools_count = st.one_of(st.integers(0, 50), st.sampled_from([300]))
description_bytes = st.integers(0, 2_000)


@pytest.fixture(scope="module")
def app_thread() -> Iterator[AppThread]:
    with AppThread() as app:
        yield app
        print("\n" + app.summary())


@pytest.fixture
def fuzzed(app_thread: AppThread, request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    yield Fuzzed(app_thread, request.node.name)
    assert_still_serves(app_thread, request.node.name)


def long_text(size: int) -> str:
    """``size`` bytes of words (ASCII, with a non-ASCII word now and then), deterministic."""
    words = " ".join(f"w{i}é" if i % 7 == 0 else f"w{i}" for i in range(size // 4 + 1))
    return words[:size]


def turns(count: int, text: str) -> list[tuple[str, str]]:
    """``count`` alternating turns (user first), the long text in the first, then the short last question."""
    out = [("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(count)]
    if out:
        out[0] = ("user", text or "turn 0")
    if not out or out[-1][0] == "user":
        out.append(("assistant", "ok"))
    return [*out, ("user", LAST)]


def words(texts: list[str]) -> int:
    return sum(len(split_tokens(t)) for t in texts)


def schema(description_size: int) -> dict[str, Any]:
    return {
        "type": "object",
        "description": long_text(description_size),
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    }


def send(fuzzed: Fuzzed, path: str, body: dict[str, Any]) -> dict[str, Any]:
    content = json.dumps(body).encode()
    # Legal only: sizes drawn together can pass the limit (100,000 messages + 3 MB + 300 long tools); such a
    # draw is not an example of this test (the limit's own 413 is tested elsewhere).
    assume(len(content) <= MAX_BODY_BYTES)
    r = fuzzed.post(path, content)
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]} for {len(content)} bytes on {path}"
    return r.json()  # type: ignore[no-any-return]


def expected_answer(text: str) -> str:
    return "".join(split_tokens(text)[:MAX_TOKENS])


@fuzz_settings(EXAMPLES)
@given(messages=messages_count, size=text_bytes, tools=tools_count, description=description_bytes)
@example(messages=100_000, size=1_000, tools=0, description=0)
@example(messages=2, size=3_000_000, tools=300, description=2_000)
def test_large_chat_bodies_are_answered(fuzzed: Fuzzed, messages: int, size: int, tools: int, description: int) -> None:
    conversation = turns(messages, long_text(size))
    body = {
        "messages": [{"role": role, "content": text} for role, text in conversation],
        "max_tokens": MAX_TOKENS,
        "tools": [
            {"type": "function", "function": {"name": f"tool_{i}", "description": "d", "parameters": schema(description)}}
            for i in range(tools)
        ],
    }
    answer = send(fuzzed, "/v1/chat/completions", body)
    assert answer["choices"][0]["message"]["content"] == expected_answer(LAST)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] >= words([text for _, text in conversation])


@fuzz_settings(EXAMPLES)
@given(size=text_bytes)
@example(size=3_000_000)
def test_large_completion_prompts_are_answered(fuzzed: Fuzzed, size: int) -> None:
    prompt = long_text(size) + " " + LAST
    answer = send(fuzzed, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS})
    assert answer["choices"][0]["text"] == expected_answer(prompt)
    assert answer["usage"]["prompt_tokens"] == words([prompt])


@fuzz_settings(EXAMPLES)
@given(messages=messages_count, size=text_bytes, tools=tools_count, description=description_bytes, store=st.booleans())
@example(messages=100_000, size=1_000, tools=0, description=0, store=True)
@example(messages=2, size=3_000_000, tools=300, description=2_000, store=True)
def test_large_response_bodies_are_answered(
    fuzzed: Fuzzed, messages: int, size: int, tools: int, description: int, store: bool
) -> None:
    conversation = turns(messages, "")
    body = {
        "input": [{"role": role, "content": text} for role, text in conversation],
        "instructions": long_text(size),
        "max_output_tokens": MAX_TOKENS,
        "store": store,
        "tools": [{"type": "function", "name": f"tool_{i}", "parameters": schema(description)} for i in range(tools)],
    }
    answer = send(fuzzed, "/v1/responses", body)
    assert answer["output"][0]["content"][0]["text"] == expected_answer(LAST)
    assert answer["usage"]["input_tokens"] >= words([text for _, text in conversation] + [body["instructions"]])
    if store:  # kept, and read back whole
        items = fuzzed.app.request("GET", f"/v1/responses/{answer['id']}/input_items?limit=1&order=asc")
        assert items.status_code == 200 and items.json()["data"][0]["content"][0]["text"] == conversation[0][1]


def anthropic_body(messages: int, size: int, tools: int, description: int) -> tuple[dict[str, Any], list[str]]:
    conversation = turns(messages, "")
    system = long_text(size)
    body = {
        "model": "m",
        "system": system,
        "messages": [{"role": role, "content": text} for role, text in conversation],
        "tools": [{"name": f"tool_{i}", "input_schema": schema(description)} for i in range(tools)],
    }
    return body, [text for _, text in conversation] + [system]


@fuzz_settings(EXAMPLES)
@given(messages=messages_count, size=text_bytes, tools=tools_count, description=description_bytes)
@example(messages=100_000, size=1_000, tools=0, description=0)
@example(messages=2, size=3_000_000, tools=300, description=2_000)
def test_large_message_bodies_are_answered(fuzzed: Fuzzed, messages: int, size: int, tools: int, description: int) -> None:
    body, texts = anthropic_body(messages, size, tools, description)
    answer = send(fuzzed, "/v1/messages", {**body, "max_tokens": MAX_TOKENS})
    assert answer["content"][0]["text"] == expected_answer(LAST) and answer["stop_reason"] == "max_tokens"
    assert answer["usage"]["input_tokens"] >= words(texts)


@fuzz_settings(EXAMPLES)
@given(messages=messages_count, size=text_bytes, tools=tools_count, description=description_bytes)
@example(messages=100_000, size=1_000, tools=0, description=0)
@example(messages=2, size=3_000_000, tools=300, description=2_000)
def test_large_count_tokens_bodies_are_counted(fuzzed: Fuzzed, messages: int, size: int, tools: int, description: int) -> None:
    body, texts = anthropic_body(messages, size, tools, description)
    counted = send(fuzzed, "/v1/messages/count_tokens", body)["input_tokens"]
    assert counted >= words(texts) + (tools > 0)  # the tools' JSON counts too
