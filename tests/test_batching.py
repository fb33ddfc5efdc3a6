"""Batch formation on a fake clock: sizes, the wait counted from the oldest request, no
wait when full, dropped cancelled requests, deadlines, admission by deadline, overload,
draining and the service rate.  Time moves only when a test advances it, so what closes a
batch or expires a request is the test's arithmetic, not the machine's speed."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable

import pytest
from async_helpers import EVENT_S, run, soon, until

from rag.clock import FakeClock
from rag.service.batching import Batcher, BatchTimes, DeadlineExceeded, Draining, Overloaded


class Recorder:
    """A batch function that records what it computed and can be held closed."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, items: list[str]) -> list[str | BaseException]:
        self.entered.set()
        self.gate.wait(EVENT_S)
        self.batches.append(list(items))
        return [ValueError(item) if item.startswith("bad") else item.upper() for item in items]


def batcher_on(clock: FakeClock, recorder: Callable | None = None, **knobs: float) -> Batcher:
    """A started batcher on `clock` (call inside the event loop)."""
    batcher = Batcher(recorder or Recorder(), clock=clock, **knobs)
    batcher.start()
    return batcher


async def held(clock: FakeClock, **knobs: float) -> tuple[Recorder, Batcher, asyncio.Future]:
    """A started batcher whose first batch (the one item "blocker") is running and held
    until the test sets `recorder.gate`."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = batcher_on(clock, recorder, **knobs)
    blocker = asyncio.ensure_future(batcher.submit("blocker"))
    await until(recorder.entered.is_set, "the blocker computing")
    return recorder, batcher, blocker


def test_full_batch_does_not_wait():
    async def scenario():
        recorder, clock = Recorder(), FakeClock()
        batcher = batcher_on(clock, recorder, max_batch_size=4, max_wait_s=5, max_queue=16)
        # The clock never moves: a batch that waited for its timer would never close.
        results = await soon(asyncio.gather(*(batcher.submit(x) for x in "abcd")))
        await batcher.stop()
        return recorder, results

    recorder, results = run(scenario())
    assert [r.value for r in results] == ["A", "B", "C", "D"]
    assert recorder.batches == [["a", "b", "c", "d"]]
    assert all(r.requests_in_batch == 4 and r.queue_s == 0.0 for r in results)


def test_wait_is_counted_from_the_oldest_request():
    async def scenario():
        recorder, clock = Recorder(), FakeClock()
        batcher = batcher_on(clock, recorder, max_batch_size=8, max_wait_s=0.5, max_queue=16)
        first = asyncio.ensure_future(batcher.submit("first"))
        await until(lambda: batcher.depth == 1, "the first queued")
        clock.advance(0.25)
        second = asyncio.ensure_future(batcher.submit("second"))
        await until(lambda: batcher.depth == 2, "the second queued")
        clock.advance(0.25)  # 0.5 s after the first arrived, 0.25 s after the second
        results = await soon(asyncio.gather(first, second))
        await batcher.stop()
        return recorder, results

    recorder, (first, second) = run(scenario())
    assert recorder.batches == [["first", "second"]]
    assert (first.queue_s, second.queue_s) == (0.5, 0.25)


def test_lone_request_waits_max_wait_exactly():
    async def scenario():
        clock = FakeClock()
        batcher = batcher_on(clock, max_batch_size=8, max_wait_s=0.5, max_queue=4)
        only = asyncio.ensure_future(batcher.submit("only"))
        await until(lambda: batcher.depth == 1 and clock.waiting == 1, "its batch waiting")
        clock.advance(0.25)
        assert clock.waiting == 1  # its wait did not come due: the batch waits on
        clock.advance(0.25)
        result = await soon(only)
        await batcher.stop()
        return result

    result = run(scenario())
    assert result.requests_in_batch == 1
    assert result.queue_s == 0.5


def test_batches_are_capped_at_max_batch_size():
    async def scenario():
        clock = FakeClock()
        recorder, batcher, blocker = await held(clock, max_batch_size=4, max_wait_s=0, max_queue=64)
        rest = [asyncio.ensure_future(batcher.submit(f"x{i}")) for i in range(1, 11)]
        await until(lambda: batcher.depth == 10, "ten queued behind the blocker")
        recorder.gate.set()
        await soon(asyncio.gather(blocker, *rest))
        await batcher.stop()
        return recorder, batcher

    recorder, batcher = run(scenario())
    assert [len(b) for b in recorder.batches] == [1, 4, 4, 2]
    assert batcher.batch_size_counts == {1: 1, 4: 2, 2: 1}
    assert [x for b in recorder.batches for x in b] == ["blocker"] + [f"x{i}" for i in range(1, 11)]


def test_cancelled_requests_are_dropped_before_compute():
    async def scenario():
        clock = FakeClock()
        recorder, batcher, blocker = await held(clock, max_batch_size=8, max_wait_s=0, max_queue=16)
        keep = asyncio.ensure_future(batcher.submit("keep"))
        leave = asyncio.ensure_future(batcher.submit("leave"))
        await until(lambda: batcher.depth == 2, "both queued")
        leave.cancel()
        await until(lambda: batcher.depth == 1, "the cancelled one no longer waiting")
        recorder.gate.set()
        await soon(asyncio.gather(blocker, keep))
        await batcher.stop()
        return recorder, batcher, leave

    recorder, batcher, leave = run(scenario())
    assert leave.cancelled()
    assert recorder.batches == [["blocker"], ["keep"]]
    assert batcher.dropped == 1


def test_request_past_its_timeout_gets_timeout_and_is_not_computed():
    async def scenario():
        clock = FakeClock()
        recorder, batcher, blocker = await held(clock, max_batch_size=8, max_wait_s=0, max_queue=16)
        late = asyncio.ensure_future(batcher.submit("late", timeout_s=0.5))
        await until(lambda: clock.waiting == 1, "its deadline set")
        clock.advance(0.5)
        with pytest.raises(DeadlineExceeded, match=r"within its 0\.5 s deadline"):
            await soon(late)
        recorder.gate.set()
        await soon(blocker)
        await until(lambda: batcher.dropped == 1, "the worker past the expired request")
        await batcher.stop()
        return recorder

    recorder = run(scenario())
    assert recorder.batches == [["blocker"]]


def test_full_queue_is_refused_with_a_retry_estimate():
    async def scenario():
        clock = FakeClock()
        recorder, batcher, running = await held(clock, max_batch_size=1, max_wait_s=0, max_queue=2)
        queued = [asyncio.ensure_future(batcher.submit(f"q{i}")) for i in range(2)]
        await until(lambda: batcher.depth == 2, "the queue full")
        with pytest.raises(Overloaded, match="queue is full") as refused:
            await batcher.submit("one too many")
        recorder.gate.set()
        await soon(asyncio.gather(running, *queued))
        await batcher.stop()
        return refused.value

    refused = run(scenario())
    assert refused.retry_after_s >= 1


def test_one_failing_item_does_not_fail_its_batch():
    async def scenario():
        batcher = batcher_on(FakeClock(), max_batch_size=4, max_wait_s=1, max_queue=8)
        results = await soon(
            asyncio.gather(
                *(batcher.submit(x) for x in ("ok1", "bad", "ok2", "ok3")), return_exceptions=True
            )
        )
        await batcher.stop()
        return results

    results = run(scenario())
    assert isinstance(results[1], ValueError)
    assert [r.value for i, r in enumerate(results) if i != 1] == ["OK1", "OK2", "OK3"]


def test_a_failing_batch_fails_each_caller_and_the_worker_survives():
    calls = []

    def flaky(items: list[str]) -> list[str]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    async def scenario():
        batcher = batcher_on(FakeClock(), flaky, max_batch_size=2, max_wait_s=1, max_queue=8)
        failed = await soon(
            asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
        )
        batcher.max_batch_size = 1  # the next batch closes without the clock moving
        later = await soon(batcher.submit("c"))
        await batcher.stop()
        return failed, later

    failed, later = run(scenario())
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert later.value == "c"


def test_drain_refuses_new_work_and_finishes_queued_work():
    async def scenario():
        clock = FakeClock()
        recorder = Recorder()
        recorder.gate.clear()
        batcher = batcher_on(clock, recorder, max_batch_size=1, max_wait_s=0, max_queue=8)
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("a", "b")]
        await until(recorder.entered.is_set, "the first batch computing")
        batcher.begin_drain()
        with pytest.raises(Draining):
            await batcher.submit("after drain")
        idle = asyncio.ensure_future(batcher.wait_idle(1.0))
        await until(lambda: clock.waiting == 1, "the drain's wait set")
        clock.advance(1.0)
        assert await soon(idle) is False  # the batch still runs
        recorder.gate.set()
        assert await soon(batcher.wait_idle(math.inf))
        results = await soon(asyncio.gather(*queued))
        await batcher.stop()
        return results

    assert [r.value for r in run(scenario())] == ["A", "B"]


def test_a_draining_batcher_closes_a_waiting_batch_at_once():
    async def scenario():
        recorder, clock = Recorder(), FakeClock()
        batcher = batcher_on(clock, recorder, max_batch_size=8, max_wait_s=60, max_queue=8)
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("a", "b")]
        await until(lambda: batcher.depth == 2 and clock.waiting == 1, "the batch filling")
        batcher.begin_drain()  # nothing more can join: no reason to wait the 60 s
        results = await soon(asyncio.gather(*queued))
        await batcher.stop()
        return recorder, results

    recorder, results = run(scenario())
    assert recorder.batches == [["a", "b"]]
    assert [r.queue_s for r in results] == [0.0, 0.0]


def test_the_service_rate_is_smoothed_over_batches():
    async def scenario():
        clock = FakeClock()
        recorder, batcher, blocker = await held(clock, max_batch_size=1, max_wait_s=0, max_queue=8)
        clock.advance(0.5)  # the blocker's batch: 1 request in 0.5 s
        recorder.gate.set()
        await soon(blocker)
        rates = [batcher.service_rate]
        recorder.gate.clear()
        recorder.entered.clear()
        second = asyncio.ensure_future(batcher.submit("second"))
        await until(recorder.entered.is_set, "the second batch computing")
        clock.advance(0.125)  # 1 request in 0.125 s
        recorder.gate.set()
        await soon(second)
        rates.append(batcher.service_rate)
        await batcher.stop()
        return rates

    first, second = run(scenario())
    assert first == 2.0
    assert second == pytest.approx(0.3 * 8.0 + 0.7 * 2.0)  # the newest batch weighs 0.3


def test_invalid_knobs_are_rejected():
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch_size=0, max_wait_s=0, max_queue=1)


def test_batch_times_learn_the_likely_maximum_and_the_fastest():
    times = BatchTimes()
    assert times.likely_max(4) is None and times.fastest(4) is None
    times.record(4, 2.0)
    assert times.likely_max(4) == times.fastest(4) == 2.0
    for seconds in (1.5, 2.5) * 20:
        times.record(4, seconds)
    assert 3.0 < times.likely_max(4) < 5.0  # jitter of 0.5 s: room for it
    assert times.fastest(4) == 1.5


def test_batches_in_a_row_deviate_as_their_sum_not_each_at_its_slowest():
    times = BatchTimes(FakeClock())  # (a deviation decays as time passes)
    times.record(4, 8.0)
    times.record(4, 12.0)  # mean 8.5 s, deviation 1 s
    assert times.likely_max(4) == times.likely_total(4, 1) == pytest.approx(12.5)
    assert times.likely_total(4, 4) == pytest.approx(4 * 8.5 + 4 * 2 * 1.0)  # not 4 x 12.5


def test_one_slow_batch_stops_ruling_admission_once_its_size_goes_unmeasured():
    """After one outlier, a full batch's likely maximum passes any deadline; if admission
    then keeps full batches from running, the figure must still come back down."""
    clock = FakeClock()
    times = BatchTimes(clock)
    for _ in range(10):
        times.record(20, 2.0)
    assert times.likely_max(20) == pytest.approx(2.0)
    times.record(20, 12.0)  # one batch slowed by something else on the machine
    assert times.likely_max(20) > 10.0
    clock.advance(BatchTimes.STALE_HALF_LIFE_S)
    assert times.likely_max(20) == pytest.approx(3.25 + 4 * 2.5 / 2)  # the deviation halved
    clock.advance(5 * BatchTimes.STALE_HALF_LIFE_S)
    assert times.likely_max(20) < 4.0  # near the mean: full batches are admitted again
    times.record(20, 2.0)  # measured again: smoothed on from the decayed deviation
    assert times.likely_max(20) < 5.0  # (from the outlier's, it would be back over 10 s)


def test_batch_times_interpolate_sizes_not_seen():
    times = BatchTimes()
    times.record(2, 2.0)
    times.record(10, 6.0)
    assert times.likely_max(4) == pytest.approx(3.0)  # between the sizes seen
    assert times.likely_max(1) == times.fastest(1) == 2.0  # beyond them: the nearest
    assert times.likely_max(16) == times.fastest(16) == 6.0


async def queue_until_refused(batcher: Batcher, timeout_s: float) -> tuple[int, Overloaded]:
    """Submit until one is refused (the batcher is not started, so nothing is computed and
    admission is pure arithmetic over the measured batch times); (admitted, refusal)."""
    admitted = []
    while True:
        task = asyncio.ensure_future(batcher.submit("q", timeout_s))
        await asyncio.sleep(0)
        if task.done():
            with pytest.raises(Overloaded) as refused:
                task.result()
            for waiting in admitted:
                waiting.cancel()
            return len(admitted), refused.value
        admitted.append(task)


ADMISSIONS = {
    # one at a time, 10 s each: positions 0, 1, 2 end 10, 20, 30 s from now; the fourth
    # would take 40 s against a 35 s deadline
    "one-at-a-time": dict(batch=1, measured={1: (10.0,)}, timeout=35, admitted=3, retry=5),
    # batches of 4, 8 s each, counted full: positions 1..3 are served by one batch (8 s),
    # 4..7 by two (16 s); position 8 would need three (24 s)
    "batches-fill-up": dict(batch=4, measured={4: (8.0,)}, timeout=17, admitted=8, retry=7),
    # after one pathological batch an idle batcher still admits one (its batch is measured)
    "idle-admits": dict(batch=1, measured={1: (100.0,)}, timeout=5, admitted=1, retry=195),
    # nothing measured yet: only the queue's bound refuses (a deadline long enough that no
    # request expires, and is dropped, while a slow machine fills the queue)
    "unmeasured": dict(batch=1, measured={}, timeout=3600, admitted=64, retry=1),
    # batches of 4 measured at 8 then 12 s (mean 8.5, deviation 1): three batches likely
    # end within 3 x 8.5 + 4 x sqrt(3) = 32.4 s of a 36 s deadline (each at its likely
    # maximum, 12.5 s, they would not), four within 42 s
    "jittery-batches": dict(batch=4, measured={4: (8.0, 12.0)}, timeout=36, admitted=12, retry=6),
}


@pytest.mark.parametrize("case", sorted(ADMISSIONS))
def test_the_door_admits_what_the_measured_batches_serve_before_the_deadline(case):
    knobs = ADMISSIONS[case]

    async def scenario():
        batcher = Batcher(
            Recorder(), max_batch_size=knobs["batch"], max_wait_s=0, max_queue=64, clock=FakeClock()
        )
        for size, durations in knobs["measured"].items():
            for seconds in durations:
                batcher.batch_times.record(size, seconds)
        admitted, refusal = await queue_until_refused(batcher, timeout_s=knobs["timeout"])
        # What the core tells the HTTP process of the next arrival (its door)
        door = batcher.refusal(batcher.clock.now(), knobs["timeout"])
        return admitted, refusal, door, batcher.refused

    admitted, refusal, door, refused = run(scenario())
    assert admitted == knobs["admitted"]
    assert refusal.retry_after_s == knobs["retry"]
    reason = "queue is full" if case == "unmeasured" else f"past its {knobs['timeout']} s deadline"
    assert reason in str(refusal)
    assert refused == 1
    assert door is not None and str(Overloaded(*door)) == str(refusal)


def test_one_slow_batch_does_not_stop_the_batcher_for_good():
    async def scenario():
        batcher = batcher_on(FakeClock(), max_batch_size=1, max_wait_s=0, max_queue=8)
        batcher.batch_times.record(1, 100.0)  # one pathological batch
        result = await soon(batcher.submit("next", timeout_s=5))  # idle: admitted; alone: run
        await batcher.stop()
        return result, batcher

    result, batcher = run(scenario())
    assert result.value == "NEXT"
    assert batcher.batch_times.fastest(1) == 0.0  # measured afresh (no time passed)


def test_a_request_whose_deadline_falls_before_its_batch_ends_is_not_computed():
    async def scenario():
        recorder, clock = Recorder(), FakeClock()
        recorder.gate.clear()
        batcher = batcher_on(clock, recorder, max_batch_size=1, max_wait_s=0, max_queue=8)
        batcher.batch_times.record(1, 1.0)
        blocker = asyncio.ensure_future(batcher.submit("blocker"))
        await until(recorder.entered.is_set, "the blocker computing")
        late = asyncio.ensure_future(batcher.submit("late", timeout_s=2.25))  # fits: 1 + 1 s
        later = asyncio.ensure_future(batcher.submit("later", timeout_s=10))
        await until(lambda: batcher.depth == 2, "both admitted")
        # The running batch overruns to 1.5 s; then even at its fastest (1 s) a batch of
        # one would end 2.5 s after "late" arrived, past its 2.25 s deadline.
        clock.advance(1.5)
        recorder.gate.set()
        with pytest.raises(DeadlineExceeded, match="not started"):
            await soon(late)
        await soon(asyncio.gather(blocker, later))
        await batcher.stop()
        return recorder, batcher

    recorder, batcher = run(scenario())
    assert recorder.batches == [["blocker"], ["later"]]
    assert batcher.expired == 1


@pytest.mark.parametrize(
    ("behind", "batches"),
    [
        ("bcde", [["b", "c", "d", "e"]]),  # "e" would take the row: "tight" gives it up
        ("bcd", [["tight", "b", "c", "d"]]),  # no one would: "tight" may still make it
    ],
)
def test_a_row_another_request_wants_goes_to_one_likely_to_end_in_time(behind, batches):
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0, max_queue=8, clock=FakeClock())
        batcher.batch_times.record(4, 1.0)
        batcher.batch_times.record(4, 2.0)  # fastest 1 s, likely at most 1.125 + 4 x 0.25 s
        tight = asyncio.ensure_future(batcher.submit("tight", timeout_s=1.5))
        rest = [asyncio.ensure_future(batcher.submit(x, timeout_s=10)) for x in behind]
        await until(lambda: batcher.depth == 1 + len(behind), "all queued")
        batcher.start()
        outcomes = await soon(asyncio.gather(tight, *rest, return_exceptions=True))
        await batcher.stop()
        return recorder, outcomes

    recorder, outcomes = run(scenario())
    assert recorder.batches == batches
    computed = [o.value for o in outcomes if not isinstance(o, DeadlineExceeded)]
    assert len(computed) == sum(map(len, batches))


def test_a_batch_is_worth_starting_at_its_likely_maximum_when_a_row_is_wanted():
    times = BatchTimes(FakeClock())
    assert times.worth_starting(4, 0.0, row_wanted=True)  # nothing measured: start
    times.record(4, 1.0)
    times.record(4, 2.0)
    assert times.likely_max(4) == 2.125 and times.fastest(4) == 1.0
    assert times.worth_starting(4, 1.5, row_wanted=False)
    assert not times.worth_starting(4, 1.5, row_wanted=True)
    assert times.worth_starting(4, 2.125, row_wanted=True)


def test_an_oldest_request_that_its_batch_cannot_serve_in_time_gives_way():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0, max_queue=8, clock=FakeClock())
        batcher.batch_times.record(4, 1.0)
        tight = asyncio.ensure_future(batcher.submit("tight", timeout_s=0.5))
        rest = [asyncio.ensure_future(batcher.submit(x, timeout_s=10)) for x in "bcde"]
        await until(lambda: batcher.depth == 5, "all five queued")
        batcher.start()  # a batch of 4 takes 1 s at its fastest: too late for "tight"
        with pytest.raises(DeadlineExceeded, match="not started"):
            await soon(tight)
        done = await soon(asyncio.gather(*rest))
        await batcher.stop()
        return recorder, batcher, done

    recorder, batcher, done = run(scenario())
    assert [r.value for r in done] == ["B", "C", "D", "E"]
    assert recorder.batches == [["b", "c", "d", "e"]]  # full, filled from behind
    assert batcher.expired == 1
