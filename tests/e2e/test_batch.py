"""The batch form against the real ``dora run`` (docs/architecture.md, "Batch form").

echo_stream in step mode (``ECHO_STEP_MS``) sends one message per step with a row for every
active request; ``tests/nodes/mixed.py`` answers in the batch, single and legacy forms at once
and sends rows the server must drop (an unknown id, a cancelled request).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openai_stream_protocol.testing import wait_until_async
from tests.dataflow import ROOT, SERVER_NODE, Dataflow
from tests.live import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

TEST_NODE_YML = ROOT / "tests" / "e2e" / "dataflows" / "test-node.yml"


async def stream_text(client: httpx.AsyncClient, prompt: str) -> tuple[str, list[float], str | None]:
    """The streamed answer, the ``x_sent_at`` of each content event, and the finish reason."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
    text: list[str] = []
    stamps: list[float] = []
    finish = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                text.append(choice["delta"]["content"])
                if "x_sent_at" in chunk:
                    stamps.append(chunk["x_sent_at"])
            finish = choice["finish_reason"] or finish
    return "".join(text), stamps, finish


@pytest.fixture(scope="module")
def step_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """``dataflow-stream.yml`` with echo_stream in step mode; chunks carry the echo's send stamp."""
    env = {
        "echo-stream": {"ECHO_STEP_MS": "20", "ECHO_STAMP": "1"},
        SERVER_NODE: {"OPENAI_STREAM_SERVER_RELAY_SENT_AT": "1"},
    }
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("step-flow"), env=env) as flow:
        yield flow


async def test_500_concurrent_streams_in_step_mode_each_reassemble_exactly(step_flow: Dataflow) -> None:
    n = 500
    prompts = [" ".join(f"s{i}w{j}" for j in range(12)) + f" end{i}" for i in range(n)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=step_flow.base_url, limits=limits, timeout=60) as client:
        answers = await asyncio.wait_for(asyncio.gather(*(stream_text(client, p) for p in prompts)), 180)
        metrics = (await client.get("/metrics")).text
    assert [text for text, _, _ in answers] == prompts
    assert {finish for _, _, finish in answers} == {"stop"}
    # One step is one message with one send stamp: rows of many streams share it. One message per
    # chunk would give every event a stamp of its own.
    shared = Counter(stamp for _, stamps, _ in answers for stamp in stamps)
    assert shared.most_common(1)[0][1] >= 10
    assert metric(metrics, "oss_malformed_chunks_total") == 0
    assert metric(metrics, "oss_dropped_chunks_total", 0) == 0
    assert metric(metrics, "oss_active_streams") == 0


@pytest.fixture(scope="module")
def mixed_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """``test-node.yml`` with ``tests/nodes/mixed.py`` as the model node."""
    workdir = tmp_path_factory.mktemp("mixed-flow")

    def use_mixed(spec: dict[str, Any]) -> dict[str, Any]:
        for entry in spec["nodes"]:
            if entry["id"] == "model":
                entry["path"] = str(ROOT / "tests" / "nodes" / "mixed.py")
        return spec

    env = {"model": {"CANCEL_LOG": str(Path(workdir) / "cancels.txt")}}
    with Dataflow(TEST_NODE_YML, workdir, env=env, transform=use_mixed) as flow:
        yield flow


async def metrics_of(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


async def dropped_at_least(count: Callable[[], Awaitable[float]], n: float) -> bool:
    return await count() >= n


async def test_batch_single_and_legacy_answers_in_one_dataflow(mixed_flow: Dataflow) -> None:
    prompts = [
        f"{mode} {' '.join(f'{mode}{i}w{j}' for j in range(8))}" for i in range(10) for mode in ("batch", "single", "legacy")
    ]
    async with httpx.AsyncClient(base_url=mixed_flow.base_url, limits=httpx.Limits(max_connections=50), timeout=60) as client:
        before = await metrics_of(client)
        answers = await asyncio.wait_for(asyncio.gather(*(stream_text(client, p) for p in prompts)), 120)
        after = await metrics_of(client)
    assert [text for text, _, _ in answers] == prompts
    assert {finish for _, _, finish in answers} == {"stop"}
    assert metric(after, "oss_malformed_chunks_total") == metric(before, "oss_malformed_chunks_total") == 0


async def test_a_batch_row_for_an_unknown_request_is_dropped_and_counted(mixed_flow: Dataflow) -> None:
    prompt = "stray " + " ".join(f"x{j}" for j in range(5))  # 6 tokens: 6 rows and a fin row, each step with a stray row
    async with httpx.AsyncClient(base_url=mixed_flow.base_url, timeout=60) as client:
        before = metric(await metrics_of(client), 'oss_dropped_chunks_total{reason="unknown"}', 0)
        text, _, finish = await asyncio.wait_for(stream_text(client, prompt), 60)
        assert (text, finish) == (prompt, "stop")  # the rows beside the stray ones all arrived

        async def dropped() -> float:
            return metric(await metrics_of(client), 'oss_dropped_chunks_total{reason="unknown"}', 0) - before

        # The last stray row travels with the fin row: already counted; waited for (bounded) anyway.
        await wait_until_async(lambda: dropped_at_least(dropped, 7), 10, interval_s=0.05, what="7 unknown rows dropped")
        assert await dropped() == 7


async def test_batch_rows_for_a_cancelled_request_are_dropped_as_late(mixed_flow: Dataflow) -> None:
    tokens = ["deaf"] + [f" d{j}" for j in range(4)]
    prompt = "".join(tokens)
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "background": True}
    async with httpx.AsyncClient(base_url=mixed_flow.base_url, timeout=30) as client:
        late_before = metric(await metrics_of(client), 'oss_dropped_chunks_total{reason="late"}', 0)
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 202, r.text
        request_id = r.json()["id"]

        async def content() -> str:
            return (await client.get(f"/v1/chat/completions/{request_id}")).json()["choices"][0]["message"]["content"]

        # The deaf request's first row, then it waits for the cancel.
        assert await wait_until_async(content, 20, interval_s=0.02, what="the first row") == "deaf"
        assert (await client.post(f"/v1/chat/completions/{request_id}/cancel")).status_code == 200

        async def late() -> float:
            return metric(await metrics_of(client), 'oss_dropped_chunks_total{reason="late"}', 0) - late_before

        # The node sends the other 4 rows and a fin row anyway.
        await wait_until_async(lambda: dropped_at_least(late, len(tokens)), 20, interval_s=0.05, what="the late rows dropped")
        assert await late() == len(tokens)  # 4 rows and the fin row, none delivered
        completion = (await client.get(f"/v1/chat/completions/{request_id}")).json()
    assert completion["status"] == "cancelled" and completion["choices"][0]["message"]["content"] == "deaf"
