"""Regression: a stream whose answer ended in the same loop turn as it began to wait held its headers for the whole
header grace period (2 s): ``asyncio.wait_for`` ran the waiting coroutine as a task of its own, so the waiter was
listed only after the end had already woken nobody. The split-invariance suite found it (answers of empty pieces
delivered in one batch)."""

from __future__ import annotations

import asyncio

from openai_stream_protocol import Chunk
from openai_stream_server.state import StreamState


async def test_an_end_in_the_same_turn_wakes_a_timed_wait() -> None:
    state = StreamState("chatcmpl-1", "m", "chat")
    # Runs before anything the wait below schedules: the end lands after the check, before a waiter task would start.
    asyncio.get_running_loop().call_soon(state.accept, Chunk("chatcmpl-1", 0, "", fin=True, finish_reason="stop"), 0.0)
    async with asyncio.timeout(5):  # not wait_for: that would run the wait as a task, after the end
        await state.wait(0, timeout_s=3600)
    assert state.done and not state._waiters


async def test_a_timed_out_wait_leaves_no_waiter_behind() -> None:
    state = StreamState("chatcmpl-2", "m", "chat")
    await state.wait(0, timeout_s=0.01)
    assert not state.done and not state._waiters
