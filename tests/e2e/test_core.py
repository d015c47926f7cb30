"""The streaming core against the real ``dora run dataflow-stream.yml`` with the openai SDK and raw httpx."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.dataflow import BIN_DIR, ROOT, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROMPT = "Stream me back,  word by word:\n exactly as  sent. "


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_sdk_sync_stream(echo_flow: Dataflow) -> None:
    stream = sdk(echo_flow).chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == PROMPT
    assert [c.choices[0].finish_reason for c in chunks].count("stop") == 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) > 3  # the echo paces its tokens, so they arrive as several events
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"gpt-3.5-turbo"}


def test_sdk_sync_non_stream_with_usage(echo_flow: Dataflow) -> None:
    completion = sdk(echo_flow).chat.completions.create(
        model="m", messages=[{"role": "system", "content": "be terse"}, {"role": "user", "content": PROMPT}]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == PROMPT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0


def test_sdk_max_tokens_gives_length(echo_flow: Dataflow) -> None:
    completion = sdk(echo_flow).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two three four five"}], max_tokens=2
    )
    assert completion.choices[0].message.content == "one two"
    assert completion.choices[0].finish_reason == "length"


async def test_sdk_async_stream_with_usage(echo_flow: Dataflow) -> None:
    client = openai.AsyncOpenAI(base_url=echo_flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PROMPT
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


async def test_sdk_async_non_stream(echo_flow: Dataflow) -> None:
    async with openai.AsyncOpenAI(base_url=echo_flow.base_url + "/v1", api_key="unused", max_retries=0) as client:
        completion = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "async hi"}])
    assert completion.choices[0].message.content == "async hi"


def test_image_parts_are_accepted(echo_flow: Dataflow) -> None:
    completion = sdk(echo_flow).chat.completions.create(
        model="m",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/image.jpg"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            }
        ],
    )
    assert completion.choices[0].message.content == "What is in this image?"


def test_models_and_headers(echo_flow: Dataflow) -> None:
    models = sdk(echo_flow).models.list()
    assert [m.id for m in models.data] == ["dora-stream"]
    r = httpx.post(echo_flow.base_url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.headers["x-request-id"].startswith("chatcmpl-")


def test_raw_sse_is_well_formed(echo_flow: Dataflow) -> None:
    """What ``curl -N`` shows: data lines only, role first, one finish_reason, [DONE] last."""
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    with httpx.stream("POST", echo_flow.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        request_id = r.headers["x-request-id"]
        raw = b"".join(r.iter_raw())
    text = raw.decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    for event in events:
        for line in event.strip("\n").split("\n"):
            assert line.startswith("data: ") or line == ": ping", line
    data = [e.strip().split("\n")[-1][len("data: ") :] for e in events]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert {c["id"] for c in chunks} == {request_id}


@pytest.fixture(scope="module")
def pinging_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """Pings every 50 ms and a slow echo, so that a stream sees many pings between chunks."""
    env = {
        "openai-stream-server": {"OPENAI_STREAM_SERVER_PING_INTERVAL_S": "0.05"},
        "echo-stream": {"ECHO_TOKEN_DELAY_S": "0.15"},
    }
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("ping-flow"), env=env) as flow:
        yield flow


def test_sdk_ignores_pings_on_a_long_stream(pinging_flow: Dataflow) -> None:
    prompt = " ".join(f"w{i}" for i in range(12))
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
    with httpx.stream("POST", pinging_flow.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        raw = b"".join(r.iter_raw()).decode()
    assert raw.count(": ping\n") >= 5
    stream = sdk(pinging_flow).chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == prompt


async def test_100_concurrent_streams_each_get_their_own_answer(fast_echo_flow: Dataflow) -> None:
    n = 100
    prompts = [" ".join(f"r{i}t{j}" for j in range(40)) for i in range(n)]
    limits = httpx.Limits(max_connections=n)

    async def one(client: httpx.AsyncClient, prompt: str) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": True}
        text = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choices = json.loads(line[6:])["choices"]
                    text.append(choices[0]["delta"].get("content", ""))
        return "".join(text)

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=fast_echo_flow.base_url, limits=limits, timeout=60) as client:
        answers = await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 120)
        print(f"100 concurrent streams took {time.monotonic() - started:.2f} s")
        metrics = (await client.get("/metrics")).text
    assert answers == prompts
    assert "oss_active_streams 0.0" in metrics


@pytest.fixture(scope="module")
def legacy_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    if shutil.which("dora-echo", path=str(BIN_DIR)) is None:
        pytest.fail("dora-echo is not installed: `pip install --no-deps dora-echo==0.5.0` (Makefile does it)")
    yml = Path(__file__).parent / "dataflows" / "legacy-echo.yml"
    with Dataflow(yml, tmp_path_factory.mktemp("legacy-flow")) as flow:
        yield flow


def test_legacy_dora_echo_answers(legacy_flow: Dataflow) -> None:
    client = sdk(legacy_flow)
    completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "legacy hello"}])
    # dora-echo sends the request texts back as they are, prefixes included.
    assert completion.choices[0].message.content == "<|user|>\n<|im_start|>\nlegacy hello"
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "again"}], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith("again")
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dataflow_left_idle_for_three_minutes_still_answers(tmp_path: Path) -> None:
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path) as flow:
        deadline = time.monotonic() + 185
        while time.monotonic() < deadline:
            assert flow.process is not None and flow.process.poll() is None, flow.log()
            time.sleep(5)
        completion = sdk(flow).chat.completions.create(model="m", messages=[{"role": "user", "content": "still here?"}])
        assert completion.choices[0].message.content == "still here?"
