"""Batch formation: sizes, the wait counted from the oldest request, no wait when full,
dropped cancelled requests, deadlines, admission by deadline, overload and draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

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
        self.gate.wait(10)
        self.batches.append(list(items))
        return [ValueError(item) if item.startswith("bad") else item.upper() for item in items]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def started(batcher: Batcher) -> Batcher:
    batcher.start()
    return batcher


async def wait_until_entered(recorder: Recorder) -> None:
    while not recorder.entered.is_set():
        await asyncio.sleep(0.005)


async def held(**knobs: float) -> tuple[Recorder, Batcher, asyncio.Future]:
    """A started batcher whose first batch (the one item "blocker") is running and held
    until the test sets `recorder.gate`."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = await started(Batcher(recorder, **knobs))
    blocker = asyncio.ensure_future(batcher.submit("blocker"))
    await wait_until_entered(recorder)
    return recorder, batcher, blocker


def test_full_batch_does_not_wait():
    async def scenario():
        recorder = Recorder()
        batcher = await started(Batcher(recorder, max_batch_size=4, max_wait_s=5, max_queue=16))
        begin = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(x) for x in "abcd"))
        elapsed = time.monotonic() - begin
        await batcher.stop()
        return recorder, results, elapsed

    recorder, results, elapsed = run(scenario())
    assert [r.value for r in results] == ["A", "B", "C", "D"]
    assert recorder.batches == [["a", "b", "c", "d"]]
    assert all(r.requests_in_batch == 4 for r in results)
    assert elapsed < 1.0  # far below max_wait_s = 5


def test_wait_is_counted_from_the_oldest_request():
    async def scenario():
        recorder = Recorder()
        batcher = await started(Batcher(recorder, max_batch_size=8, max_wait_s=0.4, max_queue=16))
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(0.25)
        second = asyncio.ensure_future(batcher.submit("second"))
        results = await asyncio.gather(first, second)
        await batcher.stop()
        return recorder, results

    recorder, (first, second) = run(scenario())
    assert recorder.batches == [["first", "second"]]
    # The batch closed 0.4 s after the first arrival, not 0.4 s after the second.
    assert 0.35 <= first.queue_s < 0.6
    assert second.queue_s < first.queue_s - 0.15


def test_lone_request_waits_at_most_max_wait():
    async def scenario():
        batcher = await started(Batcher(Recorder(), max_batch_size=8, max_wait_s=0.1, max_queue=4))
        result = await batcher.submit("only")
        await batcher.stop()
        return result

    result = run(scenario())
    assert result.requests_in_batch == 1
    assert 0.08 <= result.queue_s < 0.4


def test_batches_are_capped_at_max_batch_size():
    async def scenario():
        recorder, batcher, blocker = await held(max_batch_size=4, max_wait_s=0, max_queue=64)
        rest = [asyncio.ensure_future(batcher.submit(f"x{i}")) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        await asyncio.gather(blocker, *rest)
        await batcher.stop()
        return recorder, batcher

    recorder, batcher = run(scenario())
    assert [len(b) for b in recorder.batches] == [1, 4, 4, 2]
    assert batcher.batch_size_counts == {1: 1, 4: 2, 2: 1}
    assert [x for b in recorder.batches for x in b] == ["blocker"] + [f"x{i}" for i in range(1, 11)]


def test_cancelled_requests_are_dropped_before_compute():
    async def scenario():
        recorder, batcher, blocker = await held(max_batch_size=8, max_wait_s=0, max_queue=16)
        keep = asyncio.ensure_future(batcher.submit("keep"))
        leave = asyncio.ensure_future(batcher.submit("leave"))
        await asyncio.sleep(0.02)
        leave.cancel()
        await asyncio.sleep(0.02)
        recorder.gate.set()
        await asyncio.gather(blocker, keep)
        await batcher.stop()
        return recorder, leave

    recorder, leave = run(scenario())
    assert leave.cancelled()
    assert recorder.batches == [["blocker"], ["keep"]]


def test_request_past_its_timeout_gets_timeout_and_is_not_computed():
    async def scenario():
        recorder, batcher, blocker = await held(max_batch_size=8, max_wait_s=0, max_queue=16)
        with pytest.raises(TimeoutError):
            await batcher.submit("late", timeout_s=0.1)
        recorder.gate.set()
        await blocker
        await asyncio.sleep(0.05)
        await batcher.stop()
        return recorder

    recorder = run(scenario())
    assert recorder.batches == [["blocker"]]


def test_full_queue_is_refused_with_a_retry_estimate():
    async def scenario():
        recorder, batcher, running = await held(max_batch_size=1, max_wait_s=0, max_queue=2)
        queued = [asyncio.ensure_future(batcher.submit(f"q{i}")) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit("one too many")
        recorder.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return refused.value

    refused = run(scenario())
    assert refused.retry_after_s >= 1


def test_one_failing_item_does_not_fail_its_batch():
    async def scenario():
        batcher = await started(Batcher(Recorder(), max_batch_size=4, max_wait_s=1, max_queue=8))
        results = await asyncio.gather(
            *(batcher.submit(x) for x in ("ok1", "bad", "ok2", "ok3")), return_exceptions=True
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
        batcher = await started(Batcher(flaky, max_batch_size=2, max_wait_s=1, max_queue=8))
        failed = await asyncio.gather(
            batcher.submit("a"), batcher.submit("b"), return_exceptions=True
        )
        later = await batcher.submit("c")
        await batcher.stop()
        return failed, later

    failed, later = run(scenario())
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert later.value == "c"


def test_drain_refuses_new_work_and_finishes_queued_work():
    async def scenario():
        recorder = Recorder()
        recorder.gate.clear()
        batcher = await started(Batcher(recorder, max_batch_size=1, max_wait_s=0, max_queue=8))
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in ("a", "b")]
        await wait_until_entered(recorder)
        batcher.begin_drain()
        with pytest.raises(Draining):
            await batcher.submit("after drain")
        assert not await batcher.wait_idle(0.05)
        recorder.gate.set()
        assert await batcher.wait_idle(5)
        results = await asyncio.gather(*queued)
        await batcher.stop()
        return results

    assert [r.value for r in run(scenario())] == ["A", "B"]


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
    "one-at-a-time": dict(batch=1, measured={1: 10.0}, timeout=35, admitted=3, retry=5),
    # batches of 4, 8 s each, counted full: positions 1..3 are served by one batch (8 s),
    # 4..7 by two (16 s); position 8 would need three (24 s)
    "batches-fill-up": dict(batch=4, measured={4: 8.0}, timeout=17, admitted=8, retry=7),
    # after one pathological batch an idle batcher still admits one (its batch is measured)
    "idle-admits": dict(batch=1, measured={1: 100.0}, timeout=5, admitted=1, retry=195),
    # nothing measured yet: only the queue's bound refuses (a deadline long enough that no
    # request expires, and is dropped, while a slow machine fills the queue)
    "unmeasured": dict(batch=1, measured={}, timeout=3600, admitted=64, retry=1),
}


@pytest.mark.parametrize("case", sorted(ADMISSIONS))
def test_the_door_admits_what_the_measured_batches_serve_before_the_deadline(case):
    knobs = ADMISSIONS[case]

    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=knobs["batch"], max_wait_s=0, max_queue=64)
        for size, seconds in knobs["measured"].items():
            batcher.batch_times.record(size, seconds)
        return await queue_until_refused(batcher, timeout_s=knobs["timeout"])

    admitted, refusal = run(scenario())
    assert admitted == knobs["admitted"]
    assert refusal.retry_after_s == knobs["retry"]
    reason = "queue is full" if case == "unmeasured" else f"past its {knobs['timeout']} s deadline"
    assert reason in str(refusal)


