"""Named API keys from a file: hashed keys, reloads, per-key limits with OpenAI's rate-limit headers, ownership."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from openai_stream_server.gateway.keys import KeyFileError, KeyRing, hash_key, parse_keys
from openai_stream_server.gateway.ratelimit import duration
from openai_stream_server.settings import Settings
from openai_stream_server.store.record import CompletionRecord, decode, encode
from tests.unit.conftest import make_client

ALICE, BOB, CAROL = "sk-alice-1", "sk-bob-2", "sk-carol-3"


def key_file(tmp_path: Path, *entries: dict[str, object], name: str = "keys.toml") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps({"keys": list(entries)}))
    else:
        lines = []
        for entry in entries:
            lines.append("[[keys]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
        path.write_text("\n".join(lines) + "\n")
    return path


def entry(key: str, name: str, **limits: int) -> dict[str, object]:
    return {"name": name, "key_sha256": hash_key(key), **limits}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


CHAT = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.mark.parametrize("name", ["keys.toml", "keys.json"])
def test_a_key_file_names_keys_by_their_hash_with_limits(tmp_path: Path, name: str) -> None:
    path = key_file(tmp_path, entry(ALICE, "alice", requests_per_minute=5), entry(BOB, "bob"), name=name)
    keys = parse_keys(path.read_text(), str(path))
    assert keys[hash_key(ALICE)].name == "alice" and keys[hash_key(ALICE)].requests_per_minute == 5
    assert keys[hash_key(BOB)].max_concurrent is None
    assert ALICE not in path.read_text()  # the file holds no key in clear


@pytest.mark.parametrize(
    "bad, says",
    [
        pytest.param({"name": "x", "key_sha256": "abc"}, "64 hex", id="short-hash"),
        pytest.param({"key_sha256": hash_key("k")}, "needs a name", id="no-name"),
        pytest.param({**entry("k", "x"), "requests_per_minute": 0}, "requests_per_minute", id="zero-limit"),
        pytest.param({**entry("k", "x"), "tokens_per_minute": "9"}, "tokens_per_minute", id="text-limit"),
        pytest.param({**entry("k", "x"), "tier": "gold"}, "unknown field", id="unknown-field"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_file_and_the_entry(tmp_path: Path, bad: dict[str, object], says: str) -> None:
    path = key_file(tmp_path, entry(ALICE, "alice"), bad)
    with pytest.raises(KeyFileError, match=says) as refused:
        KeyRing(path)
    assert "keys.toml: key 2" in str(refused.value)


def test_the_ring_reads_the_file_again_when_it_changes_or_when_asked_and_keeps_its_keys_on_a_bad_edit(
    tmp_path: Path,
) -> None:
    path = key_file(tmp_path, entry(ALICE, "alice"))
    ring = KeyRing(path)
    assert ring.lookup(ALICE.encode()) is not None and ring.lookup(BOB.encode()) is None
    key_file(tmp_path, entry(BOB, "bob"))
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    ring.maybe_reload(now=1e9)
    assert ring.lookup(BOB.encode()) is not None and ring.lookup(ALICE.encode()) is None
    path.write_text("[[keys]]\nname = \n")  # a half-written edit
    ring.request_reload()
    ring.maybe_reload()
    assert ring.lookup(BOB.encode()) is not None  # the previous keys stay


@pytest.mark.parametrize("seconds, text", [(0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (61.25, "1m1.25s")])
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_a_missing_key_file_stops_the_app_at_start(tmp_path: Path) -> None:
    from openai_stream_server.app import create_app
    from tests.fakes import FakeBackend

    with pytest.raises(KeyFileError, match="nope.toml"):
        create_app(Settings(api_keys_file=str(tmp_path / "nope.toml")), FakeBackend())


async def test_an_unknown_key_gets_401_and_the_single_key_is_one_more_key_named_default(tmp_path: Path) -> None:
    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice"))), api_key="single")
    async with make_client(settings) as (client, _):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth("nope"))).status_code == 401
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
        refused = await client.post("/v1/messages", json={**CHAT, "max_tokens": 5}, headers={"x-api-key": "nope"})
        assert refused.status_code == 401 and refused.json()["type"] == "error"  # Anthropic's shape there
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))).status_code == 200
        made = await client.post("/v1/chat/completions", json=CHAT, headers=auth("single"))
        assert made.status_code == 200
        assert (await client.get("/health")).status_code == 200  # open, as before
        metrics = (await client.get("/metrics", headers=auth(ALICE))).text
        assert 'oss_key_requests_total{key="alice",outcome="ok"}' in metrics
        assert 'oss_key_requests_total{key="",outcome="unauthorized"}' in metrics


async def test_requests_per_minute_answer_429_with_retry_after_and_every_answer_carries_the_headers(tmp_path: Path) -> None:
    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice", requests_per_minute=2), entry(BOB, "bob"))))
    async with make_client(settings) as (client, _):
        first = await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))
        second = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(ALICE))
        third = await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))
        assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second, third)] == ["1", "0", "0"]
        assert third.headers["x-ratelimit-reset-requests"].endswith("s")
        assert int(third.headers["Retry-After"]) >= 1
        error = third.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        # a read is not a new request against the limit, and still says where the key stands
        listing = await client.get(f"/v1/chat/completions/{first.json()['id']}", headers=auth(ALICE))
        assert listing.status_code == 200 and listing.headers["x-ratelimit-remaining-requests"] == "0"
        # another key has its own budget; one with no limits gets no headers
        other = await client.post("/v1/chat/completions", json=CHAT, headers=auth(BOB))
        assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers


async def test_tokens_per_minute_are_charged_when_a_completion_ends(tmp_path: Path) -> None:
    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice", tokens_per_minute=5))))
    async with make_client(settings) as (client, _):
        first = await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))  # 3 + 3 tokens
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "5"
        second = await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))
        assert second.status_code == 429 and second.json()["error"]["type"] == "tokens"
        assert second.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_concurrent_completions_of_a_key_are_bounded(tmp_path: Path) -> None:
    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice", max_concurrent=1), entry(BOB, "bob"))))
    async with make_client(settings) as (client, backend):
        backend.delay_s = 0.05
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE)))
        for _ in range(200):
            if backend.submitted:
                break
            await asyncio.sleep(0.005)
        assert backend.submitted
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["Retry-After"] == "1"
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(BOB))).status_code == 200
        assert (await asyncio.wait_for(first, 10)).status_code == 200
        assert len(backend.submitted) == 2  # the refused one never went downstream
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))).status_code == 200


async def test_a_key_cannot_see_another_keys_completions_on_any_route(tmp_path: Path) -> None:
    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice"), entry(BOB, "bob"))), sweep_interval_s=0.02)
    async with make_client(settings) as (client, _):
        chat_id = (await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))).json()["id"]
        body = {"model": "m", "input": "one two"}
        resp_id = (await client.post("/v1/responses", json=body, headers=auth(ALICE))).json()["id"]
        for method, path, extra in [
            ("GET", f"/v1/chat/completions/{chat_id}", {}),
            ("GET", f"/v1/chat/completions/{chat_id}/stream", {}),
            ("POST", f"/v1/chat/completions/{chat_id}/cancel", {}),
            ("GET", f"/v1/responses/{resp_id}", {}),
            ("GET", f"/v1/responses/{resp_id}?stream=true", {}),
            ("GET", f"/v1/responses/{resp_id}/input_items", {}),
            ("POST", f"/v1/responses/{resp_id}/cancel", {}),
            ("DELETE", f"/v1/responses/{resp_id}", {}),
            ("POST", "/v1/responses", {"json": {**body, "previous_response_id": resp_id}}),
        ]:
            answer = await client.request(method, path, headers=auth(BOB), **extra)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "not_found" and "three" not in answer.text  # as an unknown id
        # the key that made them still can, and the other key's cancel and delete did nothing
        own = await client.get(f"/v1/chat/completions/{chat_id}", headers=auth(ALICE))
        assert own.status_code == 200 and own.json()["choices"][0]["message"]["content"] == "one two three"
        assert (await client.get(f"/v1/responses/{resp_id}", headers=auth(ALICE))).json()["status"] == "completed"
        assert (await client.get(f"/v1/responses/{resp_id}/input_items", headers=auth(ALICE))).status_code == 200
        follow = await client.post("/v1/responses", json={**body, "previous_response_id": resp_id}, headers=auth(ALICE))
        assert follow.status_code == 200
        assert (await client.delete(f"/v1/responses/{resp_id}", headers=auth(ALICE))).status_code == 200


async def test_the_completion_log_line_names_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice"))))
    async with make_client(settings) as (client, _):
        with caplog.at_level("INFO", logger="openai_stream_server.registry"):
            assert (await client.post("/v1/chat/completions", json=CHAT, headers=auth(ALICE))).status_code == 200
    assert any("key='alice'" in r.getMessage() for r in caplog.records)


def test_a_stored_record_keeps_its_owner() -> None:
    record = CompletionRecord(id="chatcmpl-1", surface="chat", model="m", created=1, owner="alice")
    assert decode(encode(record)).owner == "alice"
    assert decode(encode(CompletionRecord(id="c", surface="chat", model="m", created=1))).owner is None


async def test_the_sdks_raise_rate_limit_error_and_not_found_for_another_keys_completion(tmp_path: Path) -> None:
    import anthropic
    import openai

    from tests.unit.test_messages import sdk as claude_sdk

    settings = Settings(api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice", requests_per_minute=1), entry(BOB, "bob"))))
    async with make_client(settings) as (client, _):
        alice = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key=ALICE, http_client=client, max_retries=0)
        bob = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key=BOB, http_client=client, max_retries=0)
        made = await alice.responses.create(model="m", input="one two")
        with pytest.raises(openai.RateLimitError) as limited:
            await alice.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert limited.value.code == "rate_limit_exceeded" and int(limited.value.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await bob.responses.create(model="m", input="more", previous_response_id=made.id)
        claude = claude_sdk(client, ALICE)
        with pytest.raises(anthropic.RateLimitError):
            await claude.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        other = claude_sdk(client, BOB)
        message = await other.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text == "hi"  # type: ignore[union-attr]


async def test_a_page_of_an_allowed_origin_can_read_its_limits(tmp_path: Path) -> None:
    settings = Settings(
        api_keys_file=str(key_file(tmp_path, entry(ALICE, "alice", requests_per_minute=5))), cors_origins=("http://app.test",)
    )
    async with make_client(settings) as (client, _):
        answer = await client.post("/v1/chat/completions", json=CHAT, headers={**auth(ALICE), "Origin": "http://app.test"})
        exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
        assert {"x-ratelimit-remaining-requests", "retry-after"} <= exposed
