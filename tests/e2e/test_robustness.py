"""Failure paths against the real ``dora run`` dataflow.

Client gone, cancel, silent / stalled / crashed model nodes, chaos ordering
and shutdown. The model nodes are the echo_stream of ``dataflow-stream.yml``
or a test node from ``tests/nodes/`` put in ``tests/e2e/dataflows/test-node.yml``.
Timeouts are set small on the server node through its environment; every
assertion on time is "within the configured timeout + a generous margin".
The soak is in ``test_robustness_soak.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openai_stream_protocol.testing import wait_for, wait_until_async
from tests.dataflow import ROOT, SERVER_NODE, Dataflow
from tests.live import Events, metric, wait_metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TEST_NODE_YML = ROOT / "tests" / "e2e" / "dataflows" / "test-node.yml"
MARGIN_S = 5.0  # on top of a configured timeout: a loaded 2-core CI machine, the sweep and dora's latency


def node_flow(node: str, workdir: Path, server_env: dict[str, str], node_env: dict[str, str] | None = None) -> Dataflow:
    """``test-node.yml`` with ``tests/nodes/<node>.py`` as the model node; cancels land in ``workdir/cancels.txt``."""

    def use_node(spec: dict[str, Any]) -> dict[str, Any]:
        for entry in spec["nodes"]:
            if entry["id"] == "model":
                entry["path"] = str(ROOT / "tests" / "nodes" / f"{node}.py")
        return spec

    env = {SERVER_NODE: server_env, "model": {"CANCEL_LOG": str(workdir / "cancels.txt"), **(node_env or {})}}
    return Dataflow(TEST_NODE_YML, workdir, env=env, transform=use_node)


def cancels(flow: Dataflow) -> list[str]:
    path = flow.workdir / "cancels.txt"
    return path.read_text().split() if path.exists() else []


POLL_S = 0.05  # the predicates read files the dataflow writes (its log, the cancel list): not every 5 ms


def completion_lines(flow: Dataflow) -> dict[str, list[str]]:
    """The server's one INFO line per completion, by request id (from the whole dora log)."""
    lines: dict[str, list[str]] = {}
    for line in flow.log_path.read_text(errors="replace").splitlines():
        match = re.search(r"INFO openai_stream_server\.registry: completion (chatcmpl-\w+) (.*)", line)
        if match:
            lines.setdefault(match.group(1), []).append(match.group(2))
    return lines


def sdk(flow: Dataflow, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=60, **kwargs)


def body(text: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}


LONG = " ".join(f"w{i}" for i in range(400))


# -- client gone and cancel (echo_stream) ------------------------------------------


@pytest.fixture(scope="module")
def slow_echo_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """``dataflow-stream.yml`` with a slow echo that logs every cancel it acts on (DEBUG)."""
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.05", "ECHO_LOG_LEVEL": "DEBUG"}}
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("slow-echo"), env=env) as flow:
        yield flow


def echo_cancelled(flow: Dataflow) -> set[str]:
    """Requests echo_stream stopped because of a ``cancel`` (its DEBUG line ``request <id> cancelled``)."""
    return set(re.findall(r"request (chatcmpl-\w+) cancelled", flow.log_path.read_text(errors="replace")))


