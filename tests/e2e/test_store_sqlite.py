"""``--store sqlite``: what a client has survives a restart of the server node (docs/store.md).

Three dataflows, one after the other, on one SQLite file: the first answers a chat completion and a
stored response and is stopped gracefully right after (the stop flushes); the second reads them
back exactly (GET, reattach, ``starting_after``, ``previous_response_id``, ``input_items``), starts a
long completion and has its server node killed (SIGKILL) in the middle of it; the third reads that
one as failed, "the server restarted". A short completion TTL then gives 404.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openai_stream_protocol.testing import wait_until
from tests.dataflow import ROOT, SERVER_NODE, Dataflow
from tests.sse_events import Parsed, parse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMPT = " ".join(f"word{i}" for i in range(30)) + ",\n  and  the end. "
LONG = " ".join(f"part{i}" for i in range(3000))  # 60 s of echo at 0.02 s a token: in flight when killed


def sqlite_flow(workdir: Path, db: Path, **server_env: str) -> Dataflow:
    env = {SERVER_NODE: {"OPENAI_STREAM_SERVER_STORE": f"sqlite://{db}", **server_env}}
    return Dataflow(ROOT / "dataflow-stream.yml", workdir, env=env)


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def reattach(flow: Dataflow, request_id: str, **params: Any) -> Parsed:
    r = httpx.get(f"{flow.base_url}/v1/chat/completions/{request_id}/stream", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return parse(r.text)


def test_finished_completions_and_stored_responses_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite3"
    with sqlite_flow(tmp_path / "first", db) as first:
        client = sdk(first)
        chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], stream=True))
        chat_id = chunks[0].id
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PROMPT
        replay = reattach(first, chat_id)
        replay_tail = reattach(first, chat_id, starting_after=5)
        response = client.responses.create(model="m", input=PROMPT, instructions="be brief", store=True)
        assert response.output_text == PROMPT
        items = client.responses.input_items.list(response.id)
        # the stop right after: the graceful stop flushes what the flush interval has not written yet
    assert db.exists()

    with sqlite_flow(tmp_path / "second", db) as second:
        client = sdk(second)
        got = httpx.get(f"{second.base_url}/v1/chat/completions/{chat_id}", timeout=10)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["message"]["content"] == PROMPT
        again = reattach(second, chat_id)
        assert [e.data for e in again.events] == [e.data for e in replay.events]  # byte for byte
        assert [e.id for e in again.events] == [e.id for e in replay.events]
        tail = reattach(second, chat_id, starting_after=5)
        assert [(e.id, e.data) for e in tail.events] == [(e.id, e.data) for e in replay_tail.events]
        assert "word5 " not in tail.text and tail.text and PROMPT.endswith(tail.text)

        stored = client.responses.retrieve(response.id)
        assert (stored.status, stored.output_text, stored.instructions) == ("completed", PROMPT, "be brief")
        assert [i.id for i in client.responses.input_items.list(response.id)] == [i.id for i in items]
        events = list(client.responses.retrieve(response.id, stream=True, starting_after=2))
        assert events[0].sequence_number == 3 and events[-1].type == "response.completed"
        follow_up = client.responses.create(model="m", input="and then?", previous_response_id=response.id)
        assert follow_up.status == "completed" and follow_up.output_text == "and then?"

        started = httpx.post(
            f"{second.base_url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": LONG}], "background": True},
            timeout=10,
        )
        assert started.status_code == 202, started.text
        in_flight = started.json()["id"]
        wait_until(
            lambda: httpx.get(f"{second.base_url}/v1/chat/completions/{in_flight}", timeout=5).json()["choices"][0]["message"][
                "content"
            ],
            20,
            what="the long completion to start",
        )
        time.sleep(1.5)  # past the flush interval: its opened record is on disk
        pid = second.server_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a crash: nothing is flushed, nothing is ended

    with sqlite_flow(tmp_path / "third", db) as third:
        r = httpx.get(f"{third.base_url}/v1/chat/completions/{in_flight}", timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "failed" and body["choices"][0]["finish_reason"] == "error", body
        assert body["error"]["message"] == "the server restarted while this completion was in flight"
        assert body["choices"][0]["message"]["content"] == ""  # what was streamed before was not written (the crash)
        events = reattach(third, in_flight).events
        assert "restarted" in events[-2].data and events[-1].done  # the error event, then [DONE]
        assert sdk(third).responses.retrieve(response.id).output_text == PROMPT  # still there


def test_a_short_completion_ttl_ends_in_404(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite3"
    env = {"OPENAI_STREAM_SERVER_RETENTION_S": "0.2", "OPENAI_STREAM_SERVER_STORE_COMPLETION_TTL_S": "3"}
    with sqlite_flow(tmp_path / "ttl", db, **env) as flow:
        done = sdk(flow).chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}])
        url = f"{flow.base_url}/v1/chat/completions/{done.id}"
        time.sleep(1.0)  # past the memory retention: only the store has it now
        assert httpx.get(url, timeout=10).status_code == 200
        wait_until(lambda: httpx.get(url, timeout=10).status_code == 404, 15, what="the record to expire")
