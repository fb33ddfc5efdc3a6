"""The closed-loop sender (`timing_mode=concurrency`): N users, each sending its next
request when its previous answer arrives, for a number of requests or a duration.

It measures what a server sustains when it is never idle, as a saturating benchmark client
does.  There is no schedule: a request leaves when its user is free, so its latency is its
service latency, and a slow server slows the load down with it (coordinated omission by
design).  For latency under a given offered load, use the open loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import numpy as np

from rag.loadgen.schedule import Schedule
from rag.loadgen.sender import Sender, new_row


class ClosedLoopSender(Sender):
    """Sends `queries` in order, `concurrency` at a time, until `num_requests` are sent
    or `duration` seconds have passed (whichever is given, or first); one row per request
    sent, its `scheduled_s` the moment its user sent it (there is no schedule)."""

    def __init__(
        self,
        queries: Iterator[str],
        target: str,
        *,
        concurrency: int,
        num_requests: int = 0,
        duration: float = 0.0,
        path: str = "/rag",
        k: int = 2,
        assign: bool = False,
        timeout: float = 60.0,
        stop_grace: float = 5.0,
    ) -> None:
        if concurrency < 1 or (num_requests <= 0 and duration <= 0):
            raise ValueError("a closed loop needs concurrency >= 1 and num_requests or duration")
        nothing = Schedule(offsets=np.zeros(0), queries=[])
        super().__init__(
            nothing, target, path=path, k=k, assign=assign, timeout=timeout, stop_grace=stop_grace
        )
        self.queries = queries
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
            query = next(self.queries)
            body = self.body(query)
            now = time.perf_counter() - self.t0
            if now >= ends:
                return
            self.bodies.append(body)
            self.rows.append(new_row(i, query, now))
            self.launched += 1
            await self._request(i)
