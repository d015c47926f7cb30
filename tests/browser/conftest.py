"""Browser tests: the demo page in headless Chromium against the real dataflow.

Skipped (with the reason in the summary) where the ``playwright`` package or
``/usr/bin/chromium`` is missing, and failed instead under ``CI=true``
(``tests/requirements.py``); ``.ci/run`` installs both.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.dataflow import ROOT, Dataflow
from tests.requirements import missing

if TYPE_CHECKING:
    from tests.browser.chromium import DemoPage

CHROMIUM = Path("/usr/bin/chromium")


def require_browser() -> None:
    if importlib.util.find_spec("playwright") is None:
        missing("the browser tests need the 'playwright' package: pip install -e protocol -e '.[test]' (make test does)")
    if not CHROMIUM.exists():
        missing(f"the browser tests need {CHROMIUM}: apt-get install chromium (.ci/run does)")


@pytest.fixture(scope="module")
def demo_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """``dataflow-stream.yml`` as shipped."""
    require_browser()
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("demo-flow")) as flow:
        yield flow


def open_demo(tmp_path: Path, flow: Dataflow) -> Iterator[DemoPage]:
    """A fresh Chromium profile and the demo page loaded from ``flow``."""
    require_browser()
    from tests.browser.chromium import DemoPage, chromium_context

    with chromium_context(tmp_path / "profile", viewport={"width": 900, "height": 760}) as context:
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield DemoPage(page, flow.base_url).open()


@pytest.fixture
def demo(tmp_path: Path, demo_flow: Dataflow) -> Iterator[DemoPage]:
    yield from open_demo(tmp_path, demo_flow)
