"""The closed-loop sender (`timing_mode=concurrency`): N users, each sending its next
request when its previous answer arrives, for a number of requests or a duration.

It measures what a server sustains when it is never idle, as a saturating benchmark client
does.  There is no schedule: a request leaves when its user is free, so its latency is its
service latency, and a slow server slows the load down with it (coordinated omission by
design).  A user refused with a `Retry-After` (429, 503) waits that long before its next
request, as a client library does: retrying at once would measure how fast the server
says no, and take from its computation the processor that saying no costs.  For latency
under a given offered load, use the open loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator

import numpy as np

from rag.loadgen.apis import Api
from rag.loadgen.schedule import Schedule
from rag.loadgen.sender import Sender, new_row


class ClosedLoopSender(Sender):
    """Sends `requests` (query, max_tokens) in order, `concurrency` at a time, until
    `num_requests` are sent or `duration` seconds have passed (whichever is given, or
    first); one row per request sent, its `scheduled_s` the moment its user sent it (there
    is no schedule, so its latency and time to first token run from its send)."""

    def __init__(
        self,
        requests: Iterator[tuple[str, int]],
        target: str,
        api: Api,
        *,
        concurrency: int,
        num_requests: int = 0,
        duration: float = 0.0,
        path: str = "",
        assign: bool = False,
        timeout: float = 60.0,
        stop_grace: float = 5.0,
    ) -> None:
        if concurrency < 1 or (num_requests <= 0 and duration <= 0):
            raise ValueError("a closed loop needs concurrency >= 1 and num_requests or duration")
        nothing = Schedule(offsets=np.zeros(0), queries=[], max_tokens=[])
        super().__init__(
            nothing, target, api, path=path, assign=assign, timeout=timeout, stop_grace=stop_grace
        )
        self.requests = requests
        self.concurrency = concurrency
        self.num_requests = num_requests
        self.duration = duration

    @property
    def planned(self) -> int | None:
        return self.num_requests or None

    async def _send_all(self, stop: asyncio.Event, pending: set[asyncio.Task[None]]) -> None:
        """Start the users; `_drain` waits for them as for requests in flight."""
        self.t0 = time.perf_counter()
        create_task = asyncio.get_running_loop().create_task
        for _ in range(self.concurrency):
            task = create_task(self._user(stop))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _user(self, stop: asyncio.Event) -> None:
        """One user: request after request, each as soon as the previous one has ended,
        until the requests or the duration run out."""
        limit = self.num_requests if self.num_requests > 0 else math.inf
        ends = self.duration if self.duration > 0 else math.inf
        while not stop.is_set() and (i := len(self.rows)) < limit:
            query, max_tokens = next(self.requests)
            body = self.body(query, max_tokens)
            now = time.perf_counter() - self.t0
            if now >= ends:
                return
            self.bodies.append(body)
            self.rows.append(new_row(i, query, max_tokens, now))
            self.launched += 1
            await self._request(i)
            if (pause := self.rows[i].get("retry_after_s")) is not None:
                await _wait_unless(stop, min(pause, ends - (time.perf_counter() - self.t0)))


async def _wait_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
