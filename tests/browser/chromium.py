"""Headless Debian Chromium under Playwright, and a small driver for the demo page.

Playwright's own browser download is never used (``playwright install`` is not
run): the system ``/usr/bin/chromium`` (installed by ``.ci/run`` with apt-get)
is launched with a fresh profile directory and no background networking.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Imported where used, so that without playwright the test modules still collect and
# tests/browser/conftest.py can skip (or, under CI, fail) with a message instead.
if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; tests/browser/conftest.py checks it too
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@contextmanager
def chromium_context(user_data_dir: Path, **options: Any) -> Iterator[BrowserContext]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=str(CHROMIUM), headless=True, args=ARGS, **options
        )
        try:
            yield context
        finally:
            context.close()


class DemoPage:
    """What a user does on ``/``: type a prompt, press Send or Stop, read the answer and the counters."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def open(self) -> DemoPage:
        self.page.goto(self.base_url + "/")
        self.page.wait_for_selector("#app[data-models]:not([data-models='0'])")
        return self

    def ask(self, prompt: str) -> None:
        self.page.fill("#prompt", prompt)
        self.page.click("#send")

    def wait_state(self, *states: str, timeout_s: float = 60) -> str:
        selector = ", ".join(f"#app[data-state='{s}']" for s in states)
        self.page.wait_for_selector(selector, timeout=timeout_s * 1000)
        return self.data()["state"]

    def wait_answer_length(self, at_least: int, timeout_s: float = 60) -> None:
        self.page.wait_for_function(
            "n => document.getElementById('answer').textContent.length >= n", arg=at_least, timeout=timeout_s * 1000
        )

    def answer(self) -> str:
        return str(self.page.eval_on_selector("#answer", "e => e.textContent"))

    def text(self, selector: str) -> str:
        return str(self.page.text_content(selector) or "")

    def data(self) -> dict[str, str]:
        value = json.loads(self.page.eval_on_selector("#app", "e => JSON.stringify(e.dataset)"))
        assert isinstance(value, dict)
        return value
