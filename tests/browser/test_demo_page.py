"""The demo page (``GET /``) in headless Chromium against ``dataflow-stream.yml``: a prompt in, the exact echo out."""

from __future__ import annotations

import json

import httpx
import pytest

from openai_stream_protocol import split_tokens
from tests.browser.chromium import DemoPage

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(180)]

PROMPT = " ".join(f"word{i}" for i in range(55)) + '\n\n  naïve café — ✓ "quoted" <b>not bold</b> &amp;   spaced   out\tend. '


def test_page_streams_the_exact_echo(demo: DemoPage) -> None:
    options = demo.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == ["dora-stream"]  # from GET /v1/models
    demo.ask(PROMPT)
    assert demo.wait_state("done", "error", "cancelled") == "done"
    assert demo.answer() == PROMPT
    data = demo.data()
    assert data["id"].startswith("chatcmpl-")
    assert (data["opens"], data["drops"], data["skipped"]) == ("1", "0", "0")
    assert demo.text("#tokens") == str(len(split_tokens(PROMPT)))  # usage.completion_tokens from the finish chunk
    assert demo.text("#ttft").endswith("s") and demo.text("#tps") != "–"
    assert "finish_reason stop" in demo.text("#status")
    assert demo.page.eval_on_selector("#stop", "b => b.disabled") is True
    assert demo.errors == []


def test_second_prompt_replaces_the_first(demo: DemoPage) -> None:
    demo.ask("first question")
    assert demo.wait_state("done", "error") == "done" and demo.answer() == "first question"
    demo.ask("second one")
    assert demo.wait_state("done", "error") == "done" and demo.answer() == "second one"


def test_stop_cancels_the_completion(demo: DemoPage) -> None:
    long_prompt = " ".join(f"t{i}" for i in range(1500))  # 30 s of echo at 0.02 s a token
    demo.ask(long_prompt)
    demo.wait_answer_length(30)
    demo.page.click("#stop")
    assert demo.wait_state("cancelled", "done", "error") == "cancelled"
    answer = demo.answer()
    assert 30 <= len(answer) < len(long_prompt) and long_prompt.startswith(answer)
    body = httpx.get(f"{demo.base_url}/v1/chat/completions/{demo.data()['id']}", timeout=10).json()
    assert body["status"] == "cancelled"
    assert demo.text("#status") == "stopped"


def test_errors_are_shown(demo: DemoPage) -> None:
    """A refused POST and an error event on the stream both end up as the status message."""
    error = {"error": {"message": "slow down please", "type": "rate_limit_error", "param": None, "code": "too_many_requests"}}
    demo.page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=429, content_type="application/json", body=json.dumps(error)),
    )
    demo.ask("refused")
    assert demo.wait_state("error", "done") == "error"
    assert demo.text("#status") == "slow down please"
    demo.page.unroute("**/v1/chat/completions")

    failure = {"error": {"message": "the model node went silent", "type": "timeout", "param": None, "code": "upstream_timeout"}}
    stream = 'id: 0\ndata: {"choices":[{"index":0,"delta":{"content":"partial"}}],"sequence_number":0}\n\n'
    stream += f"data: {json.dumps(failure)}\n\ndata: [DONE]\n\n"
    demo.page.route(
        "**/v1/chat/completions/*/stream",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream),
    )
    demo.ask("fails half way")
    assert demo.wait_state("error", "done") == "error"
    assert demo.text("#status") == "the model node went silent"
    assert demo.answer() == "partial"
    assert demo.errors == []