async def test_20_streams_closed_early_are_cancelled_downstream(slow_echo_flow: Dataflow) -> None:
    flow = slow_echo_flow
    async with httpx.AsyncClient(base_url=flow.base_url, timeout=30, limits=httpx.Limits(max_connections=50)) as client:
        start = (await client.get("/metrics")).text  # the flow is shared with the module's other tests

        async def one() -> str:
            async with client.stream("POST", "/v1/chat/completions", json=body(LONG)) as r:
                assert r.status_code == 200
                assert len(await Events(r).take(3)) == 3
                return r.headers["x-request-id"]  # closing here drops the connection mid-stream

        ids = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 60)
        assert await wait_metric(client, "oss_active_streams", 0, timeout_s=5) == 0
        assert wait_for(lambda: set(ids) <= echo_cancelled(flow), 10, interval_s=POLL_S), flow.log()
        # echo_stream really stopped: no more late chunks arrive for those requests
        late = metric((await client.get("/metrics")).text, "oss_dropped_chunks_total", 0)
        await asyncio.sleep(1.0)
        metrics = (await client.get("/metrics")).text
    assert len(set(ids)) == 20
    assert metric(metrics, "oss_dropped_chunks_total", 0) == late  # 400 tokens at 0.05 s would still be flowing

    def increase(name: str) -> float:
        return metric(metrics, name, 0) - metric(start, name, 0)

    assert increase("oss_cancellations_total") == 20  # exactly the streams closed early
    assert increase('oss_completions_total{status="cancelled",surface="chat"}') == 20
    assert increase('oss_completions_total{status="completed",surface="chat"}') == 0
    # The dora log is written by the daemon a little after the node prints it.
    assert wait_for(lambda: set(ids) <= completion_lines(flow).keys(), 10, interval_s=POLL_S)
    logged = completion_lines(flow)
    assert all(len(logged[i]) == 1 and "status=cancelled" in logged[i][0] for i in ids)


async def test_cancel_endpoint_stops_the_stream_and_echo(slow_echo_flow: Dataflow) -> None:
    flow = slow_echo_flow
    async with httpx.AsyncClient(base_url=flow.base_url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body(LONG)) as r:
            request_id = r.headers["x-request-id"]
            events = Events(r)
            await events.take(2)
            cancelled = await client.post(f"/v1/chat/completions/{request_id}/cancel")
            rest = await asyncio.wait_for(events.take(100_000), 10)
        assert await wait_metric(client, "oss_active_streams", 0) == 0
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "cancelled"
    assert wait_for(lambda: request_id in echo_cancelled(flow), 10, interval_s=POLL_S)


# -- downstream silent, stalled, dead ----------------------------------------------------


@pytest.fixture(scope="module")
def silent_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    server = {"OPENAI_STREAM_SERVER_FIRST_CHUNK_TIMEOUT_S": "1.5", "OPENAI_STREAM_SERVER_HEADER_GRACE_S": "5"}
    with node_flow("silent", tmp_path_factory.mktemp("silent"), server) as flow:
        yield flow


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_silent_node_gets_504_within_the_first_chunk_timeout(silent_flow: Dataflow, stream: bool) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        result = sdk(silent_flow).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello?"}], stream=stream
        )
        list(result)  # type: ignore[call-overload]
    elapsed = time.monotonic() - started
    assert info.value.status_code == 504
    assert info.value.code == "upstream_timeout" and info.value.type == "timeout"
    request_id = info.value.response.headers["x-request-id"]
    assert 1.5 <= elapsed < 1.5 + MARGIN_S
    assert wait_for(lambda: request_id in cancels(silent_flow), 5, interval_s=POLL_S)  # cancel sent downstream
    assert wait_for(lambda: request_id in completion_lines(silent_flow), 10, interval_s=POLL_S)  # the log lags the answer
    [line] = completion_lines(silent_flow)[request_id]
    assert "status=failed" in line and "no answer from the model node within 1.5 s" in line


@pytest.fixture(scope="module")
def stall_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    server = {"OPENAI_STREAM_SERVER_IDLE_TIMEOUT_S": "1.5", "OPENAI_STREAM_SERVER_PING_INTERVAL_S": "0.5"}
    with node_flow("stall", tmp_path_factory.mktemp("stall"), server) as flow:
        yield flow


def test_stalled_node_gets_an_error_event_then_done(stall_flow: Dataflow) -> None:
    started = time.monotonic()
    with httpx.stream("POST", stall_flow.base_url + "/v1/chat/completions", json=body("first then nothing"), timeout=30) as r:
        request_id = r.headers["x-request-id"]
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and data[-1] == "[DONE]"
    assert json.loads(data[1])["choices"][0]["delta"]["content"] == "first"
    assert json.loads(data[-2])["error"] == {
        "message": "the model node went silent for 1.5 s",
        "type": "timeout",
        "param": None,
        "code": "upstream_timeout",
    }
    assert 1.5 <= elapsed < 1.5 + MARGIN_S
    assert wait_for(lambda: request_id in cancels(stall_flow), 5, interval_s=POLL_S)


