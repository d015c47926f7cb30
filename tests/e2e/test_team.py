"""One server for a team, under ``dora run``: two model groups (echo replicas naming different models in their
hellos, one group slowed), routing by name, 404 for an unknown name, an alias; named keys with limits, ownership
and a reload of the key file (docs/team.md)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from openai_stream_server.gateway.keys import hash_key
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ALICE, BOB, CAROL = "sk-e2e-alice", "sk-e2e-bob", "sk-e2e-carol"
HI = [{"role": "user", "content": "hello there"}]


def write_keys(path: Path, *entries: tuple[str, str, dict[str, int]]) -> None:
    keys = [{"name": name, "key_sha256": hash_key(key), **limits} for key, name, limits in entries]
    path.write_text(json.dumps({"keys": keys}))


def wait_for(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("team")
    keys = workdir / "keys.json"
    write_keys(keys, (ALICE, "alice", {"requests_per_minute": 8}), (BOB, "bob", {}))
    env = {
        "openai-stream-server": {
            "OPENAI_STREAM_SERVER_API_KEYS_FILE": str(keys),
            "OPENAI_STREAM_SERVER_MODEL_ALIAS": "gpt-4o=slow-echo",
        },
        "echo-stream-1": {"ECHO_MODELS": "echo"},
        "echo-stream-2": {"ECHO_MODELS": "echo"},
        "echo-stream-3": {"ECHO_MODELS": "slow-echo", "ECHO_TOKEN_DELAY_S": 0.1},
    }
    with Dataflow(ROOT / "dataflow-replicas.yml", workdir, env=env) as flow:
        flow.keys_path = keys  # type: ignore[attr-defined]
        yield flow


def served(flow: Dataflow) -> dict[str, int]:
    health = httpx.get(flow.base_url + "/health", timeout=10).json()
    return {r["id"]: r["served"] for r in health["replicas"]}


def test_requests_go_to_the_group_their_model_names_and_unknown_names_get_404(team: Dataflow) -> None:
    headers = {"Authorization": f"Bearer {BOB}"}
    listing = wait_for(
        lambda: (
            (m := httpx.get(team.base_url + "/v1/models", headers=headers, timeout=10).json()["data"])
            and {c["id"] for c in m} >= {"echo", "slow-echo"}
            and m
        ),
        "both groups' hellos",
    )
    cards = {c["id"]: c for c in listing}
    assert (cards["echo"]["replicas"], cards["slow-echo"]["replicas"]) == (2, 1)
    assert cards["gpt-4o"]["alias_of"] == "slow-echo"
    health = httpx.get(team.base_url + "/health", timeout=10).json()
    assert health["models"] == {"echo": {"replicas": 2, "live": 2}, "slow-echo": {"replicas": 1, "live": 1}}

    client = openai.OpenAI(base_url=team.base_url + "/v1", api_key=BOB, max_retries=0, timeout=30)
    before = served(team)
    for _ in range(2):
        assert client.chat.completions.create(model="slow-echo", messages=HI).choices[0].message.content == "hello there"  # type: ignore[arg-type]
    for _ in range(3):
        stream = client.chat.completions.create(model="echo", messages=HI, stream=True)  # type: ignore[arg-type]
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello there"
    aliased = client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    assert aliased.model == "slow-echo"
    after = served(team)
    gained = {k: after[k] - before.get(k, 0) for k in after}
    assert gained["echo-stream-3"] == 3 and gained["echo-stream-1"] + gained["echo-stream-2"] == 3

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nothing", messages=HI, stream=True)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    claude = anthropic.Anthropic(base_url=team.base_url, api_key=BOB, max_retries=0, timeout=30)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nothing", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    assert claude.messages.create(model="echo", max_tokens=5, messages=HI).content[0].text == "hello there"  # type: ignore[arg-type, union-attr]


def test_keys_have_limits_and_own_their_completions_and_the_file_is_read_again(team: Dataflow) -> None:
    alice = openai.OpenAI(base_url=team.base_url + "/v1", api_key=ALICE, max_retries=0, timeout=30)
    bob = openai.OpenAI(base_url=team.base_url + "/v1", api_key=BOB, max_retries=0, timeout=30)
    made = alice.responses.create(model="echo", input="one two")
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(made.id)
    raw = httpx.get(f"{team.base_url}/v1/responses/{made.id}", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10)
    assert raw.status_code == 200 and raw.headers["x-ratelimit-limit-requests"] == "8"
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(10):
            alice.chat.completions.create(model="echo", messages=HI)  # type: ignore[arg-type]
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"

    # a new key: refused until the file says it, then served after a SIGHUP (or the change of the file)
    carol = {"Authorization": f"Bearer {CAROL}"}
    assert httpx.get(team.base_url + "/v1/models", headers=carol, timeout=10).status_code == 401
    write_keys(team.keys_path, (ALICE, "alice", {}), (BOB, "bob", {}), (CAROL, "carol", {}))  # type: ignore[attr-defined]
    pid = team.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: httpx.get(team.base_url + "/v1/models", headers=carol, timeout=10).status_code == 200, "the reload")
