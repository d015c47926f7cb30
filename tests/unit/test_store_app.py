"""The app with ``--store sqlite`` (and Redis) end to end over ASGI, the fake backend answering.

A second app on the same file stands for the server after a restart: what the first answered is
read back exactly, by every route that reads by id (docs/store.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.redis_server import RedisServer, running_redis
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(60)

PROMPT = "Stream me back,  word by word:\n exactly as  sent. "


async def _completed(body: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
    value = await body
    return value if value["status"] == "completed" else None


def sqlite(path: Path, **kwargs: object) -> Settings:
    return Settings(sweep_interval_s=0.02, store=f"sqlite://{path}", **kwargs)  # type: ignore[arg-type]


async def test_a_restarted_app_reads_back_what_the_first_answered(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with make_client(sqlite(db)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": PROMPT}]})
        chat_id = r.json()["id"]
        replay = (await client.get(f"/v1/chat/completions/{chat_id}/stream")).text
        tail = (await client.get(f"/v1/chat/completions/{chat_id}/stream", headers={"Last-Event-ID": "3"})).text
        r = await client.post("/v1/responses", json={"model": "m", "input": PROMPT, "instructions": "be brief"})
        response = r.json()
        items = (await client.get(f"/v1/responses/{response['id']}/input_items")).json()
        r = await client.post("/v1/responses", json={"model": "m", "input": "not kept", "store": False})
        unstored = r.json()["id"]

    async with make_client(sqlite(db)) as (client, _):
        got = await client.get(f"/v1/chat/completions/{chat_id}")
        assert got.status_code == 200 and got.json()["choices"][0]["message"]["content"] == PROMPT
        assert (await client.get(f"/v1/chat/completions/{chat_id}/stream")).text == replay
        resumed = await client.get(f"/v1/chat/completions/{chat_id}/stream", headers={"Last-Event-ID": "3"})
        assert resumed.text == tail and "Stream" not in tail  # resumed after piece 3, as the first app did
        again = (await client.get(f"/v1/responses/{response['id']}")).json()
        assert again == response
        assert (await client.get(f"/v1/responses/{response['id']}/input_items")).json() == items
        r = await client.post("/v1/responses", json={"model": "m", "input": "more", "previous_response_id": response["id"]})
        assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "more"
        assert (await client.get(f"/v1/responses/{unstored}")).status_code == 404  # store: false is never written
        assert (await client.delete(f"/v1/responses/{response['id']}")).status_code == 200
        assert (await client.get(f"/v1/responses/{response['id']}")).status_code == 404  # at once, before the flush

    async with make_client(sqlite(db)) as (client, _):
        assert (await client.get(f"/v1/responses/{response['id']}")).status_code == 404
        health = (await client.get("/health")).json()
        assert health["store"] == {"backend": "sqlite", "ok": True} and health["status"] == "ok"
        metrics = (await client.get("/metrics")).text
        assert "oss_store_records_written_total" in metrics


async def test_a_completion_cut_by_the_stop_reads_back_failed(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with make_client(sqlite(db), FakeBackend(silent=True)) as (client, _):
        r = await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "background": True}
        )
        request_id = r.json()["id"]
    async with make_client(sqlite(db)) as (client, _):
        body = (await client.get(f"/v1/chat/completions/{request_id}")).json()
        assert body["status"] == "failed" and body["error"]["message"] == "the server is shutting down"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def test_with_redis_another_app_reads_and_health_names_a_lost_redis(redis_server: RedisServer) -> None:
    settings = Settings(sweep_interval_s=0.02, store=redis_server.url)
    async with make_client(settings) as (a, _), make_client(settings) as (b, _):
        r = await a.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": PROMPT}]})
        chat_id = r.json()["id"]

        async def read_on_b() -> dict[str, Any]:  # A writes its final record a moment after it answered
            got = await b.get(f"/v1/chat/completions/{chat_id}")
            assert got.status_code == 200
            body: dict[str, Any] = got.json()
            return body

        body = await wait_until_async(lambda: _completed(read_on_b()), 5, what="B to read A's completion")
        assert body["choices"][0]["message"]["content"] == PROMPT
        redis_server.kill()
        r = await b.get("/v1/chat/completions/chatcmpl-" + "0" * 24)  # not in B's memory: only Redis could answer
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        async def degraded() -> dict[str, Any] | None:  # A notices when its control channel drops
            health: dict[str, Any] = (await a.get("/health")).json()
            return health if health["status"] == "degraded" else None

        health = await wait_until_async(degraded, 5, what="A's /health to say degraded")
        assert f"127.0.0.1:{redis_server.port}" in health["store"]["problem"]
        r = await a.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "still"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "still"  # served from memory
        redis_server.start()
