"""The core process: the pipeline (models, index, engine) and the variant's serving loop,
fed by messages from the HTTP process instead of HTTP.

The HTTP process (rag.service.core_link) parses, validates, formats and counts; the core
only computes, so the event loop that answers refusals never holds the interpreter lock the
compute thread needs.  Messages are small pickled tuples over one pipe:

    front -> core   ("submit", question, timeout_s) | ("cancel", request id)
                    ("call", call id, name, argument): stats, threads, drain
    core -> front   ("ready", limits) | ("failed", detail) | ("events", [Event, ...])
                    ("batch", size) | ("reply", call id, value)
                    ("door", None | (shut until, reason))

A submitted question's refusal is its first event, as in rag.service.answering; the core's
scheduling loop never waits for the front.  Under overload most questions are refused,
and each would cost the core a message in and one out, handled on the event loop that
shares the interpreter lock with the compute thread; so whenever the batcher would refuse
every arrival (its queue full, or the work queued beyond any new request's deadline), the
core tells the front until when (`time.monotonic()`, one clock for both processes) and
why, and the front answers 429 itself until then or until told otherwise: the door's
state is re-read after every message handled and every batch (continuous: step), and sent
when it moves.  The core ignores SIGTERM and SIGINT (the HTTP
process drains it through a call), ends when the pipe closes, and dies with the HTTP
process however that ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from rag.config import Config, ServerKind, batch_limits
from rag.service.answering import Answering, NotReady
from rag.service.batching import Batcher, BatchRecord, Draining
from rag.service.events import Event

if TYPE_CHECKING:
    from rag.service.continuous import ContinuousBatcher
    from rag.service.pipeline import RAGPipeline

log = logging.getLogger("rag.service")

PR_SET_PDEATHSIG = 1
DOOR_TOLERANCE_S = 0.01  # a door that moves less than this is not worth a message


class Core:
    """One server's compute side: loads the models, then answers the front's messages."""

    def __init__(self, cfg: Config, conn: Connection) -> None:
        self.cfg = cfg
        self.conn = conn
        self.pipeline: RAGPipeline | None = None
        self.batcher: Batcher | ContinuousBatcher | None = None
        self.draining = False
        self.torch_threads: int | None = None  # on the compute thread; None: simulated
        # What goes to the front, sent by a thread of its own: neither the scheduling loop
        # nor the compute thread ever waits for the front to read.
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_forever, name="to-front", daemon=True)
        self._closed = asyncio.Event()
        # All model work (loading, warm-up, batches) runs on this one thread: torch's
        # OpenMP pool belongs to the thread that first used it, and from any other thread
        # the same batch runs markedly slower.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.answering = Answering(cfg, self._serving, self.publish, lambda _: None)
        self._door: tuple[float, str] | None = None  # as the front last heard it
        self._door_due = False  # a re-read of the door is scheduled on the event loop

    def send(self, message: tuple) -> None:
        """Thread-safe, and never waits."""
        self._outbox.put(message)

    def _send_forever(self) -> None:
        """A front that is gone is the end of this process (the pipe's EOF stops the
        loop), so a failed send is not this thread's to report."""
        while (message := self._outbox.get()) is not None:
            with contextlib.suppress(OSError):
                self.conn.send(message)

    def publish(self, events: list[Event]) -> None:
        self.send(("events", events))

    def _serving(self) -> Batcher | ContinuousBatcher:
        if self.draining:
            raise Draining("the server is draining")
        if self.batcher is None:
            raise NotReady("the models are still loading; poll /ready")
        return self.batcher

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._read)
        self._sender.start()
        try:
            if await self._load():
                await self._closed.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
            if self.batcher is not None:
                await self.batcher.stop()
            self.compute.shutdown(wait=True)
            self._outbox.put(None)
            self._sender.join()

    async def _load(self) -> bool:
        """Load the models and run one warm-up batch, then tell the front."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            pipeline = await loop.run_in_executor(self.compute, load_pipeline, self.cfg)
            loaded = time.perf_counter()
            await loop.run_in_executor(self.compute, pipeline.warm_up)
            if not self.simulated:
                await self.set_threads(0)
            self.batcher = self._batcher_for(pipeline)
        except Exception as exc:
            self.send(("failed", f"model loading failed: {type(exc).__name__}: {exc}"))
            return False
        self.pipeline = pipeline
        self.batcher.start()
        print(
            f"ragbench serve: ready (models {loaded - started:.1f} s, "
            f"warm-up {time.perf_counter() - loaded:.1f} s)",
            flush=True,
        )
        self.send(("ready", pipeline.limits))
        return True

    @property
    def simulated(self) -> bool:
        """The simulated model: nothing computes, so there are no threads to set."""
        from rag.service.simulated import is_simulated

        model = self.cfg.model
        return is_simulated(model.generator) and is_simulated(model.embedder)

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
                publish=self.publish,
                short_queue_running=variant.short_queue_batch_size,
            )
        max_batch_size, max_wait_ms = batch_limits(variant)
        return Batcher(
            lambda questions: pipeline.answer(questions, self.publish),
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_ms / 1e3,
            max_queue=variant.max_queue,
            on_batch=self._record_batch,
            executor=self.compute,
        )

    def _record_batch(self, record: BatchRecord) -> None:
        self.send(("batch", record.size))
        self._update_door()

    def _door_after_handled(self) -> None:
        """Re-read the door once the questions just submitted have met admission (their
        tasks run before a callback scheduled after them)."""
        if not self._door_due:
            self._door_due = True
            asyncio.get_running_loop().call_soon(self._update_door)

    def _update_door(self) -> None:
        """Tell the front when its door moves: shut (every arrival would be refused, until
        when and why) or open."""
        self._door_due = False
        batcher = self.batcher
        if batcher is None or self.draining:  # the front refuses those itself
            return
        now = batcher.clock.now()
        refused = batcher.refusal(now, self.cfg.variant.request_timeout_s)
        door = None if refused is None else (now + refused[1], refused[0])
        if _door_moved(self._door, door):
            self._door = door
            self.send(("door", door))

    def _read(self) -> None:
        """Every message waiting on the pipe, handled on the event loop."""
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):  # the front is gone
            self._closed.set()
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            return
        self._door_after_handled()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            self.answering.submit(message[1], message[2])
        elif kind == "cancel":
            self.answering.cancel(message[1])
        elif kind == "call":
            asyncio.get_running_loop().create_task(self._call(*message[1:]))

    async def _call(self, call: int, name: str, argument: Any) -> None:
        calls = {"stats": self.stats, "threads": self.set_threads, "drain": self.drain}
        self.send(("reply", call, await calls[name](argument)))

    async def set_threads(self, threads: int) -> int | None:
        """Compute with `threads` torch threads (0: keep the count), set on the compute
        thread after the batch it runs; the count it now uses, None when nothing computes
        (the simulated model)."""
        if self.simulated:
            return None
        from rag.service.models import compute_threads

        loop = asyncio.get_running_loop()
        self.torch_threads = await loop.run_in_executor(self.compute, compute_threads, threads)
        return self.torch_threads

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and let queued and running requests finish; False if
        `timeout_s` passed first."""
        self.draining = True
        if self.batcher is None:
            return True
        self.batcher.begin_drain()
        finished = await self.batcher.wait_idle(timeout_s)
        if not finished:
            log.warning("drain timed out with %d requests in flight", self.batcher.in_flight)
        return finished

    async def stats(self, _: Any = None) -> dict[str, Any]:
        """The batching knobs, the counters, the batch-size histogram (continuous: steps by
        the running batch's size) and what the models run on."""
        from rag.service.simulated import is_simulated

        cfg, batcher, pipeline = self.cfg, self.batcher, self.pipeline
        return {
            "variant": cfg.variant.name,
            "model": cfg.model.name,
            "simulated": is_simulated(cfg.model.generator) or is_simulated(cfg.model.embedder),
            "replica": cfg.server.replica_id or None,
            "max_batch_size": batcher.max_batch_size if batcher else None,
            "max_wait_ms": batcher.max_wait_s * 1e3 if batcher else None,
            "short_queue_batch_size": getattr(batcher, "short_queue_batch_size", None),
            "max_queue": cfg.variant.max_queue,
            "queue_depth": batcher.depth if batcher else 0,
            "running": batcher.running if batcher else 0,
            "service_rate": batcher.service_rate if batcher else None,
            "dropped": batcher.dropped if batcher else 0,
            "expired": batcher.expired if batcher else 0,
            "refused": batcher.refused if batcher else 0,
            "cancelled": self.answering.cancelled,
            "engine": _engine_use(pipeline) if pipeline else None,
            "batch_size_counts": dict(sorted(batcher.batch_size_counts.items())) if batcher else {},
            "step_parts": _step_parts(batcher),
            "corpus_size": pipeline.index.size if pipeline else None,
            "runtime": self._runtime(pipeline) if pipeline else None,
        }

    def _runtime(self, pipeline: RAGPipeline) -> dict[str, Any]:
        """What the models run on; a simulated generator describes its cost model instead.
        Plain values only: the torch-free front unpickles them (torch's version string is
        a class of torch's own)."""
        if hasattr(pipeline.generator, "describe"):
            runtime = pipeline.generator.describe()
        else:
            from rag.service.models import describe_runtime

            # torch's thread count is per thread: the compute thread's, not this one's
            runtime = {**describe_runtime(pipeline.generator), "torch_threads": self.torch_threads}
        return {name: _plain(value) for name, value in runtime.items()}


