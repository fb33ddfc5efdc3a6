"""The clocks time is passed in as: the fake one moves only when advanced and wakes the
waits whose deadline came, in deadline order; both cancel what timed out."""

from __future__ import annotations

import asyncio
import math

import pytest
from async_helpers import run, soon, until

from rag.clock import MONOTONIC, FakeClock


async def until_waiting(clock: FakeClock, n: int) -> None:
    await until(lambda: clock.waiting == n, f"{n} waits registered")


def test_advance_wakes_the_waits_whose_deadline_came_earliest_first():
    async def scenario():
        clock = FakeClock(start=100.0)
        woken: list[tuple[str, float]] = []

        async def wait(name: str, seconds: float) -> None:
            with pytest.raises(TimeoutError):
                await clock.wait_for(asyncio.Event().wait(), seconds)
            woken.append((name, clock.now()))

        tasks = [asyncio.ensure_future(wait(n, s)) for n, s in (("c", 3), ("a", 1), ("b", 2))]
        await until_waiting(clock, 3)
        clock.advance(0.5)
        assert clock.waiting == 3  # no deadline came: nothing woken
        clock.advance(1.0)
        await until(lambda: len(woken) == 1, "the first woken")
        clock.advance(10.0)
        await soon(asyncio.gather(*tasks))
        return woken

    assert run(scenario()) == [("a", 101.5), ("b", 111.5), ("c", 111.5)]


def test_a_result_before_the_deadline_is_returned_and_its_wait_withdrawn():
    async def scenario():
        clock = FakeClock()
        future = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(clock.wait_for(future, 5.0))
        await until_waiting(clock, 1)
        future.set_result("answer")
        result = await soon(waiting)
        return result, clock.waiting

    assert run(scenario()) == ("answer", 0)


def test_a_timeout_cancels_what_was_awaited():
    async def scenario():
        clock = FakeClock()
        future = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(clock.wait_for(future, 0.25))
        await until_waiting(clock, 1)
        clock.advance(0.25)
        with pytest.raises(TimeoutError):
            await soon(waiting)
        return future

    assert run(scenario()).cancelled()


def test_cancelling_the_waiter_cancels_what_it_awaited():
    async def scenario():
        clock = FakeClock()
        future = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(clock.wait_for(future, 5.0))
        await until_waiting(clock, 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return future, clock.waiting

    future, still_waiting = run(scenario())
    assert future.cancelled() and still_waiting == 0


def test_no_deadline_registers_no_wait_and_a_past_one_times_out_at_once():
    async def scenario():
        clock = FakeClock()
        future = asyncio.get_running_loop().create_future()
        forever = asyncio.ensure_future(clock.wait_for(future, math.inf))
        await asyncio.sleep(0)
        registered = clock.waiting
        future.set_result(1)
        with pytest.raises(TimeoutError):
            await clock.wait_for(asyncio.Event().wait(), 0.0)
        return registered, await forever

    assert run(scenario()) == (0, 1)


def test_a_clock_does_not_go_back():
    with pytest.raises(ValueError):
        FakeClock().advance(-1.0)


def test_the_monotonic_clock_moves_and_times_out():
    async def scenario():
        before = MONOTONIC.now()
        ready = asyncio.get_running_loop().create_future()
        ready.set_result("now")
        assert await MONOTONIC.wait_for(ready, 0.0) == "now"
        with pytest.raises(TimeoutError):
            await MONOTONIC.wait_for(asyncio.Event().wait(), 0.0)
        return MONOTONIC.now() >= before

    assert run(scenario())
