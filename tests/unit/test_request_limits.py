"""What one request may ask of the nodes, on every surface: stop strings (``schema.MAX_STOP_STRINGS`` of at most
``schema.MAX_STOP_CHARS``) and image parts (``--max-images-per-request``); past either, a 400 naming the field and
nothing sent downstream (docs/architecture.md, "Limits")."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from openai_stream_server.schema import MAX_STOP_CHARS, MAX_STOP_STRINGS
from openai_stream_server.settings import Settings, load_settings
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(30)

LONG = "x" * (MAX_STOP_CHARS + 1)
FULL = "y" * MAX_STOP_CHARS
IMAGE = "data:image/png;base64,iVBORw0KGgo="
MSG = [{"role": "user", "content": "a b"}]
ANTHROPIC = {"model": "m", "max_tokens": 8, "messages": MSG}


def param_of(r: httpx.Response) -> str:
    """The field an error names: OpenAI's ``param``, or the field Anthropic's message leads with."""
    body = r.json()
    if body.get("type") == "error":
        return str(body["error"]["message"].split(":")[0])
    return str(body["error"]["param"])


# -- stop strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        pytest.param("/v1/chat/completions", {"messages": MSG, "stop": ["a"] * 5}, "stop", id="chat-five"),
        pytest.param("/v1/chat/completions", {"messages": MSG, "stop": LONG}, "stop", id="chat-long-string"),
        pytest.param("/v1/chat/completions", {"messages": MSG, "stop": ["a", "b", "c", LONG]}, "stop[3]", id="chat-long-item"),
        pytest.param("/v1/completions", {"prompt": "a b", "stop": ["a"] * 5}, "stop", id="completions-five"),
        pytest.param("/v1/completions", {"prompt": "a b", "stop": LONG}, "stop", id="completions-long-string"),
        pytest.param("/v1/completions", {"prompt": "a b", "stop": ["a", LONG]}, "stop[1]", id="completions-long-item"),
        pytest.param(
            "/v1/messages",
            {**ANTHROPIC, "stop_sequences": ["s"] * (MAX_STOP_STRINGS + 1)},
            "stop_sequences",
            id="messages-too-many",
        ),
        pytest.param(
            "/v1/messages", {**ANTHROPIC, "stop_sequences": ["a", "b", "c", LONG]}, "stop_sequences.3", id="messages-long-item"
        ),
    ],
)
async def test_stop_strings_past_the_cap_are_400_naming_the_field(path: str, body: dict[str, Any], param: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert param_of(r) == param, r.text
    assert backend.submitted == []


@pytest.mark.parametrize(
    "path, body, sent",
    [
        pytest.param("/v1/chat/completions", {"messages": MSG, "stop": FULL}, [FULL], id="chat-one-string"),
        pytest.param("/v1/chat/completions", {"messages": MSG, "stop": [FULL] * 4}, [FULL] * 4, id="chat-four"),
        pytest.param("/v1/completions", {"prompt": "a b", "stop": ["p", FULL]}, ["p", FULL], id="completions-list"),
        pytest.param(
            "/v1/messages",
            {**ANTHROPIC, "stop_sequences": [FULL] * MAX_STOP_STRINGS},
            [FULL] * MAX_STOP_STRINGS,
            id="messages-at-the-cap",
        ),
    ],
)
async def test_stop_strings_at_the_cap_reach_the_node_as_a_list(path: str, body: dict[str, Any], sent: list[str]) -> None:
    async with make_client() as (client, backend):
        r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert backend.submitted[0].metadata["stop"] == sent


# -- images --------------------------------------------------------------------------------------


def chat_body(images: int) -> dict[str, Any]:
    """Text first, then ``images`` image parts over two user messages (one assistant turn between)."""
    first = [{"type": "text", "text": "look"}] + [{"type": "image_url", "image_url": {"url": IMAGE}}] * min(images, 2)
    rest = [{"type": "image_url", "image_url": {"url": IMAGE}}] * max(images - 2, 0)
    return {
        "messages": [
            {"role": "user", "content": first},
            {"role": "assistant", "content": "seen"},
            {"role": "user", "content": [{"type": "text", "text": "and"}, *rest]},
        ]
    }


def responses_body(images: int) -> dict[str, Any]:
    parts = [{"type": "input_text", "text": "look"}] + [{"type": "input_image", "image_url": IMAGE}] * images
    return {"input": [{"role": "user", "content": "hello"}, {"role": "user", "content": parts}]}


def messages_body(images: int) -> dict[str, Any]:
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    return {**ANTHROPIC, "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, *[block] * images]}]}


@pytest.mark.parametrize(
    "path, body, most, param",
    [
        pytest.param("/v1/chat/completions", chat_body(17), 16, "messages[2].content[15]", id="chat-default"),
        pytest.param("/v1/chat/completions", chat_body(3), 2, "messages[2].content[1]", id="chat-2"),
        pytest.param("/v1/chat/completions", chat_body(2), 1, "messages[0].content[2]", id="chat-1"),
        pytest.param("/v1/responses", responses_body(17), 16, "input[1].content[17]", id="responses-default"),
        pytest.param("/v1/responses", responses_body(3), 2, "input[1].content[3]", id="responses-2"),
        pytest.param("/v1/messages", messages_body(17), 16, "messages.0.content.17", id="messages-default"),
        pytest.param("/v1/messages", messages_body(3), 2, "messages.0.content.3", id="messages-2"),
    ],
)
async def test_an_image_past_the_cap_is_400_naming_it(path: str, body: dict[str, Any], most: int, param: str) -> None:
    settings = Settings(sweep_interval_s=0.02, max_images_per_request=most)
    async with make_client(settings) as (client, backend):
        r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert param_of(r) == param, r.text
    assert backend.submitted == []


@pytest.mark.parametrize(
    "path, body, most",
    [
        pytest.param("/v1/chat/completions", chat_body(16), 16, id="chat-at-the-cap"),
        pytest.param("/v1/responses", responses_body(16), 16, id="responses-at-the-cap"),
        pytest.param("/v1/messages", messages_body(16), 16, id="messages-at-the-cap"),
        pytest.param("/v1/chat/completions", chat_body(40), 0, id="zero-is-no-cap"),
    ],
)
async def test_images_up_to_the_cap_go_downstream(path: str, body: dict[str, Any], most: int) -> None:
    settings = Settings(sweep_interval_s=0.02, max_images_per_request=most)
    async with make_client(settings) as (client, backend):
        r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    images = sum(text.startswith("<|user|>\n<|vision_start|>") for text in backend.submitted[0].texts)
    assert images == sum(1 for _ in _images(body))


def _images(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages") or body.get("input") or []
    return [
        part
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] in ("image_url", "input_image", "image")
    ]


async def test_images_a_previous_response_carries_over_count_first() -> None:
    """The conversation ``previous_response_id`` continues goes downstream again, its images with it."""
    settings = Settings(sweep_interval_s=0.02, max_images_per_request=3)
    async with make_client(settings) as (client, backend):
        first = await client.post("/v1/responses", json=responses_body(2))
        assert first.status_code == 200, first.text
        fits = await client.post("/v1/responses", json={**responses_body(1), "previous_response_id": first.json()["id"]})
        over = await client.post("/v1/responses", json={**responses_body(2), "previous_response_id": first.json()["id"]})
    assert fits.status_code == 200, fits.text
    assert over.status_code == 400 and over.json()["error"]["param"] == "input[1].content[2]", over.text
    assert len(backend.submitted) == 2


def test_the_image_cap_is_a_setting_flag_and_variable() -> None:
    assert Settings().max_images_per_request == 16
    assert load_settings(["--max-images-per-request", "3"], {}).max_images_per_request == 3
    assert load_settings([], {"OPENAI_STREAM_SERVER_MAX_IMAGES_PER_REQUEST": "5"}).max_images_per_request == 5
    with pytest.raises(SystemExit):
        load_settings(["--max-images-per-request", "-1"], {})
