"""Admission with a visible queue per model group: the bound (429), places in line, tiers, leaving costs nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from openai_stream_protocol import Heartbeat, last_user_text, parse_request_texts, parse_status
from openai_stream_server.gateway.keys import KeyFileError, hash_key, parse_keys
from openai_stream_server.gateway.queue import AdmissionQueues, QueueFull, effective_tier, parse_max_queued
from openai_stream_server.replicas import Replica
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client
from tests.unit.test_messages import sdk as claude_sdk


@dataclass
class SlotBackend(FakeBackend):
    """A fake replica that said in its hello how many requests it generates at once."""

    capacity: int | None = 1
    replica: Replica = field(init=False)

    def __post_init__(self) -> None:
        self.replica = Replica("echo", "v1/chat/completions/echo", None, frozenset(), frozenset(), capacity=self.capacity)

    def replica_stats(self) -> list[Replica]:
        return [self.replica]


@asynccontextmanager
async def slot_client(
    max_queued: tuple[str, ...] = ("2",), *, delay_s: float = 0.05, capacity: int | None = 1, **settings: object
) -> AsyncIterator[tuple[httpx.AsyncClient, SlotBackend]]:
    backend = SlotBackend(delay_s=delay_s, capacity=capacity)
    async with make_client(Settings(sweep_interval_s=0.02, max_queued=max_queued, **settings), backend) as pair:  # type: ignore[arg-type]
        yield pair  # type: ignore[misc]


BUSY = "a " * 40
"""A request that keeps the one slot for a while (40 tokens): what comes after it, in the test, queues behind it."""


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


async def until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def queue_of(client: httpx.AsyncClient):  # type: ignore[no-untyped-def]
    return client.app.state.dispatcher.queues.queue("")  # type: ignore[attr-defined]


# -- the parts -------------------------------------------------------------------------------------


def test_max_queued_reads_every_group_and_one_group() -> None:
    assert parse_max_queued(("8", "echo=2")) == (8, {"echo": 2})
    with pytest.raises(ValueError, match="max_queued"):
        parse_max_queued(("echo=two",))
    with pytest.raises(ValueError):
        Settings(max_queued=("-1",))


def test_a_tier_is_asked_or_the_keys_default_and_no_better_than_its_maximum() -> None:
    assert effective_tier(None, None, None) == "default"
    assert effective_tier(None, "flex", None) == "flex"
    assert effective_tier("priority", None, "default") == "default"
    assert effective_tier("flex", None, "default") == "flex"


def test_key_file_tiers_and_queue_bound() -> None:
    text = (
        f'[[keys]]\nname = "a"\nkey_sha256 = "{hash_key("k")}"\n'
        'service_tier = "flex"\nmax_service_tier = "default"\nmax_queued = 3\n'
    )
    key = parse_keys(text, "k.toml")[hash_key("k")]
    assert (key.service_tier, key.max_service_tier, key.max_queued) == ("flex", "default", 3)
    with pytest.raises(KeyFileError, match="service_tier"):
        parse_keys(text.replace('"flex"', '"gold"'), "k.toml")


def test_a_hello_says_the_capacity_and_the_echo_node_sends_its_max_concurrent() -> None:
    sent: list[dict[str, object]] = []

    class Out:
        def send_output(self, output_id: str, data: object, metadata: dict[str, object] | None = None) -> None:
            sent.append(dict(metadata or {}))

    Heartbeat(Out(), "echo-1", capacity=4).hello()  # type: ignore[arg-type]
    Heartbeat(Out(), "echo-2").hello()  # type: ignore[arg-type]
    assert [parse_status(m).capacity for m in sent] == [4, None]  # type: ignore[union-attr]


async def test_without_capacity_or_bound_nothing_waits() -> None:
    replica = Replica("r", "out", None, frozenset(), frozenset())  # said no capacity
    for bounds, capacity in ((("1",), None), ((), 1)):
        replica.capacity = capacity
        queues = AdmissionQueues(bounds, dict, lambda: [replica])
        tickets = [queues.enter("m", "default") for _ in range(5)]
        assert all(t.admitted for t in tickets)


async def test_positions_follow_the_queue_and_the_worst_tier_is_shed_for_a_better_one() -> None:
    replica = Replica("r", "out", None, frozenset(), frozenset(), capacity=1)
    queues = AdmissionQueues(("2",), dict, lambda: [replica])
    first = queues.enter("m", "default")
    flex = queues.enter("m", "flex")
    default = queues.enter("m", "default")
    assert first.admitted and (default.position, flex.position) == (1, 2)
    with pytest.raises(QueueFull):
        queues.enter("m", "flex")  # full, and nothing worse to shed
    priority = queues.enter("m", "priority")  # full: the newest flex waiter gives way
    assert flex.shed is not None and (priority.position, default.position) == (1, 2)
    with pytest.raises(QueueFull):
        queues.enter("m", "default")  # full, and only as good or better waiting
    second = queues.enter("m", "priority")  # no flex left: the newest default waiter gives way
    assert default.shed is not None and (priority.position, second.position) == (1, 2)
    first.release()
    assert priority.admitted and second.position == 1
    assert queues.health()["*"]["shed"] == {"priority": 0, "default": 1, "flex": 1}


# -- over HTTP -------------------------------------------------------------------------------------


async def test_over_the_bound_is_429_with_retry_after_and_the_sdks_rate_limit_error() -> None:
    async with slot_client(("1",), delay_s=0.05) as (client, backend):
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY)))
        await until(lambda: len(backend.submitted) == 1)
        waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("b")))
        await until(lambda: len(queue_of(client)) == 1)
        refused = await client.post("/v1/chat/completions", json=chat("c"))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        sdk = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="x", http_client=client, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "d"}])
        claude = claude_sdk(client)
        with pytest.raises(anthropic.RateLimitError) as raised:
            await claude.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "e"}])
        assert raised.value.body["type"] == "error"  # type: ignore[index]  # Anthropic's shape
        assert (await busy).status_code == 200 and (await waiting).status_code == 200
        assert len(backend.submitted) == 2  # the refused ones never went downstream
        health = (await client.get("/health")).json()["queues"]["*"]
        assert health["capacity"] == 1 and health["queued"] == 0 and health["max_queued"] == 1


async def test_priority_overtakes_default_in_a_full_queue_in_the_order_the_node_receives() -> None:
    async with slot_client(("4",), delay_s=0.03) as (client, backend):
        posts = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("first " + BUSY)))]
        await until(lambda: len(backend.submitted) == 1)
        for text, tier in (("d1", "default"), ("f1", "flex"), ("d2", "default"), ("p1", "priority")):
            posts.append(asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(text, service_tier=tier))))
            await until(lambda n=len(posts) - 1: len(queue_of(client)) == n)
        answers = await asyncio.gather(*posts)
        said = [last_user_text(parse_request_texts(r.texts)).split()[0] for r in backend.submitted]
        assert said == ["first", "p1", "d1", "d2", "f1"]
        assert [a.json()["service_tier"] for a in answers] == ["default", "default", "flex", "default", "priority"]
        metrics = (await client.get("/metrics")).text
        assert 'oss_tier_requests_total{key="",model="m",tier="priority"} 1.0' in metrics
        assert 'oss_queue_requests_total{key="",model="*",outcome="queued",tier="flex"} 1.0' in metrics


async def test_a_waiting_stream_learns_its_place_and_the_sdk_still_parses_it() -> None:
    async with slot_client(("4",), delay_s=0.03) as (client, backend):
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY)))
        await until(lambda: len(backend.submitted) == 1)
        raw = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("raw one", stream=True)))
        await until(lambda: len(queue_of(client)) == 1)
        sdk = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="x", http_client=client, max_retries=0)
        stream = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "sdk two"}], stream=True, service_tier="priority"
        )
        chunks = [chunk async for chunk in stream]
        text = (await raw).text
        assert text.startswith(": queued 1\n\n")
        assert "sdk two" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert {c.service_tier for c in chunks} == {"priority"}
        await busy


async def test_a_waiting_responses_stream_gets_response_queued_with_its_position() -> None:
    async with slot_client(("4",), delay_s=0.03) as (client, backend):
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY)))
        await until(lambda: len(backend.submitted) == 1)
        sdk = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="x", http_client=client, max_retries=0)
        events = [e async for e in await sdk.responses.create(model="m", input="hello there", stream=True)]
        queued = [e for e in events if e.type == "response.queued"]
        assert queued and queued[0].model_extra["queue_position"] == 1  # type: ignore[index]
        assert events[-1].type == "response.completed" and events[-1].response.output_text == "hello there"
        assert events[-1].response.service_tier == "default"
        async with sdk.responses.stream(model="m", input="helper too") as helper:  # the SDK's accumulator
            final = await helper.get_final_response()
        assert final.output_text == "helper too"
        await busy


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/completions"])
async def test_a_waiting_messages_or_completions_stream_gets_comment_lines(path: str) -> None:
    async with slot_client(("4",), delay_s=0.03) as (client, backend):
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY)))
        await until(lambda: len(backend.submitted) == 1)
        if path == "/v1/messages":
            message = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi you"}]}
            raw = asyncio.ensure_future(client.post(path, json={**message, "stream": True}))
            await until(lambda: len(queue_of(client)) == 1)
            claude = claude_sdk(client)
            async with claude.messages.stream(**message) as stream:  # type: ignore[arg-type]
                final = await stream.get_final_message()
            assert final.content[0].text == "hi you"  # type: ignore[union-attr]
        else:
            raw = asyncio.ensure_future(client.post(path, json={"model": "m", "prompt": "hi you", "stream": True}))
        text = (await raw).text
        assert text.startswith(": queued 1\n\n") and "you" in text
        await busy


async def test_a_client_that_leaves_the_queue_costs_nothing_downstream() -> None:
    async with slot_client(("4",), delay_s=0.05) as (client, backend):
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY)))
        await until(lambda: len(backend.submitted) == 1)
        dispatcher = client.app.state.dispatcher  # type: ignore[attr-defined]
        ticket = dispatcher.enter("m")
        assert ticket.waiting
        stream = dispatcher.queued_stream(
            ticket, lambda n: b": queued %d\n\n" % n, None, None, request_id="chatcmpl-0", model="m", surface="chat"
        )
        assert await stream.__anext__() == b": queued 1\n\n"
        await stream.aclose()  # the client went
        left = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("never")))
        await until(lambda: len(queue_of(client)) == 1)
        left.cancel()  # a non-streaming client gone while waiting
        await until(lambda: len(queue_of(client)) == 0)
        await busy
        await asyncio.sleep(0.1)
        assert len(backend.submitted) == 1 and not any("never" in t for r in backend.submitted for t in r.texts)
        metrics = (await client.get("/metrics")).text
        assert 'oss_queue_requests_total{key="",model="*",outcome="left",tier="default"} 2.0' in metrics


async def test_a_keys_tiers_and_queue_bound_apply(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "batch"\nkey_sha256 = "{hash_key("sk-b")}"\nservice_tier = "flex"\n'
        f'max_service_tier = "default"\nmax_queued = 1\n'
    )
    async with slot_client((), delay_s=0.03, api_keys_file=str(path)) as (client, backend):
        auth = {"Authorization": "Bearer sk-b"}
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY), headers=auth))
        await until(lambda: len(backend.submitted) == 1)
        waiting = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=chat("w", service_tier="priority"), headers=auth)
        )
        await until(lambda: len(queue_of(client)) == 1)
        refused = await client.post("/v1/chat/completions", json=chat("r"), headers=auth)
        assert refused.status_code == 429 and "retry-after" in refused.headers
        assert (await busy).json()["service_tier"] == "flex"  # the key's default
        assert (await waiting).json()["service_tier"] == "default"  # asked priority, capped at the key's maximum


async def test_a_waiting_background_request_is_answered_at_once_and_its_stream_shows_its_place() -> None:
    async with slot_client(("4",), delay_s=0.03) as (client, backend):
        busy = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(BUSY)))
        await until(lambda: len(backend.submitted) == 1)
        accepted = await client.post("/v1/chat/completions", json=chat("later one", stream=True, background=True))
        assert accepted.status_code == 202
        body = accepted.json()
        assert (body["status"], body["queue_position"]) == ("queued", 1)
        stream = (await client.get(body["stream_url"])).text
        assert stream.startswith('event: queued\ndata: {"queue_position":1}\n\n') and stream.endswith("data: [DONE]\n\n")
        assert '"content":" one"' in stream and '"service_tier":"default"' in stream
        dropped = (await client.post("/v1/chat/completions", json=chat("never", background=True))).json()
        assert dropped["status"] == "queued"
        cancelled = await client.post(f"/v1/chat/completions/{dropped['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        await busy
        await asyncio.sleep(0.1)
        assert not any("never" in t for r in backend.submitted for t in r.texts)  # it never went downstream
        assert (await client.get(f"/v1/chat/completions/{dropped['id']}")).json()["status"] == "cancelled"
