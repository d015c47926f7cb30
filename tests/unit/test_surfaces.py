"""The surface table (``api/surfaces.py``) is the one place that says what a surface is: the request
counter's labels, the guard's and the API key's error shape, ids and by-id lookups all come from it."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from openai_stream_server.api import surfaces
from openai_stream_server.api.surfaces import ANTHROPIC_ERRORS, OPENAI_ERRORS, SURFACES, SurfaceSpec, error_shape, surface_of
from openai_stream_server.settings import Settings
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(30)

BY_NAME = {spec.name: spec for spec in SURFACES}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def is_anthropic(body: dict[str, Any]) -> bool:
    return body.get("type") == "error" and "type" in body["error"] and "param" not in body["error"]


@pytest.mark.parametrize(
    "path, name",
    [
        pytest.param("/v1/chat/completions", "chat", id="chat"),
        pytest.param("/v1/chat/completions/chatcmpl-1/stream", "chat", id="chat-by-id"),
        pytest.param("/v1/completions", "completions", id="completions"),
        pytest.param("/v1/responses/resp_1/input_items", "responses", id="responses-by-id"),
        pytest.param("/v1/messages/count_tokens", "messages", id="messages-count-tokens"),
        pytest.param("/v1/chat/completionsX", None, id="prefix-is-not-enough"),
        pytest.param("/v1/models", None, id="models"),
        pytest.param("/health", None, id="health"),
    ],
)
def test_surface_of_a_path(path: str, name: str | None) -> None:
    spec = surface_of(path)
    assert (spec.name if spec else None) == name
    assert error_shape(path) is (spec.errors if spec else OPENAI_ERRORS)


def test_names_prefixes_and_id_prefixes_are_distinct() -> None:
    for attribute in ("name", "prefix", "id_prefix"):
        values = [getattr(spec, attribute) for spec in SURFACES]
        assert len(set(values)) == len(values), attribute
    assert [spec.name for spec in SURFACES if spec.errors is ANTHROPIC_ERRORS] == ["messages"]


@pytest.mark.parametrize("spec", SURFACES, ids=lambda spec: spec.name)
def test_new_ids_are_valid_ids_of_their_own_surface_only(spec: SurfaceSpec) -> None:
    made = spec.new_id()
    assert made.startswith(spec.id_prefix) and len(made) == len(spec.id_prefix) + 2 * spec.id_bytes
    assert spec.valid_id(made) == made
    assert [other.name for other in SURFACES if other.valid_id(made)] == [spec.name]
    for bad in (made + "\n", made.upper(), spec.id_prefix, spec.id_prefix + "é", "x" + made):
        assert spec.valid_id(bad) is None, bad


async def test_request_counter_labels_each_surface_by_the_table() -> None:
    async with make_client() as (client, _):
        await client.post("/v1/chat/completions", json={"messages": []})
        await client.post("/v1/completions", json={})
        await client.post("/v1/responses", json={})
        await client.post("/v1/messages", json={})
        await client.get("/v1/models")
        text = (await client.get("/metrics")).text
    for spec in SURFACES:
        assert metric(text, f'oss_requests_total{{status="400",surface="{spec.name}"}}') == 1, spec.name
    assert "/v1/models" not in text and 'surface="models"' not in text


async def test_request_counter_and_guard_consult_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A surface renamed, and given Anthropic's errors, in the table alone: the label and the guard's refusal follow."""
    chat = dataclasses.replace(BY_NAME["chat"], name="chat-renamed", errors=ANTHROPIC_ERRORS)
    monkeypatch.setattr(surfaces, "SURFACES", tuple(chat if spec.name == "chat" else spec for spec in SURFACES))
    async with make_client() as (client, _):
        refused = await client.post("/v1/chat/completions", json={}, headers={"host": "evil.example"})
        text = (await client.get("/metrics")).text
    assert refused.status_code == 421 and is_anthropic(refused.json()), refused.text
    assert metric(text, 'oss_requests_total{status="421",surface="chat-renamed"}') == 1


@pytest.mark.parametrize("spec", SURFACES, ids=lambda spec: spec.name)
async def test_guard_refusals_take_the_shape_of_the_surface(spec: SurfaceSpec) -> None:
    async with make_client() as (client, _):
        r = await client.post(spec.prefix, content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    body = r.json()
    if spec.errors is ANTHROPIC_ERRORS:
        assert is_anthropic(body) and body["error"]["message"].startswith("Content-Type: "), body
    else:
        assert body["error"]["param"] == "Content-Type" and body["error"]["code"] == "unsupported_media_type", body


@pytest.mark.parametrize("spec", SURFACES, ids=lambda spec: spec.name)
async def test_api_key_refusal_says_how_to_send_the_key_in_the_surface_shape(spec: SurfaceSpec) -> None:
    async with make_client(Settings(api_key="k", sweep_interval_s=0.02)) as (client, _):
        r = await client.post(spec.prefix, json={})
    assert r.status_code == 401
    body = r.json()
    assert spec.errors.key_hint in body["error"]["message"]
    assert is_anthropic(body) == (spec.errors is ANTHROPIC_ERRORS)


@pytest.mark.parametrize(
    "path, spec_name",
    [
        pytest.param("/v1/chat/completions/{id}", "chat", id="chat-retrieve"),
        pytest.param("/v1/chat/completions/{id}/stream", "chat", id="chat-stream"),
        pytest.param("/v1/responses/{id}", "responses", id="responses-retrieve"),
        pytest.param("/v1/responses/{id}/input_items", "responses", id="responses-input-items"),
    ],
)
async def test_a_by_id_route_finds_only_its_own_surfaces_ids(path: str, spec_name: str) -> None:
    """Another surface's id (of a completion that exists) is a 404 naming the surface's id param, with no
    ``X-Request-Id``; an id this surface could have made gets the header back."""
    spec = BY_NAME[spec_name]
    async with make_client() as (client, _):
        other = await client.post("/v1/completions", json={"prompt": "a b"})
        assert other.status_code == 200
        foreign = await client.get(path.format(id=other.json()["id"]))
        unknown_id = spec.new_id()
        unknown = await client.get(path.format(id=unknown_id))
    for r in (foreign, unknown):
        assert r.status_code == 404 and r.json()["error"]["param"] == spec.id_param
        assert re.search(f"No {spec.noun} with id", r.json()["error"]["message"])
    assert "x-request-id" not in foreign.headers
    assert unknown.headers["x-request-id"] == unknown_id
