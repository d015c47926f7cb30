"""What a test does when something it needs is missing: skip locally, fail under CI.

A suite that skips silently in CI is a hole nobody sees. CI services set
``CI=true`` (``.ci/run`` does too), and then a missing requirement fails the
test with a message naming what is missing and how to install it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest


def under_ci(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> NoReturn:
    """Skip the test because ``what`` (a sentence: what is missing and how to get it) is missing; fail under CI."""
    if under_ci():
        pytest.fail(f"CI is set, so this fails instead of skipping: {what}", pytrace=False)
    pytest.skip(what)
