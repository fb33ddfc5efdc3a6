"""A dynamic batcher for a blocking batch function, in the style of Ray Serve's
`@serve.batch` and Triton's dynamic batcher: between a server's HTTP handlers and its
pipeline (the base and batched variants; `RequestQueue`, the part every serving loop
shares, is also the continuous loop's).

Requests wait in a bounded queue.  A batch closes when it holds `max_batch_size` live
requests or when the *oldest* waiting request has waited `max_wait_s`, whichever comes
first, so a full queue never waits and a lone request waits at most `max_wait_s`.  Requests
whose caller has gone (cancelled future: client disconnected or timed out) are dropped
before they are computed.  The batch function runs in one worker thread, off the event
loop, one batch at a time.  It knows nothing of models or HTTP.

Admission is by deadline: each request has one (`timeout_s` after it arrives).  From the
batch durations measured so far, a request that could not be served before its deadline
behind the queue ahead of it is refused at once (Overloaded, with the seconds after which
it would fit), and a batch never starts with a request whose deadline falls before the
batch could end (DeadlineExceeded): under overload the server keeps computing full batches
of answers that are still wanted, and a refused client learns it in milliseconds.  The door
is wary (full batches, each as long as ordinary jitter rarely exceeds), the batch start is
not (the fastest such a batch has run), so what was admitted is rarely dropped.  Every
estimate comes from batches that ran, so none may stop batches from running: an idle
batcher admits a request whatever its estimates say, and a request alone in the queue is
computed (it delays no one, and its batch is measured afresh).

Every time it reads, and every timed wait (a batch's `max_wait_s`, a request's deadline), is
on the clock it is given (`rag.clock`), so tests run it on a fake one.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rag.clock import MONOTONIC, Clock

T = TypeVar("T")
R = TypeVar("R")

# Weight of the newest batch in the running estimate of the service rate.
SMOOTHING = 0.3


class Overloaded(Exception):
    """Refused at the door: the caller should come back after `retry_after_s` (>= 1)."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(round(retry_after_s, 3)))  # whole seconds
        super().__init__(f"{reason}; retry after {self.retry_after_s} s")


class Draining(Exception):
    """The batcher is shutting down and takes no new work."""


class DeadlineExceeded(TimeoutError):
    """The request could not be served before its deadline; it was not computed."""

    @classmethod
    def after(cls, timeout_s: float) -> DeadlineExceeded:
        """The request's `timeout_s` ran out before its answer was ready."""
        return cls(f"not answered within its {timeout_s:.4g} s deadline")

    @classmethod
    def unstarted(cls) -> DeadlineExceeded:
        """The request was never computed: `BatchTimes.worth_starting` said no."""
        return cls("not started: it would likely end past its deadline")


@dataclass(frozen=True)
class Completed(Generic[R]):
    value: R
    queue_s: float  # from arrival to the start of the batch that computed it
    requests_in_batch: int  # computed together, this one included, whatever their outcome


class BatchTimes:
    """How long a batch of n takes, learned from the batches computed.

    Per batch size: a smoothed duration and a smoothed deviation, combined as TCP combines
    round-trip samples into its retransmission timeout (RFC 6298: mean + 4 x deviation),
    for a `likely_max` that ordinary jitter rarely exceeds; and the `fastest` such a batch
    has run.  A size not seen yet is interpolated linearly between the sizes seen around
    it (beyond them, the nearest one), until a batch of that size runs and is measured.

    A deviation halves every `STALE_HALF_LIFE_S` its size goes unmeasured.  One slow batch
    can raise a full batch's likely maximum past every deadline; admission then lets in only
    what an idle server can take, so no full batch runs to correct the figure, and without
    the decay the server would stay at batches of one.
    """

    STALE_HALF_LIFE_S = 10.0

    def __init__(self, clock: Clock = MONOTONIC) -> None:
        self.clock = clock
        self._mean: dict[int, float] = {}
        self._deviation: dict[int, float] = {}
        self._fastest: dict[int, float] = {}
        self._measured_at: dict[int, float] = {}

    def record(self, size: int, seconds: float) -> None:
        now = self.clock.now()
        mean = self._mean.get(size)
        if mean is None:
            self._mean[size], self._deviation[size], self._fastest[size] = seconds, 0.0, seconds
        else:
            deviation = self._current_deviation(size, now)
            self._deviation[size] = 0.75 * deviation + 0.25 * abs(mean - seconds)
            self._mean[size] = 0.875 * mean + 0.125 * seconds
            self._fastest[size] = min(self._fastest[size], seconds)
        self._measured_at[size] = now

    def likely_max(self, size: int) -> float | None:
        """Seconds a batch of `size` rarely exceeds; None before any batch was measured."""
        return self.likely_total(size, 1)

    def likely_total(self, size: int, count: int) -> float | None:
        """Seconds `count` batches of `size`, one after another, rarely exceed: their means
        and 4 deviations of their sum.  Slow batches come and go independently, so the sum
        deviates by sqrt(count) deviations, not count: a queue of many batches is not
        judged as if each of them were its slowest."""
        now = self.clock.now()
        deviations = {n: self._current_deviation(n, now) for n in self._mean}
        mean, deviation = _interpolate(self._mean, size), _interpolate(deviations, size)
        if mean is None or deviation is None:
            return None
        return count * mean + 4 * math.sqrt(count) * deviation

    def _current_deviation(self, size: int, now: float) -> float:
        age = now - self._measured_at[size]
        return self._deviation[size] * 0.5 ** (age / self.STALE_HALF_LIFE_S)

    def fastest(self, size: int) -> float | None:
        """The shortest a batch of `size` has taken; None before any batch was measured."""
        return _interpolate(self._fastest, size)

    def worth_starting(self, size: int, left_s: float, row_wanted: bool) -> bool:
        """Whether to start a request with `left_s` to its deadline in a batch of `size`.
        When another request waits for its row (`row_wanted`), only if the batch will
        likely end in time: a row given to a request that misses its deadline is work
        thrown away, and goodput lost.  Otherwise whenever it could (at the fastest such a
        batch has run): the row would stay empty."""
        seconds = self.likely_max(size) if row_wanted else self.fastest(size)
        return left_s >= (seconds or 0.0)


