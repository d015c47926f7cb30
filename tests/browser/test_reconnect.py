"""EventSource drops mid-answer, reconnects with ``Last-Event-ID`` by itself, and the page still shows the exact text.

The server's test-only ``close_stream_after_events`` ends every reattach
stream after K events without ``[DONE]``, which the browser sees as a dropped
connection; ``sse_retry_ms`` (the ``retry:`` the stream opens with) makes it
come back quickly, so one answer spans many connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser.chromium import DemoPage
from tests.browser.conftest import open_demo, require_browser
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(180)]

EVENTS_PER_CONNECTION = 4
PROMPT = " ".join(f"w{i}" for i in range(60)) + "  —  and\n the end."


@pytest.fixture(scope="module")
def dropping_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    require_browser()
    env = {
        "openai-stream-server": {
            "OPENAI_STREAM_SERVER_CLOSE_STREAM_AFTER_EVENTS": str(EVENTS_PER_CONNECTION),
            "OPENAI_STREAM_SERVER_SSE_RETRY_MS": "150",
        },
        "echo-stream": {"ECHO_TOKEN_DELAY_S": "0.04"},
    }
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("dropping-flow"), env=env) as flow:
        yield flow


@pytest.fixture
def demo(tmp_path: Path, dropping_flow: Dataflow) -> Iterator[DemoPage]:
    yield from open_demo(tmp_path, dropping_flow)


def test_dropped_connections_resume_without_duplicates_or_holes(demo: DemoPage) -> None:
    demo.ask(PROMPT)
    assert demo.wait_state("done", "error", "cancelled") == "done"
    assert demo.answer() == PROMPT
    data = demo.data()
    opens, drops = int(data["opens"]), int(data["drops"])
    assert drops >= 2 and opens == drops + 1  # it really did drop, more than once, and came back each time
    assert data["skipped"] == "0"  # the browser resumed after Last-Event-ID: nothing was replayed
    assert demo.text("#reconnects") == str(drops)
    assert demo.errors == []


def test_the_server_saw_the_reattaches(demo: DemoPage, dropping_flow: Dataflow) -> None:
    before = _stream_gets(dropping_flow)
    demo.ask(PROMPT)
    assert demo.wait_state("done", "error", "cancelled") == "done"
    assert demo.answer() == PROMPT
    assert _stream_gets(dropping_flow) - before == int(demo.data()["opens"]) >= 3


def _stream_gets(flow: Dataflow) -> int:
    """200 answers on /v1/chat/completions routes: the background POST is a 202, so one per EventSource (re)connect."""
    text = httpx.get(flow.base_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('oss_requests_total{status="200",surface="chat"}'):
            return int(float(line.split()[-1]))
    return 0
