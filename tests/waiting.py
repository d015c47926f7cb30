"""Wait for a condition, not for a time: tests synchronise on what they need to be true.

A ``sleep`` followed by an assertion passes or fails with the machine's load;
polling the condition itself, with a bounded deadline, is both faster on an
idle machine and correct on a starved one. On timeout the failure names what
was awaited and the last value the predicate returned.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout_s: float = 5.0,
    interval_s: float = 0.005,
    what: str = "the condition",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns a truthy value; return that value.

    Raises ``AssertionError`` naming ``what`` if it is still falsy after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last value: {value!r})")
        await asyncio.sleep(interval_s)