def _interpolate(by_size: dict[int, float], size: int) -> float | None:
    if not by_size:
        return None
    sizes = sorted(by_size)
    above = bisect.bisect_left(sizes, size)
    if above == 0 or above == len(sizes):
        return by_size[sizes[min(above, len(sizes) - 1)]]
    low, high = sizes[above - 1], sizes[above]
    share = (size - low) / (high - low)
    return by_size[low] + share * (by_size[high] - by_size[low])


@dataclass(frozen=True)
class BatchRecord:
    size: int
    duration_s: float


@dataclass(eq=False)
class _Waiting(Generic[T]):
    item: T
    arrival: float
    deadline: float
    future: asyncio.Future = field(repr=False)


class RequestQueue:
    """What a loop serving queued requests one step at a time shares, whatever a step is
    (a whole batch, or one iteration of a running batch): the bounded queue, admission by
    deadline at the door, the worker task, draining and idleness, and the smoothed service
    rate.  Subclasses say how busy they are (`running`, `likely_finish`) and serve the
    queue (`_serve_forever`).  Every time read and every timed wait goes through `clock`."""

    def __init__(self, max_queue: int, clock: Clock = MONOTONIC) -> None:
        self.max_queue = max_queue
        self.clock = clock
        self.dropped = 0  # requests whose caller left (or timed out) before compute
        self.expired = 0  # requests not computed because they could not end in time
        self.refused = 0  # requests refused at the door (Overloaded)
        self.service_rate: float | None = None  # requests answered per second, smoothed
        self._queue: deque = deque()  # items with a `future`
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._worker: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        """Requests waiting (not counting those being computed)."""
        return sum(1 for waiting in self._queue if not waiting.future.done())

    @property
    def in_flight(self) -> int:
        return self.depth + self.running

    def likely_finish(self, now: float, ahead: int) -> float | None:
        raise NotImplementedError

    async def _serve_forever(self) -> None:
        raise NotImplementedError

    def _pending(self) -> list:
        """Every request still owed an answer (queued, and computing if the step can be
        left)."""
        return list(self._queue)

    def _retry_after_full(self, now: float) -> float:
        """Seconds until a full queue will likely have room."""
        return 1.0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._serve_forever())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for waiting in self._pending():
            if not waiting.future.done():
                waiting.future.set_exception(Draining("server stopped"))
        self._queue.clear()

    def begin_drain(self) -> None:
        """Refuse new work; what is queued or running still completes, without waiting
        for company (nothing will join it any more)."""
        self._draining = True
        self._arrived.set()  # wakes a worker waiting for its batch to fill

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; False if `timeout_s` passed first."""
        try:
            await self.clock.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _observe_service(self, answered: int, seconds: float) -> None:
        """Fold one step (`answered` requests in `seconds`) into the smoothed service
        rate, the newest step weighing SMOOTHING."""
        rate = answered / max(seconds, 1e-6)
        previous = self.service_rate
        self.service_rate = (
            rate if previous is None else SMOOTHING * rate + (1 - SMOOTHING) * previous
        )

    def refusal(self, now: float, timeout_s: float) -> tuple[str, float] | None:
        """Why a request arriving `now` with `timeout_s` would be refused (the queue is
        full, or the requests ahead could not be served before its deadline), and the
        seconds until one would fit; None when it would be admitted.  An idle server admits
        whatever its estimates say."""
        if len(self._queue) >= self.max_queue:
            self._drop_abandoned()
        ahead = self.depth
        if ahead >= self.max_queue:
            return f"the queue is full ({ahead} waiting)", self._retry_after_full(now)
        finish = self.likely_finish(now, ahead) if self.in_flight else None
        if finish is not None and finish > now + timeout_s:
            reason = (
                f"{ahead} requests queued ahead; this one would be answered in about "
                f"{finish - now:.1f} s, past its {timeout_s:.4g} s deadline"
            )
            return reason, finish - (now + timeout_s)
        return None

    def _admit(self, now: float, timeout_s: float) -> None:
        """Raise Draining, or Overloaded for a `refusal`."""
        if self._draining:
            raise Draining("the server is draining")
        refused = self.refusal(now, timeout_s)
        if refused is not None:
            self.refused += 1
            raise Overloaded(*refused)

    async def _wait(self, waiting: Any, timeout_s: float) -> Any:
        """Queue a request and wait for its future, for at most `timeout_s`.  Cancelling
        the future (timeout, or the caller cancelled because the client left) is what
        tells the worker to skip it."""
        self._queue.append(waiting)
        self._idle.clear()
        self._arrived.set()
        try:
            return await self.clock.wait_for(waiting.future, timeout_s)
        except DeadlineExceeded:
            raise
        except TimeoutError:
            raise DeadlineExceeded.after(timeout_s) from None

    def _drop_abandoned(self) -> None:
        before = len(self._queue)
        self._queue = deque(w for w in self._queue if not w.future.done())
        self.dropped += before - len(self._queue)


class Batcher(RequestQueue, Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchRecord], None] | None = None,
        executor: Executor | None = None,
        clock: Clock = MONOTONIC,
    ) -> None:
        """`executor` runs the batches (one at a time); by default a thread of its own."""
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        super().__init__(max_queue, clock)
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.batch_size_counts: Counter[int] = Counter()
        self.batch_times = BatchTimes(clock)
        self._busy_until = 0.0  # when the running batch will likely have ended
        self._running = 0  # requests in the batch being computed
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")

    @property
    def running(self) -> int:
        """Requests in the batch being computed."""
        return self._running

    async def stop(self) -> None:
        await super().stop()
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    def likely_finish(self, now: float, ahead: int) -> float | None:
        """When a request arriving `now` behind `ahead` queued requests will likely have
        been answered: the running batch's rest, the full batches ahead, then its own, which
        may fill up while it waits; None before any batch was measured."""
        count = ahead // self.max_batch_size + 1
        batches = self.batch_times.likely_total(self.max_batch_size, count)
        if batches is None:
            return None
        return now + self._running_rest(now) + self.max_wait_s + batches

    def _running_rest(self, now: float) -> float:
        return max(0.0, self._busy_until - now) if self._running else 0.0

    def _retry_after_full(self, now: float) -> float:
        return self._running_rest(now)  # room comes when the running batch ends

    async def submit(self, item: T, timeout_s: float = math.inf) -> Completed[R]:
        """Queue one item and wait for its result, for at most `timeout_s`.

        Raises Overloaded (queue full, or the queue ahead cannot be served within
        `timeout_s`), Draining, DeadlineExceeded (not served in time; then not computed),
        or what the batch function raised.
        """
        now = self.clock.now()
        self._admit(now, timeout_s)
        future = asyncio.get_running_loop().create_future()
        return await self._wait(_Waiting(item, now, now + timeout_s, future), timeout_s)

    async def _next_batch(self) -> list[_Waiting[T]]:
        """Wait for the batch to close and return its live requests that it can answer in
        time.  A draining batcher closes it at once: nothing more will join."""
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if len(self._queue) >= self.max_batch_size or self._draining:
                break
            remaining = self._queue[0].arrival + self.max_wait_s - self.clock.now()
            if remaining <= 0:
                break
            self._arrived.clear()
            with suppress(TimeoutError):
                await self.clock.wait_for(self._arrived.wait(), remaining)
        return self._take_in_time(self.clock.now())

    def _take_in_time(self, now: float) -> list[_Waiting[T]]:
        """A batch as full as the queue allows, worth starting for its oldest request
        (`BatchTimes.worth_starting`: a request left out would take its row if the queue
        holds more than a batch).  An oldest request it is not worth starting for is
        answered DeadlineExceeded and never computed, and the batch fills from behind;
        except a request alone in the queue (it costs no one and refreshes the
        estimates)."""
        while self._queue:
            first = self._queue[0]
            size = min(self.max_batch_size, len(self._queue))
            row_wanted = len(self._queue) > size
            if (
                self.batch_times.worth_starting(size, first.deadline - now, row_wanted)
                or len(self._queue) == 1
            ):
                return [self._queue.popleft() for _ in range(size)]
            self._queue.popleft()
            self.expired += 1
            first.future.set_exception(DeadlineExceeded.unstarted())
        return []

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = self.clock.now()
            self._running = len(batch)
            self._busy_until = started + (self.batch_times.likely_max(len(batch)) or 0.0)
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [w.item for w in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            except Exception as exc:  # the batch failed as a whole: every caller hears why
                results = [exc] * len(batch)
            duration = self.clock.now() - started
            self._running = 0
            self._record(BatchRecord(len(batch), duration))
            for waiting, result in zip(batch, results, strict=True):
                if waiting.future.done():  # caller left while the batch ran
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(
                        Completed(result, started - waiting.arrival, len(batch))
                    )

    def _record(self, record: BatchRecord) -> None:
        self.batch_size_counts[record.size] += 1
        self.batch_times.record(record.size, record.duration_s)
        self._observe_service(record.size, record.duration_s)
        if self.on_batch is not None:
            self.on_batch(record)