def test_stalled_node_makes_the_sdk_raise_api_error(stall_flow: Dataflow) -> None:
    stream = sdk(stall_flow).chat.completions.create(model="m", messages=[{"role": "user", "content": "one two"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one"
    assert "went silent" in info.value.message
    metrics = httpx.get(stall_flow.base_url + "/metrics").text
    assert metric(metrics, 'oss_timeouts_total{kind="idle"}') >= 1


@pytest.mark.parametrize("after", [0, 1], ids=["before-any-chunk", "mid-stream"])
def test_a_crashed_node_leaves_no_client_hanging(tmp_path: Path, after: int) -> None:
    """The node dies: the request in flight and every later one end with an error, long before any timeout.

    The server sees its answer input close (dora keeps the dataflow running for it: its timer input
    stays open). A request that had no chunk yet waits --model-wait-s for a replica to come back and
    then gets 503; one cut off mid-answer ends with a 502 error event. New requests wait as long, then
    get 503; /health says why.
    """
    timeout_s = 20.0
    server = {
        "OPENAI_STREAM_SERVER_FIRST_CHUNK_TIMEOUT_S": str(timeout_s),
        "OPENAI_STREAM_SERVER_IDLE_TIMEOUT_S": str(timeout_s),
        "OPENAI_STREAM_SERVER_HEADER_GRACE_S": "10",
        "OPENAI_STREAM_SERVER_MODEL_WAIT_S": "1",
    }
    with node_flow("crash", tmp_path, server, {"CRASH_AFTER_CHUNKS": str(after)}) as flow:
        started = time.monotonic()
        with httpx.stream("POST", flow.base_url + "/v1/chat/completions", json=body("alpha beta gamma"), timeout=60) as r:
            raw = r.read().decode()
        elapsed = time.monotonic() - started
        if after == 0:  # nothing was sent yet: the headers were held back, so a real status
            assert r.status_code == 503
            error = json.loads(raw)["error"]
        else:
            data = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            assert r.status_code == 200 and data[-1] == "[DONE]"
            assert json.loads(data[1])["choices"][0]["delta"]["content"] == "alpha"
            error = json.loads(data[-2])["error"]
        # Before any chunk the request waited --model-wait-s for a replica, then 503; a cut-off answer is a 502.
        code = "backend_unavailable" if after == 0 else "upstream_error"
        assert error["code"] == code and "the model node is gone" in error["message"], error
        assert elapsed < timeout_s  # ended by the crash, not by a timeout
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                result = sdk(flow).chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "anyone?"}], stream=stream
                )
                list(result)  # type: ignore[call-overload]
            assert info.value.status_code == 503 and info.value.code == "backend_unavailable"
        health = httpx.get(flow.base_url + "/health", timeout=5)
        assert health.status_code == 503 and "the model node is gone" in health.json()["error"]
        assert health.json()["active_streams"] == 0
        assert "crashing on purpose" in flow.log()


# -- access and limits, configured through the dataflow's env --------------------------------


