"""A dynamic batcher for a blocking batch function, in the style of Ray Serve's
`@serve.batch` and Triton's dynamic batcher.

Requests wait in a bounded queue.  A batch closes when it holds `max_batch_size` live
requests or when the *oldest* waiting request has waited `max_wait_s`, whichever comes
first, so a full queue never waits and a lone request waits at most `max_wait_s`.  Requests
whose caller has gone (cancelled future: client disconnected or timed out) are dropped
before they are computed.  The batch function runs in one worker thread, off the event
loop, one batch at a time.  It knows nothing of models or HTTP.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Weight of the newest batch in the running estimate of the service rate.
RATE_SMOOTHING = 0.3


class Overloaded(Exception):
    """The queue is full; the caller should come back after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(frozen=True)
class Completed(Generic[R]):
    value: R
    queue_s: float  # from arrival to the start of the batch that computed it
    batch_size: int


@dataclass(frozen=True)
class BatchRecord:
    size: int
    duration_s: float


@dataclass(eq=False)
class _Waiting(Generic[T]):
    item: T
    arrival: float
    future: asyncio.Future = field(repr=False)


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[BatchRecord], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        """`executor` runs the batches (one at a time); by default a thread of its own."""
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.batch_size_counts: Counter[int] = Counter()
        self.service_rate: float | None = None  # requests per second, smoothed
        self.dropped = 0  # requests whose caller left (or timed out) before compute
        self._queue: deque[_Waiting[T]] = deque()
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = 0  # requests in the batch being computed
        self._draining = False
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._worker: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the one being computed)."""
        return sum(1 for waiting in self._queue if not waiting.future.done())

    @property
    def in_flight(self) -> int:
        return self.depth + self._running

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._serve_forever())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for waiting in self._queue:
            if not waiting.future.done():
                waiting.future.set_exception(Draining("server stopped"))
        self._queue.clear()
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    def begin_drain(self) -> None:
        """Refuse new work; what is queued or running still completes."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from the measured service rate."""
        rate = self.service_rate or 1.0
        return max(1, math.ceil(self.in_flight / rate))

    async def submit(self, item: T, timeout_s: float | None = None) -> Completed[R]:
        """Queue one item and wait for its result.

        Raises Overloaded (queue full), Draining, TimeoutError (waited longer than
        `timeout_s`; the item is then not computed), or what the batch function raised.
        """
        if self._draining:
            raise Draining("server is draining")
        if len(self._queue) >= self.max_queue:
            self._drop_abandoned()
            if len(self._queue) >= self.max_queue:
                raise Overloaded(self.retry_after_s())
        waiting = _Waiting(item, time.monotonic(), asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        self._idle.clear()
        self._arrived.set()
        # Cancelling the future (timeout, or this coroutine cancelled because the client
        # left) is what tells the worker to skip the item.
        return await asyncio.wait_for(waiting.future, timeout_s)

    def _drop_abandoned(self) -> None:
        before = len(self._queue)
        self._queue = deque(w for w in self._queue if not w.future.done())
        self.dropped += before - len(self._queue)

    async def _next_batch(self) -> list[_Waiting[T]]:
        """Wait for the batch to close and return its live requests."""
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if len(self._queue) >= self.max_batch_size:
                break
            remaining = self._queue[0].arrival + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        count = min(self.max_batch_size, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.monotonic()
            self._running = len(batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [w.item for w in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
            except Exception as exc:  # the batch failed as a whole: every caller hears why
                results = [exc] * len(batch)
            duration = time.monotonic() - started
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
        rate = record.size / max(record.duration_s, 1e-6)
        previous = self.service_rate
        self.service_rate = (
            rate if previous is None else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * previous
        )
        if self.on_batch is not None:
            self.on_batch(record)
