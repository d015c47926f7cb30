"""The demo page against a server started with an API key.

The page keeps the key in the tab's ``sessionStorage`` and sends it as
``Authorization: Bearer`` on fetch and as ``?api_key=`` on the EventSource
reattach (which cannot send headers), so the demo still works when a key is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import DemoPage
from tests.browser.conftest import open_demo, require_browser
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(180)]

KEY = "demo-s3cret key/+&"  # characters that must be escaped in a query string
KEY_ITEM = "openai-stream-server.api-key"
PROMPT = "the key works, word by word"


@pytest.fixture(scope="module")
def keyed_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    require_browser()
    env = {"openai-stream-server": {"OPENAI_STREAM_SERVER_API_KEY": KEY}}
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("keyed-flow"), env=env) as flow:
        yield flow


@pytest.fixture
def demo(tmp_path: Path, keyed_flow: Dataflow) -> Iterator[DemoPage]:
    yield from open_demo(tmp_path, keyed_flow)


def wait_models(demo: DemoPage) -> None:
    demo.page.wait_for_function("() => [...document.querySelectorAll('#model option')].some(o => o.value === 'dora-stream')")


def test_page_works_with_a_key_set_on_the_server(demo: DemoPage) -> None:
    streams: list[str] = []
    demo.page.on(
        "request", lambda request: streams.append(request.url) if request.url.split("?")[0].endswith("/stream") else None
    )

    demo.ask("no key yet")  # the POST is refused, and the page says why
    assert demo.wait_state("error", "done") == "error"
    assert "API key" in demo.text("#status")

    demo.page.fill("#api-key", KEY)
    demo.page.dispatch_event("#api-key", "change")
    wait_models(demo)  # /v1/models needs the key too
    demo.ask(PROMPT)
    assert demo.wait_state("done", "error") == "done", demo.text("#status")
    assert demo.answer() == PROMPT
    assert streams and all("api_key=demo-s3cret%20key%2F%2B%26" in url for url in streams)
    assert demo.page.evaluate(f"sessionStorage.getItem('{KEY_ITEM}')") == KEY

    demo.page.reload()  # the same tab keeps the key
    wait_models(demo)
    assert demo.page.input_value("#api-key") == KEY
    demo.ask("after a reload")
    assert demo.wait_state("done", "error") == "done" and demo.answer() == "after a reload"
    assert demo.errors == []


def test_a_new_tab_does_not_inherit_the_key(demo: DemoPage, keyed_flow: Dataflow) -> None:
    """sessionStorage is per tab: a page opened afresh starts without it."""
    demo.page.fill("#api-key", KEY)
    demo.page.dispatch_event("#api-key", "change")
    wait_models(demo)
    other = demo.page.context.new_page()
    other.goto(keyed_flow.base_url + "/")
    other.wait_for_selector("#app[data-models]:not([data-models='0'])")
    assert other.input_value("#api-key") == ""
    other.close()
