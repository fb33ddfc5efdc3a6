"""Waiting for events inside a test's event loop, with a deadline in real seconds: for a
state the code under test must reach, or a result that must come without a fake clock
moving.  A missed deadline fails the test (AssertionError), never passes for a timeout the
test expects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
EVENT_S = 10.0  # real seconds an awaited event may take on a busy machine


def run(scenario: Awaitable[T]) -> T:
    """Run a test's scenario on a fresh event loop."""
    return asyncio.run(asyncio.wait_for(scenario, 6 * EVENT_S))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until `condition` holds."""
    deadline = time.monotonic() + EVENT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {EVENT_S} s: {what}"
        await asyncio.sleep(0.001)


async def soon(awaitable: Awaitable[T]) -> T:
    """The awaitable's result (or its exception), which must come within EVENT_S."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=EVENT_S)
    assert done, f"no result within {EVENT_S} s"
    return task.result()
