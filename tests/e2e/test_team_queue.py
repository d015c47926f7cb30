"""Admission with a visible queue under ``dora run``: a model group of one echo replica that generates one request at
once (``ECHO_MAX_CONCURRENT=1``, said in its hello as ``capacity``) and a bound of 2 waiting (``--max-queued``);
beyond it 429, a waiting stream's place as ``: queued N``, and a priority request overtaking default ones in the order
the node receives them (docs/team.md, "Queue and tiers")."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SLOW = "slow-echo"


def wait_for(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {
        "openai-stream-server": {"OPENAI_STREAM_SERVER_MAX_QUEUED": f"{SLOW}=3"},
        "echo-stream-1": {"ECHO_MODELS": "echo"},
        "echo-stream-2": {"ECHO_MODELS": "echo"},
        "echo-stream-3": {
            "ECHO_MODELS": SLOW,
            "ECHO_TOKEN_DELAY_S": 0.1,
            "ECHO_MAX_CONCURRENT": 1,
            "ECHO_LOG_LEVEL": "DEBUG",  # its "request <id>" lines: the order it received them
        },
    }
    with Dataflow(ROOT / "dataflow-replicas.yml", tmp_path_factory.mktemp("queue"), env=env) as running:
        wait_for(lambda: serves_slow(running), "the slow group's hello")
        yield running


def serves_slow(flow: Dataflow) -> bool:
    models = httpx.get(flow.base_url + "/v1/models", timeout=10).json()["data"]
    return any(card["id"] == SLOW for card in models)


def queue_health(flow: Dataflow) -> dict[str, Any] | None:
    return httpx.get(flow.base_url + "/health", timeout=10).json()["queues"].get(SLOW)


def waiting(flow: Dataflow) -> int:
    health = queue_health(flow)
    return 0 if health is None else int(health["queued"])


def post(flow: Dataflow, text: str, tier: str = "default", stream: bool = False) -> httpx.Response:
    body = {"model": SLOW, "messages": [{"role": "user", "content": text}], "service_tier": tier, "stream": stream}
    return httpx.post(flow.base_url + "/v1/chat/completions", json=body, timeout=60)


def test_priority_overtakes_default_and_the_bound_refuses_with_429(flow: Dataflow) -> None:
    with ThreadPoolExecutor(8) as pool:
        busy = pool.submit(post, flow, "busy " * 30)
        wait_for(lambda: queue_health(flow) is not None and queue_health(flow)["admitted"] == 1, "the first admitted")  # type: ignore[index]
        queued = []
        for n, (text, tier) in enumerate((("d1 x", "default"), ("d2 x", "default"), ("p1 x", "priority")), 1):
            queued.append(pool.submit(post, flow, text, tier))
            wait_for(lambda n=n: waiting(flow) == n, f"{n} waiting")
        refused = post(flow, "over")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        sdk = openai.OpenAI(base_url=flow.base_url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": "over"}])
        answers = [busy.result(), *(f.result() for f in queued)]
    assert all(a.status_code == 200 for a in answers)
    ids = {a.json()["choices"][0]["message"]["content"].split()[0]: a.headers["x-request-id"] for a in answers}
    log = flow.log_path.read_text(errors="replace")
    received = [m for m in re.findall(r"request (chatcmpl-[\w-]+):", log) if m in ids.values()]
    by_id = {v: k for k, v in ids.items()}
    assert [by_id[r] for r in dict.fromkeys(received)] == ["busy", "p1", "d1", "d2"]
    assert answers[3].json()["service_tier"] == "priority"


def test_a_waiting_stream_learns_its_place_and_the_sdk_stream_parses(flow: Dataflow) -> None:
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(post, flow, "busy " * 20)
        wait_for(lambda: queue_health(flow)["admitted"] == 1, "the first admitted")  # type: ignore[index]
        raw = pool.submit(post, flow, "raw one", "default", True)
        wait_for(lambda: waiting(flow) == 1, "the raw stream waiting")
        sdk = openai.OpenAI(base_url=flow.base_url + "/v1", api_key="x", max_retries=0)
        chunks = list(sdk.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": "sdk two"}], stream=True))
        text = raw.result().text
        busy.result()
    assert text.startswith(": queued 1\n\n") and "data: [DONE]" in text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "sdk two"
