"""The demo page shows a request's place while it waits in the server's queue for its model (docs/team.md, "Queue and
tiers"): one echo replica that generates one request at once (its hello says ``capacity`` 1), ``--max-queued 4``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.browser.chromium import DemoPage
from tests.browser.conftest import open_demo, require_browser
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def queue_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    require_browser()
    env = {
        "openai-stream-server": {"OPENAI_STREAM_SERVER_MAX_QUEUED": "4"},
        "echo-stream": {"ECHO_MAX_CONCURRENT": 1, "ECHO_TOKEN_DELAY_S": 0.1},
    }
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("queue-flow"), env=env) as flow:
        yield flow


@pytest.fixture
def demo(tmp_path: Path, queue_flow: Dataflow) -> Iterator[DemoPage]:
    yield from open_demo(tmp_path, queue_flow)


def test_a_waiting_request_shows_its_place_then_its_answer(demo: DemoPage, queue_flow: Dataflow) -> None:
    busy_body = {"messages": [{"role": "user", "content": "busy " * 30}]}
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, queue_flow.base_url + "/v1/chat/completions", json=busy_body, timeout=60)
        for _ in range(300):  # until the replica's one slot is taken (bounded: 30 s)
            queues = httpx.get(queue_flow.base_url + "/health", timeout=10).json()["queues"]
            if any(q["admitted"] == 1 for q in queues.values()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the first request was never admitted")
        demo.ask("after you")
        demo.page.wait_for_selector("#app[data-queued='1']", timeout=30_000)
        assert demo.text("#status") == "queued · next in line"
        assert demo.data()["state"] == "waiting"
        assert demo.wait_state("done", "error", "cancelled") == "done"
        assert busy.result().status_code == 200
    assert demo.answer() == "after you"
    assert demo.errors == []
