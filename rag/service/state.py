"""What the HTTP handlers of one server share: the link to its core process (which holds
the pipeline and its batcher), the lifecycle (loading, ready, draining), the metrics, and
the subscriptions to the answers' events.

The server process (rag.service.server) makes one; the handlers (rag.service.app,
rag.service.openai_api) `submit` questions and read their events from `subscriptions`.
This process never imports torch: the models live in the core process (rag.service.core).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from rag.cluster.admin import TOKEN_ENV
from rag.config import Config, token_limit
from rag.service.core_link import CoreGone, CoreLink
from rag.service.events import Event, Kind, Subscriptions
from rag.service.metrics import ServerMetrics
from rag.service.params import Param, generation_params
from rag.service.questions import Question
from rag.service.validation import QueryLimits
from rag.web import ConnectionGuard, connection_cap

log = logging.getLogger("rag.service")


__all__ = ["CoreGone", "ServerState"]


@dataclass
class ServerState:
    """Starts the core process, which loads the models in the background, then serves
    through it."""

    cfg: Config
    ready: bool = False
    draining: bool = False
    failure: str = ""
    on_fatal: Callable[[], None] = lambda: None
    # What the admin endpoint requires: the token of the balancer that launched this server
    # ("" refuses every admin call).
    admin_token: str = field(default_factory=lambda: os.environ.get(TOKEN_ENV, ""))
    connections: ConnectionGuard = field(init=False)
    metrics: ServerMetrics = field(init=False)
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    core: CoreLink = field(init=False)
    generation_params: dict[str, Param] = field(init=False)
    tasks: set[asyncio.Task] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)  # wall clock: a label only
    # The core's counters as of its last stats (refreshed before /metrics renders them).
    counters: dict[str, Any] = field(default_factory=dict)
    _limits: QueryLimits | None = None

    def __post_init__(self) -> None:
        server = self.cfg.server
        cap = connection_cap(server.max_connections, files_per_connection=1)
        self.connections = ConnectionGuard(cap, server.head_timeout_s)
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.counters.get("queue_depth", 0),
            dropped=lambda: self.counters.get("dropped", 0) + self.counters.get("expired", 0),
            cancelled=lambda: self.counters.get("cancelled", 0),
            refused=lambda: self.counters.get("refused", 0),
            connections=self.connections,
        )
        self.generation_params = generation_params(token_limit(self.cfg))
        self.core = CoreLink(
            self.cfg,
            self._deliver,
            self._on_ready,
            self._on_failure,
            self.metrics.batch_size.observe,
        )

    def open(self) -> None:
        """Start the core process (on the running event loop, before any request)."""
        self.core.start()

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            if event.kind is Kind.DONE:
                self.metrics.observe_answer(event.payload)
        self.subscriptions.deliver(events)

    def _on_ready(self, limits: QueryLimits) -> None:
        self._limits = limits
        self.ready = True

    def _on_failure(self, detail: str) -> None:
        """Loading failed or the core died: the server fails (a launcher restarts it)."""
        self.failure = self.failure or detail
        self.ready = False
        log.error("%s", detail)
        print(f"ragbench serve: {detail}", file=sys.stderr, flush=True)
        self.on_fatal()

    def submit(self, question: Question, timeout_s: float) -> None:
        """Queue a question in the core; its events follow (the first may be its
        refusal).  Refused here while loading or draining."""
        refusal = self._refusal()
        if refusal is not None:
            event = Event(question.id, Kind.ERROR, {"status": 503, "detail": refusal})
            self.subscriptions.deliver([event])
            return
        self.core.submit(question, timeout_s)

    def door_refusal(self) -> dict[str, Any] | None:
        """The core's refusal of any arrival while its door is shut (rag.service.door);
        None while it is open, and while loading, draining or failed (their 503 comes
        the ordinary way)."""
        return None if self._refusal() is not None else self.core.door_refusal()

    def _refusal(self) -> str | None:
        if self.failure:
            return self.failure
        if self.draining:
            return "the server is draining"
        if not self.ready:
            return "the models are still loading; poll /ready"
        return None

    def cancel(self, request: int) -> None:
        """The answer is no longer wanted: dropped if queued, stopped if generating."""
        self.core.cancel(request)

    @property
    def limits(self) -> QueryLimits:
        """What a valid query is; before the corpus is loaded its size is not known."""
        if self._limits is not None:
            return self._limits
        server = self.cfg.server
        return QueryLimits(server.max_query_chars, server.k_max, corpus_size=server.k_max)

    async def stats(self) -> dict[str, Any]:
        """The core's stats (rag.service.core.Core.stats), its refusals counted with those
        answered here on its word (`refused_by_front`), and how long this process will
        still refuse every arrival (`door_shut_for_s`, None when it forwards them); the
        core's counters kept for metrics."""
        stats = await self.core.call("stats")
        stats["refused"] += self.core.refused
        stats["refused_by_front"] = self.core.refused
        stats["door_shut_for_s"] = self.core.door_shut_for()
        self.counters = stats
        return stats

    async def set_threads(self, threads: int) -> int | None:
        """Compute with `threads` torch threads (set on the core's compute thread after
        the batch it runs); the count it now uses, None for the simulated model."""
        return await self.core.call("threads", threads)

    async def drain(self, then: Callable[[], None]) -> None:
        """Turn /ready to 503, let queued and running requests finish, then call `then`."""
        self.draining = True
        if not self.failure:
            with suppress(CoreGone):
                await self.core.call("drain", self.cfg.server.drain_timeout_s)
            await asyncio.sleep(0.05)  # let the last handlers write their responses
        then()

    async def close(self) -> None:
        self.core.close()

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
