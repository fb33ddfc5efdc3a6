"""Time as an argument: what the request queue, the batchers and the replica pool read and
wait on, so that a test can run them on a clock it moves itself.

`MonotonicClock` is the real one: `time.monotonic()` and asyncio's timers.  `FakeClock`
stands still until the test calls `advance()`, which moves it and wakes, in deadline order,
every wait whose deadline has come.  What times out, and when, is then the test's own
arithmetic, never a matter of how busy the machine is.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale: only differences mean anything."""
        ...

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        """The awaitable's result, or TimeoutError once `timeout_s` has passed on this
        clock (`inf`: never); on a timeout the awaitable is cancelled, as
        `asyncio.wait_for` does."""
        ...


class MonotonicClock:
    """The machine's monotonic clock, with asyncio's timers for the waits."""

    def now(self) -> float:
        return time.monotonic()

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        return await asyncio.wait_for(awaitable, None if math.isinf(timeout_s) else timeout_s)


MONOTONIC = MonotonicClock()


class FakeClock:
    """A clock that moves only when told to, for tests; used from the event loop's thread.

    A wait registers its deadline; `advance(seconds)` moves the time and wakes each wait
    whose deadline is now reached, earliest first (in the order they were registered
    among equal deadlines).  `waiting` says how many waits are registered, so a test can
    wait for the code under test to have started waiting before it moves the time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._alarms: list[tuple[float, int, asyncio.Future[None]]] = []  # a heap
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    @property
    def waiting(self) -> int:
        """Waits registered whose deadline has not come."""
        return sum(1 for _, _, alarm in self._alarms if not alarm.done())

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        while self._alarms and self._alarms[0][0] <= self._now:
            _, _, alarm = heapq.heappop(self._alarms)
            if not alarm.done():
                alarm.set_result(None)

    async def wait_for(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        if math.isinf(timeout_s):
            return await awaitable
        work = asyncio.ensure_future(awaitable)
        alarm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if timeout_s <= 0:
            alarm.set_result(None)
        else:
            heapq.heappush(self._alarms, (self._now + timeout_s, next(self._order), alarm))
        try:
            await asyncio.wait({work, alarm}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            alarm.cancel()
        if work.done():
            return work.result()
        work.cancel()  # not awaited: that could swallow a cancellation of this waiter
        raise TimeoutError
