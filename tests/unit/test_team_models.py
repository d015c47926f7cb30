"""Models by name: the groups the replicas' hellos name, aliases, 404 model_not_found in each API's shape, routing."""

from __future__ import annotations

from dataclasses import dataclass

import anthropic
import openai
import pyarrow as pa
import pytest

from openai_stream_protocol import MODELS_KEY, Heartbeat, parse_status
from openai_stream_server.errors import ModelNotFound
from openai_stream_server.gateway.models import ModelCatalog, parse_aliases
from openai_stream_server.replicas import Replica, ReplicaSet
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client
from tests.unit.test_messages import sdk as claude_sdk


def replica(name: str, *models: str, live: bool = True) -> Replica:
    r = Replica(name, f"v1/chat/completions/{name}", None, frozenset({f"{name}/chunks"}), frozenset({name}))
    r.models, r.live = tuple(models), live
    return r


@dataclass
class GroupedBackend(FakeBackend):
    """The fake echo, with replicas that named their models (routing itself is the bridge's: tested below)."""

    groups: tuple[Replica, ...] = ()

    def replica_stats(self) -> list[Replica]:
        return list(self.groups)


TWO = (replica("echo-a", "echo"), replica("echo-b", "echo", live=False), replica("slow", "slow-echo"))


@pytest.mark.parametrize(
    "replicas, settings, requested, expected",
    [
        pytest.param((), Settings(), "anything", "anything", id="no-group-any-name"),
        pytest.param((), Settings(), None, "dora-stream", id="no-group-default"),
        pytest.param((), Settings(models=("a",)), "b", 404, id="no-group-listed-names"),
        pytest.param((), Settings(strict_models=True), "b", 404, id="no-group-strict"),
        pytest.param((), Settings(strict_models=True), "dora-stream", "dora-stream", id="no-group-strict-default"),
        pytest.param(TWO[:1], Settings(), "gpt-4o", "gpt-4o", id="one-group-any-name"),
        pytest.param(TWO[:1], Settings(strict_models=True), "gpt-4o", 404, id="one-group-strict"),
        pytest.param(TWO, Settings(), "slow-echo", "slow-echo", id="two-groups-known"),
        pytest.param(TWO, Settings(), "gpt-4o", 404, id="two-groups-unknown"),
        pytest.param(TWO, Settings(model_alias=("gpt-4o=slow-echo",)), "gpt-4o", "slow-echo", id="alias"),
        pytest.param(TWO, Settings(model_alias=("gpt-4o=nothing",)), "gpt-4o", 404, id="alias-to-nothing"),
    ],
)
def test_which_model_a_request_gets(
    replicas: tuple[Replica, ...], settings: Settings, requested: str | None, expected: str | int
) -> None:
    catalog = ModelCatalog(settings, lambda: replicas)
    if expected == 404:
        with pytest.raises(ModelNotFound):
            catalog.resolve(requested)
    else:
        assert catalog.resolve(requested) == expected


@pytest.mark.parametrize("bad", ["gpt-4o", "=x", "x=", "x=x"])
def test_a_bad_alias_stops_the_server_at_start(bad: str) -> None:
    with pytest.raises(ValueError, match="ALIAS=MODEL"):
        Settings(model_alias=(bad,))
    assert parse_aliases(["a = b"]) == {"a": "b"}


def test_a_request_goes_only_to_its_model_groups_replicas() -> None:
    replicas = ReplicaSet([replica("echo-a", "echo"), replica("slow", "slow-echo"), replica("echo-b", "echo")])
    picked = [replicas.pick(skip=replicas.outside_group("echo")) for _ in range(4)]
    assert {r.replica_id for r in picked if r} == {"echo-a", "echo-b"}
    assert replicas.pick(skip=replicas.outside_group("slow-echo")).replica_id == "slow"  # type: ignore[union-attr]
    assert replicas.outside_group("unnamed") == set()  # one group, any name: every replica


