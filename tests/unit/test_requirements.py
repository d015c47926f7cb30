"""A missing requirement skips a test locally and fails it under CI (tests/requirements.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.dataflow import ROOT
from tests.requirements import missing, under_ci


@pytest.mark.parametrize(
    "value, expected", [("", False), ("0", False), ("false", False), ("true", True), ("1", True), ("True", True)]
)
def test_under_ci_reads_the_ci_variable(value: str, expected: bool) -> None:
    assert under_ci({"CI": value}) is expected
    assert under_ci({}) is False


def test_missing_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        missing("no chromium")


def test_missing_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="instead of skipping: no chromium"):
        missing("no chromium")


# The browser suite with playwright made unimportable: it collects, then skips (locally) or
# fails (CI) before starting any dataflow, naming what is missing.
NO_PLAYWRIGHT = (
    "import sys, pytest; sys.modules['playwright'] = None; "
    "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', '-p', 'no:randomly', 'tests/browser']))"
)


# Under CI the fixtures fail, which pytest reports as errors at setup, never as a collection error.
@pytest.mark.parametrize("ci, returncode, outcome", [("", 0, "skipped"), ("true", 1, "errors")])
def test_the_browser_suite_without_playwright(ci: str, returncode: int, outcome: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "CI": ci, "HOME": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NO_PLAYWRIGHT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ERROR collecting" not in done.stdout and "Interrupted" not in done.stdout, done.stdout[-3000:]
    assert outcome in done.stdout.splitlines()[-1] and "playwright" in done.stdout, done.stdout[-3000:]