def test_api_key_cors_body_and_concurrency_limits_from_the_dataflow_env(tmp_path: Path) -> None:
    origin = "https://chat.example.com"
    server = {
        "OPENAI_STREAM_SERVER_API_KEY": "s3cret",
        "OPENAI_STREAM_SERVER_CORS_ORIGINS": origin,
        "OPENAI_STREAM_SERVER_MAX_BODY_BYTES": "2048",
        "OPENAI_STREAM_SERVER_MAX_ACTIVE_REQUESTS": "3",
        "OPENAI_STREAM_SERVER_FIRST_CHUNK_TIMEOUT_S": "60",
    }
    auth = {"authorization": "Bearer s3cret"}
    with node_flow("silent", tmp_path, server) as flow, httpx.Client(base_url=flow.base_url, timeout=10) as client:
        missing = client.get("/v1/models")
        wrong = client.post("/v1/chat/completions", json=body("x"), headers={"authorization": "Bearer nope"})
        open_routes = [client.get(path).status_code for path in ("/health", "/", "/metrics")]
        metrics_with_key = client.get("/metrics", headers=auth).status_code
        preflight = client.options(
            "/v1/chat/completions",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization",
            },
        )
        too_large = client.post("/v1/chat/completions", json=body("x" * 4096), headers=auth)
        held = [client.post("/v1/chat/completions", json={**body("wait"), "background": True}, headers=auth) for _ in range(3)]
        refused = client.post("/v1/chat/completions", json=body("one more"), headers=auth)
        client.post(f"/v1/chat/completions/{held[0].json()['id']}/cancel", headers=auth)
        accepted = client.post("/v1/chat/completions", json={**body("now"), "background": True}, headers=auth)
        for r in [*held[1:], accepted]:
            client.post(f"/v1/chat/completions/{r.json()['id']}/cancel", headers=auth)
        metrics = client.get("/metrics", headers=auth).text
        sdk_error = None
        try:
            sdk(flow).models.list()
        except openai.AuthenticationError as exc:
            sdk_error = exc
    for r in (missing, wrong):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert open_routes == [200, 200, 401] and metrics_with_key == 200  # /metrics needs the key unless --public-metrics
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    assert [r.status_code for r in held] == [202, 202, 202]
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert accepted.status_code == 202
    assert sdk_error is not None and sdk_error.status_code == 401
    assert metric(metrics, "oss_active_streams") == 0
    assert metric(metrics, 'oss_requests_total{status="401",surface="chat"}') == 1  # /v1/models is not counted
    assert wait_for(lambda: len(cancels(flow)) == 4, 5, interval_s=POLL_S)


# -- chaos ordering ----------------------------------------------------------------------


