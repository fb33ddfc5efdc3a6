"""What the HTTP handlers of one server share: the pipeline once loaded, its batcher, the
lifecycle (loading, ready, draining), the metrics, and the two ends of the answers' events.

The server process (rag.service.server) makes one; the handlers (rag.service.app,
rag.service.openai_api) submit questions to `answering` and read their events from
`subscriptions`; answering reaches the pipeline only through the batcher picked for the
variant's kind."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rag.cluster.admin import TOKEN_ENV
from rag.config import Config, ServerKind, batch_limits, token_limit
from rag.service.answering import Answering, NotReady
from rag.service.batching import Batcher, BatchRecord, Draining
from rag.service.events import Subscriptions
from rag.service.metrics import ServerMetrics
from rag.service.params import Param, generation_params
from rag.service.validation import QueryLimits
from rag.web import ConnectionGuard, connection_cap

if TYPE_CHECKING:
    from rag.service.continuous import ContinuousBatcher
    from rag.service.pipeline import RAGPipeline

log = logging.getLogger("rag.service")


__all__ = ["NotReady", "ServerState"]


@dataclass
class ServerState:
    """Loads the models in the background, then serves them through one batcher."""

    cfg: Config
    load_pipeline: Callable[[], RAGPipeline]
    pipeline: RAGPipeline | None = None
    batcher: Batcher | ContinuousBatcher | None = None
    ready: bool = False
    draining: bool = False
    failure: str = ""
    on_fatal: Callable[[], None] = lambda: None
    # What the admin endpoint requires: the token of the balancer that launched this server
    # ("" refuses every admin call).
    admin_token: str = field(default_factory=lambda: os.environ.get(TOKEN_ENV, ""))
    torch_threads: int | None = None  # on the compute thread; None for the simulated model
    connections: ConnectionGuard = field(init=False)
    metrics: ServerMetrics = field(init=False)
    subscriptions: Subscriptions = field(init=False)  # set by open(), on the event loop
    answering: Answering = field(init=False)
    generation_params: dict[str, Param] = field(init=False)
    tasks: set[asyncio.Task] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)  # wall clock: a label only
    # All model work (loading, warm-up, batches) runs on this one thread: torch's OpenMP
    # pool belongs to the thread that first used it, and from any other thread the same
    # batch runs markedly slower.
    compute: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
    )

    def __post_init__(self) -> None:
        server = self.cfg.server
        cap = connection_cap(server.max_connections, files_per_connection=1)
        self.connections = ConnectionGuard(cap, server.head_timeout_s)
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.batcher.depth if self.batcher else 0,
            dropped=lambda: self.batcher.dropped + self.batcher.expired if self.batcher else 0,
            cancelled=lambda: self.answering.cancelled,
            connections=self.connections,
        )
        self.generation_params = generation_params(token_limit(self.cfg))

    def open(self) -> None:
        """The ends of the events, on the running event loop, before any request."""
        self.subscriptions = Subscriptions(asyncio.get_running_loop())
        self.answering = Answering(
            self.cfg, self._serving_batcher, self.subscriptions.publish, self.metrics.observe_answer
        )

    def _serving_batcher(self) -> Batcher | ContinuousBatcher:
        return self.serving()[0]

    def serving(self) -> tuple[Batcher, RAGPipeline]:
        """The batcher and pipeline to answer with, or Draining / NotReady."""
        if self.draining:
            raise Draining("the server is draining")
        if not self.ready or self.batcher is None or self.pipeline is None:
            raise NotReady("the models are still loading; poll /ready")
        return self.batcher, self.pipeline

    @property
    def limits(self) -> QueryLimits:
        """What a valid query is; before the corpus is loaded its size is not known."""
        if self.pipeline is not None:
            return self.pipeline.limits
        server = self.cfg.server
        return QueryLimits(server.max_query_chars, server.k_max, corpus_size=server.k_max)

    async def load(self) -> None:
        """Load models and run one warm-up batch, then open for traffic."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            pipeline = await loop.run_in_executor(self.compute, self.load_pipeline)
            loaded = time.perf_counter()
            await loop.run_in_executor(self.compute, pipeline.warm_up)
            if not self.simulated:
                self.torch_threads = await self.set_threads(0)
            self.batcher = self._batcher_for(pipeline)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.failure)
            print(f"ragbench serve: model loading failed: {self.failure}", file=sys.stderr)
            self.on_fatal()
            return
        self.pipeline = pipeline
        self.batcher.start()
        self.ready = True
        print(
            f"ragbench serve: ready (models {loaded - started:.1f} s, "
            f"warm-up {time.perf_counter() - loaded:.1f} s)",
            flush=True,
        )

    @property
    def simulated(self) -> bool:
        """The simulated model: nothing computes, so there are no threads to set."""
        from rag.service.simulated import is_simulated

        model = self.cfg.model
        return is_simulated(model.generator) and is_simulated(model.embedder)

    async def set_threads(self, threads: int) -> int | None:
        """Compute with `threads` torch threads (0: keep the count), set on the compute
        thread after the batch it runs; the count it now uses, None when nothing computes
        (the simulated model)."""
        if self.simulated:
            return None
        from rag.service.models import compute_threads  # imports torch: off the start path

        loop = asyncio.get_running_loop()
        self.torch_threads = await loop.run_in_executor(self.compute, compute_threads, threads)
        return self.torch_threads

    def _batcher_for(self, pipeline: RAGPipeline) -> Batcher | ContinuousBatcher:
        """The variant's way into the pipeline: whole batches (of one, one at a time), or
        the engine's running batch (continuous)."""
        variant = self.cfg.variant
        if variant.kind is ServerKind.continuous:
            from rag.service.continuous import ContinuousBatcher  # the pipeline's imports

            return ContinuousBatcher(
                pipeline,
                variant.max_batch_size,
                variant.max_queue,
                self.compute,
                on_step=self._record_batch,
                publish=self.subscriptions.publish,
            )
        max_batch_size, max_wait_ms = batch_limits(variant)
        publish = self.subscriptions.publish
        return Batcher(
            lambda questions: pipeline.answer(questions, publish),
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_ms / 1e3,
            max_queue=variant.max_queue,
            on_batch=self._record_batch,
            executor=self.compute,
        )

    def _record_batch(self, record: BatchRecord) -> None:
        self.metrics.batch_size.observe(record.size)

    async def drain(self, then: Callable[[], None]) -> None:
        """Turn /ready to 503, let queued and running requests finish, then call `then`."""
        self.draining = True
        if self.batcher is not None:
            self.batcher.begin_drain()
            finished = await self.batcher.wait_idle(self.cfg.server.drain_timeout_s)
            if not finished:
                log.warning("drain timed out with %d requests in flight", self.batcher.in_flight)
            await asyncio.sleep(0.05)  # let the last handlers write their responses
        then()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.compute.shutdown(wait=True)

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