def test_the_hello_and_heartbeats_carry_the_models() -> None:
    sent: list[dict[str, object]] = []

    class Node:
        def send_output(self, output: str, data: pa.Array, metadata: dict[str, object]) -> None:
            sent.append(metadata)

    beat = Heartbeat(Node(), "echo-a", "chunks", models=("echo", "echo-large"))
    beat.hello()
    beat.beat(1)
    assert [parse_status(m).models for m in sent] == [("echo", "echo-large")] * 2  # type: ignore[union-attr]
    assert parse_status({"hello": "x", MODELS_KEY: "a, b,,a"}).models == ("a", "b")  # type: ignore[union-attr]
    assert parse_status({"hello": "x", MODELS_KEY: 3}).models == ()  # type: ignore[union-attr]


async def test_the_api_lists_the_groups_and_refuses_an_unknown_name_in_each_apis_shape() -> None:
    settings = Settings(model_alias=("gpt-4o=slow-echo",), sweep_interval_s=0.02)
    async with make_client(settings, GroupedBackend(groups=TWO)) as (client, backend):
        listing = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m.get("replicas"), m.get("live_replicas"), m.get("alias_of")) for m in listing] == [
            ("echo", 2, 1, None),
            ("slow-echo", 1, 1, None),
            ("gpt-4o", None, None, "slow-echo"),
        ]
        assert all(m["owned_by"] == "dora" for m in listing)
        assert (await client.get("/health")).json()["models"] == {
            "echo": {"replicas": 2, "live": 1},
            "slow-echo": {"replicas": 1, "live": 1},
        }
        assert (await client.get("/v1/models/nothing")).status_code == 404
        assert (await client.get("/v1/models/gpt-4o")).json()["alias_of"] == "slow-echo"

        chat = await client.post(
            "/v1/chat/completions", json={"model": "nothing", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
        assert chat.json()["error"]["param"] == "model"
        message = await client.post(
            "/v1/messages", json={"model": "nothing", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert message.status_code == 404 and message.json()["error"]["type"] == "not_found_error"
        assert backend.submitted == []

        sdk = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="nothing", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(anthropic.NotFoundError):
            await claude_sdk(client).messages.create(model="nothing", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        aliased = await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert aliased.model == "slow-echo" and backend.submitted[-1].metadata["model"] == "slow-echo"
        assert (await sdk.responses.create(model="echo", input="hi")).model == "echo"


async def test_with_no_group_the_models_listing_is_as_before() -> None:
    async with make_client(Settings(models=("a", "b"))) as (client, _):
        listing = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listing] == ["a", "b"] and "replicas" not in listing[0]
        assert (await client.get("/v1/models/c")).json()["error"]["code"] == "model_not_found"
        assert (await client.get("/v1/models/a")).json()["id"] == "a"


async def test_the_bridge_routes_by_the_models_the_hellos_name_and_fails_over_within_the_group() -> None:
    from openai_stream_protocol.testing import wait_until_async
    from tests.unit.test_replicas import ReplicaNode, app_over, replica_config

    node = ReplicaNode(replica_config(("a", "b", "c")))

    def hello(name: str, model: str) -> dict[str, object]:
        metadata = {"hello": name, MODELS_KEY: [model]}
        return {"type": "INPUT", "id": f"chunks/{name}", "value": pa.array([], type=pa.string()), "metadata": metadata}

    async with app_over(node) as (client, _, bridge):
        node.push(hello("a", "echo"), hello("b", "slow-echo"), hello("c", "echo"))
        await wait_until_async(lambda: bridge.replicas.by_id["c"].models == ("echo",))

        async def ask(model: str) -> str:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "background": True}
            answer = await client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 202, answer.text
            return str(answer.json()["id"])

        ids = {await ask("slow-echo") for _ in range(3)} | {await ask("echo") for _ in range(4)}
        sent = node.requests()
        assert len(ids) == 7 and [out for out, _ in sent[:3]] == ["v1/chat/completions/b"] * 3
        assert {out for out, _ in sent[3:]} == {"v1/chat/completions/a", "v1/chat/completions/c"}
        unknown = await client.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        )
        assert unknown.status_code == 404
        # b is the only replica of its group: what it holds can go nowhere else; a's can go to c
        assert not bridge.can_retry(sent[0][1], continuing=False)
        assert bridge.can_retry(next(i for out, i in sent if out.endswith("/a")), continuing=False)
        health = (await client.get("/health")).json()["models"]
        assert health == {"echo": {"replicas": 2, "live": 2}, "slow-echo": {"replicas": 1, "live": 1}}