async def many_streams(flow: Dataflow, prompts: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Stream every prompt at once; each result is (request id, the decoded data events without [DONE])."""
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=flow.base_url, limits=limits, timeout=60) as client:

        async def one(prompt: str) -> tuple[str, list[dict[str, Any]]]:
            async with client.stream("POST", "/v1/chat/completions", json=body(prompt)) as r:
                assert r.status_code == 200, await r.aread()
                data = await Events(r).take(100_000)
            assert data[-1] == "[DONE]"
            return r.headers["x-request-id"], [json.loads(d) for d in data[:-1]]

        results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 90)
        assert await wait_metric(client, "oss_active_streams", 0) == 0
    return results


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))


PROMPTS = [" ".join(f"s{i}t{j}" for j in range(30)) for i in range(50)]


def test_50_concurrent_streams_through_chaos_reassemble_exactly(tmp_path: Path) -> None:
    with node_flow("chaos", tmp_path, {"OPENAI_STREAM_SERVER_GAP_TIMEOUT_S": "3"}, {"CHAOS_SEED": "7"}) as flow:
        results = asyncio.run(many_streams(flow, PROMPTS))
        metrics = httpx.get(flow.base_url + "/metrics").text
        assert wait_for(lambda: {i for i, _ in results} <= completion_lines(flow).keys(), 10, interval_s=POLL_S)
        logged = completion_lines(flow)
    assert [text_of(events) for _, events in results] == PROMPTS
    for _, events in results:
        assert [e["choices"][0]["finish_reason"] for e in events].count("stop") == 1
    assert metric(metrics, "oss_reordered_chunks_total") > 0
    duplicates = metric(metrics, 'oss_dropped_chunks_total{reason="duplicate"}', 0)
    assert duplicates + metric(metrics, 'oss_dropped_chunks_total{reason="late"}', 0) > 0
    assert metric(metrics, 'oss_dropped_chunks_total{reason="unknown"}') > 0  # the stray chunks, delivered nowhere
    assert metric(metrics, 'oss_completions_total{status="completed",surface="chat"}') == 50
    assert all(len(logged[i]) == 1 and "status=completed" in logged[i][0] for i, _ in results)


def test_chaos_that_drops_a_chunk_ends_each_stream_with_the_gap_error(tmp_path: Path) -> None:
    server = {"OPENAI_STREAM_SERVER_GAP_TIMEOUT_S": "1", "OPENAI_STREAM_SERVER_IDLE_TIMEOUT_S": "30"}
    with node_flow("chaos", tmp_path, server, {"CHAOS_SEED": "7", "CHAOS_DROP_SEQ": "3"}) as flow:
        started = time.monotonic()
        results = asyncio.run(many_streams(flow, PROMPTS))
        elapsed = time.monotonic() - started
        metrics = httpx.get(flow.base_url + "/metrics").text
    for prompt, (_, events) in zip(PROMPTS, results, strict=True):
        error = events[-1]["error"]
        assert error["code"] == "missing_chunk" and error["message"] == "chunk seq 3 never arrived (waited 1 s)"
        assert text_of(events[:-1]) == " ".join(prompt.split(" ")[:3])  # seq 0, 1, 2 and nothing after the hole
    assert elapsed < 1 + 30  # 50 streams of chaos, each ending one gap timeout after its hole
    assert metric(metrics, 'oss_timeouts_total{kind="gap"}') == 50
    assert set(cancels(flow)) == {i for i, _ in results}  # the node is told to stop each failed request


# -- shutdown --------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def test_sigint_ends_in_flight_streams_with_an_error_then_everything_exits(tmp_path: Path) -> None:
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.05"}}
    flow = Dataflow(ROOT / "dataflow-stream.yml", tmp_path, env=env)
    with flow:
        assert flow.process is not None
        nodes = flow.node_pids()
        assert flow.server_pid() is not None and len(nodes) == 2, nodes

        async def in_flight() -> list[list[str]]:
            async with httpx.AsyncClient(base_url=flow.base_url, timeout=30) as client:
                opened = asyncio.Event()
                count = 0

                async def one() -> list[str]:
                    nonlocal count
                    async with client.stream("POST", "/v1/chat/completions", json=body(LONG)) as r:
                        events = Events(r)
                        first = await events.take(2)
                        count += 1
                        if count == 5:
                            opened.set()
                        return first + await events.take(100_000)

                streams = [asyncio.ensure_future(one()) for _ in range(5)]
                await asyncio.wait_for(opened.wait(), 20)
                os.killpg(flow.process.pid, signal.SIGINT)  # type: ignore[union-attr]
                return await asyncio.wait_for(asyncio.gather(*streams), 15)

        signalled = time.monotonic()
        results = asyncio.run(in_flight())
        flow.process.wait(15)
        exited = time.monotonic() - signalled
        log = flow.log()
    for events in results:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "backend_unavailable", events[-3:]
    assert exited < 10, log
    assert flow.process.returncode == 0, log
    assert group_members(flow.process.pid) == []
    assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in nodes), 5, interval_s=POLL_S), nodes


def test_sigterm_to_the_server_ends_streams_with_an_error_and_it_exits_cleanly(tmp_path: Path) -> None:
    """An operator (or a supervisor) terminates just the server node: same error event + [DONE], exit status 0.

    Exit status 0 matters under dora: a node killed by a signal marks the whole dataflow failed.
    """
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.05"}}
    flow = Dataflow(ROOT / "dataflow-stream.yml", tmp_path, env=env)
    with flow:
        assert flow.process is not None
        pid = flow.server_pid()
        nodes = flow.node_pids()
        assert pid is not None

        async def in_flight() -> list[list[str]]:
            async with httpx.AsyncClient(base_url=flow.base_url, timeout=30) as client:
                streaming: list[str] = []

                async def one() -> list[str]:
                    async with client.stream("POST", "/v1/chat/completions", json=body(LONG)) as r:
                        events = Events(r)
                        first = await events.take(2)
                        streaming.append(r.headers["x-request-id"])
                        return first + await events.take(100_000)

                streams = [asyncio.ensure_future(one()) for _ in range(3)]
                await wait_until_async(lambda: len(streaming) == 3, timeout_s=20, what="3 streams to be streaming")
                assert await wait_metric(client, "oss_active_streams", 3, timeout_s=10) == 3
                os.kill(pid, signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*streams), 15)

        results = asyncio.run(in_flight())
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, interval_s=POLL_S)
        flow.process.wait(15)  # echo_stream sees its inputs close and stops; the dataflow ends
        log = flow.log()
    for events in results:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "backend_unavailable"
    assert "exited because of signal" not in log, log
    assert flow.process.returncode == 0, log
    assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in nodes), 5, interval_s=POLL_S), nodes