def test_one_slow_batch_does_not_stop_the_batcher_for_good():
    async def scenario():
        recorder = Recorder()
        batcher = await started(Batcher(recorder, max_batch_size=1, max_wait_s=0, max_queue=8))
        batcher.batch_times.record(1, 100.0)  # one pathological batch
        result = await batcher.submit("next", timeout_s=5)  # idle: admitted; alone: computed
        await batcher.stop()
        return result, batcher

    result, batcher = run(scenario())
    assert result.value == "NEXT"
    assert batcher.batch_times.fastest(1) < 1  # measured afresh


def test_a_request_whose_deadline_falls_before_its_batch_ends_is_not_computed():
    async def scenario():
        recorder = Recorder()
        recorder.gate.clear()
        batcher = await started(Batcher(recorder, max_batch_size=1, max_wait_s=0, max_queue=8))
        batcher.batch_times.record(1, 1.0)
        blocker = asyncio.ensure_future(batcher.submit("blocker"))
        await wait_until_entered(recorder)
        late = asyncio.ensure_future(batcher.submit("late", timeout_s=2.2))  # fits: 1 + 1 s
        later = asyncio.ensure_future(batcher.submit("later", timeout_s=10))
        await asyncio.sleep(0.05)
        assert not late.done() and not later.done()
        # The running batch overruns to 1.5 s; then even at its fastest (1 s) a batch of
        # one would end 2.5 s after "late" arrived, past its 2.2 s deadline.
        await asyncio.sleep(1.5)
        recorder.gate.set()
        with pytest.raises(DeadlineExceeded, match="before a batch could end") as expired:
            await late
        await asyncio.gather(blocker, later)
        await batcher.stop()
        return recorder, batcher, expired

    recorder, batcher, _ = run(scenario())
    assert recorder.batches == [["blocker"], ["later"]]
    assert batcher.expired == 1


def test_an_oldest_request_that_its_batch_cannot_serve_in_time_gives_way():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_wait_s=0, max_queue=8)
        batcher.batch_times.record(4, 1.0)
        tight = asyncio.ensure_future(batcher.submit("tight", timeout_s=0.5))
        rest = [asyncio.ensure_future(batcher.submit(x, timeout_s=10)) for x in "bcde"]
        await asyncio.sleep(0)
        batcher.start()  # a batch of 4 takes 1 s at its fastest: too late for "tight"
        with pytest.raises(DeadlineExceeded, match="before a batch could end"):
            await tight
        done = await asyncio.gather(*rest)
        await batcher.stop()
        return recorder, batcher, done

    recorder, batcher, done = run(scenario())
    assert [r.value for r in done] == ["B", "C", "D", "E"]
    assert recorder.batches == [["b", "c", "d", "e"]]  # full, filled from behind
    assert batcher.expired == 1