def _door_moved(last: tuple[float, str] | None, now: tuple[float, str] | None) -> bool:
    """Whether the door opened, shut, or moves its opening by more than the tolerance."""
    if last is None or now is None:
        return (last is None) != (now is None)
    return abs(now[0] - last[0]) > DOOR_TOLERANCE_S


def _step_parts(batcher: Batcher | ContinuousBatcher | None) -> dict[str, float] | None:
    """The continuous loop's time by part (`continuous.StepParts`); None for whole batches."""
    parts = getattr(batcher, "step_parts", None)
    return parts.as_dict() if parts is not None else None


def _engine_use(pipeline: RAGPipeline) -> dict[str, int] | None:
    """The engine's slots and how many sequences hold one or wait for one."""
    engine = getattr(pipeline.generator, "engine", None)
    if engine is None:
        return None
    return {"slots": engine.slots, "active": len(engine.active), "waiting": len(engine.waiting)}


def _plain(value: Any) -> Any:
    """A value as the builtin type it stands for (a str subclass becomes a str)."""
    return value if value is None or type(value) in (bool, int, float) else str(value)


def load_pipeline(cfg: Config) -> RAGPipeline:
    """Imported here, on the compute thread, because torch and transformers take seconds
    to import."""
    from rag.service.pipeline import RAGPipeline

    return RAGPipeline.from_config(cfg)


def die_with_front() -> None:
    """Be killed when the HTTP process ends, however it ends (Linux only; elsewhere the
    pipe's EOF ends this process)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(cfg: Config, conn: Connection, front: int) -> None:
    """The core process's entry (multiprocessing, spawned by the HTTP process `front`)."""
    die_with_front()
    if os.getppid() != front:  # the front died before the line above
        sys.exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a process group's SIGTERM: the front drains
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=cfg.server.log_level.upper())
    asyncio.run(Core(cfg, conn).run())
    # Everything this process owes is sent and its threads are joined; what is left is
    # the interpreter tearing down torch's and transformers' modules object by object,
    # which only delays the front's exit (and a drained replica's end).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
