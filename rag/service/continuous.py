"""Iteration-level (continuous) batching: requests join and leave the running batch of the
generation engine between its steps.

Each step, the newcomers that fit in free slots are embedded and retrieved together, their
prompts prefilled in the same forward pass as the running batch's next tokens, and from
then on they decode with the running batch, one token per step; a request leaves as soon
as it ends (EOS or its token limit).  Short answers do not wait for long ones, and a
newcomer waits for one step, not a whole batch.  The engine runs on the compute thread,
one step per call; between steps this loop admits newcomers, takes out requests whose
caller left, and hands finished answers back.

The HTTP side sees the batcher's contract (`submit`, drain, the counters), and admission
is by deadline as there: a request that could not be answered before its deadline behind
the requests ahead is refused at once (Overloaded), one whose deadline has come before it
could start is not computed (DeadlineExceeded).  The estimate is a request's time in the
engine at a full running batch, learned from requests that ran.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from rag.clock import MONOTONIC, Clock
from rag.service.batching import (
    BatchRecord,
    BatchTimes,
    Completed,
    DeadlineExceeded,
    RequestQueue,
)
from rag.service.generator import token_events
from rag.service.validation import QueryRejected

if TYPE_CHECKING:
    from rag.service.engine.engine import Engine, Sequence, StepReport
    from rag.service.events import Publish
    from rag.service.generator import Output
    from rag.service.pipeline import Answer, Prepared, RAGPipeline
    from rag.service.questions import Question


@dataclass(eq=False)
class _Request:
    question: Question
    arrival: float
    deadline: float
    future: asyncio.Future = field(repr=False)
    started: float = 0.0  # when its step began: prepared and prefilled
    running_at_start: int = 0  # the running batch it joined, itself included
    prepared: Prepared | None = None
    output: Output | None = None


@dataclass
class StepParts:
    """Where the compute thread's steps spend their time, summed since start, so that a
    served request's time can be split into its parts: preparing newcomers (validation,
    embedding, retrieval, prompts, tokenizing), engine passes with newcomers' prompts
    (mixed) and without (decode only), and turning new tokens into events."""

    mixed_steps: int = 0
    decode_steps: int = 0
    prefilled: int = 0  # prompts computed
    prefill_tokens: int = 0
    prepare_s: float = 0.0
    mixed_s: float = 0.0
    decode_s: float = 0.0
    events_s: float = 0.0

    def add(self, report: StepReport, prepare_s: float, engine_s: float, events_s: float) -> None:
        if report.prefilled:
            self.mixed_steps += 1
            self.mixed_s += engine_s
        else:
            self.decode_steps += 1
            self.decode_s += engine_s
        self.prefilled += report.prefilled
        self.prefill_tokens += report.prefill_tokens
        self.prepare_s += prepare_s
        self.events_s += events_s

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class ContinuousBatcher(RequestQueue):
    def __init__(
        self,
        pipeline: RAGPipeline,
        max_running: int,
        max_queue: int,
        executor: Executor,
        on_step: Callable[[BatchRecord], None] | None = None,
        clock: Clock = MONOTONIC,
        publish: Publish | None = None,
        short_queue_running: int = 0,
    ) -> None:
        """`publish` takes the documents and token events of streamed questions;
        `short_queue_running` is the running batch at most while fewer than that many
        requests wait (0: `max_running` always)."""
        engine = getattr(pipeline.generator, "engine", None)
        if engine is None:
            raise ValueError("variant=continuous needs the generation engine (model.engine=true)")
        if max_running < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        super().__init__(max_queue, clock)
        self.pipeline = pipeline
        self.engine: Engine = engine
        self.max_batch_size = min(max_running, engine.slots)
        self.short_queue_batch_size = min(short_queue_running or max_running, self.max_batch_size)
        self.max_wait_s = 0.0  # a newcomer joins at the next step
        self.on_step = on_step
        self.publish = publish
        self.batch_size_counts: Counter[int] = Counter()  # steps by rows decoded
        self.request_times = BatchTimes(clock)  # a request's time in the engine, by running batch
        self.step_parts = StepParts()
        self._running: dict[Sequence, _Request] = {}
        self._executor = executor

    @property
    def running(self) -> int:
        return len(self._running)

    def _pending(self) -> list:
        return [*self._queue, *self._running.values()]

    def room(self, waiting: int) -> int:
        """The running batch at most while `waiting` requests queue for it.  Held to
        `short_queue_batch_size`, a burst's requests end about in their order of arrival,
        the earliest soonest.  A whole such batch waiting means the server is past its
        capacity, where every request waits for the backlog: up to `max_batch_size` rows
        then decode more tokens for the same weights read and drain it sooner."""
        short = self.short_queue_batch_size
        return self.max_batch_size if waiting >= short else short

    def likely_finish(self, now: float, ahead: int) -> float | None:
        """When a request arriving `now` with `ahead` requests before it for the slots
        will likely have been answered: the waves of running batches it waits through, each
        a request's time in a batch of that size, their likely total; None before any
        request was measured."""
        wave = self.room(ahead + 1)
        full = self.request_times.likely_total(wave, waves_to_wait(ahead, self.running, wave))
        return None if full is None else now + full

    async def submit(self, question: Question, timeout_s: float = math.inf) -> Completed:
        """Queue one question and wait for its answer, for at most `timeout_s`; raises as
        Batcher.submit does."""
        now = self.clock.now()
        self._admit(now, timeout_s)
        future = asyncio.get_running_loop().create_future()
        return await self._wait(_Request(question, now, now + timeout_s, future), timeout_s)

    def _newcomers(self, now: float) -> list[_Request]:
        """The live queued requests that fit in the free slots and are worth starting
        before their deadline (`BatchTimes.worth_starting`: a request left out would take
        the row if more wait than there are free rows); others are answered
        DeadlineExceeded, never computed, unless nothing else runs."""
        joining: list[_Request] = []
        room = self.room(self.depth)
        while self._queue and self.running + len(joining) < room:
            request = self._queue.popleft()
            if request.future.done():
                self.dropped += 1
                continue
            size = self.running + len(joining) + 1
            row_wanted = len(self._queue) >= room - size + 1
            worth = self.request_times.worth_starting(size, request.deadline - now, row_wanted)
            if not worth and (self._running or joining or self._queue):
                self.expired += 1
                request.future.set_exception(DeadlineExceeded.unstarted())
                continue
            joining.append(request)
        return joining

    def _step(
        self, joining: list[_Request], leaving: list[Sequence], running: list[Output]
    ) -> tuple[list[Sequence], float]:
        """On the compute thread: take out the sequences whose caller left, prepare and
        submit the newcomers, run one engine step, publish the streamed requests' new
        text.  The finished sequences, and the step's duration."""
        started = self.clock.now()
        for sequence in leaving:
            self.engine.cancel(sequence)
        if joining:
            self._prepare(joining, running)
        prepared = self.clock.now()
        report = self.engine.step()
        stepped = self.clock.now()
        if self.publish is not None and (events := token_events(running)):
            self.publish(events)
        ended = self.clock.now()
        self.step_parts.add(report, prepared - started, stepped - prepared, ended - stepped)
        return report.finished, ended - started

    def _prepare(self, joining: list[_Request], running: list[Output]) -> None:
        """On the compute thread: the newcomers' documents, prompts and token ids, each
        valid one submitted to the engine and added to `running`; an invalid one answered."""
        questions = [r.question for r in joining]
        outcomes = self.pipeline.prepare(questions, self.publish)
        generator = self.pipeline.generator
        prompts = [o.prompt for o in outcomes if not isinstance(o, QueryRejected)]
        encoded = iter(generator.encode(prompts) if prompts else [])
        for request, outcome in zip(joining, outcomes, strict=True):
            if isinstance(outcome, QueryRejected):
                request.future.get_loop().call_soon_threadsafe(_settle, request.future, outcome)
                continue
            request.prepared = outcome
            request.output = generator.output(request.question, next(encoded))
            self.engine.submit(request.output.sequence)
            running.append(request.output)

    async def _serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self.depth:
                self.dropped += len(self._queue)
                self._queue.clear()
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            now = self.clock.now()
            joining = self._newcomers(now)
            leaving = [
                s for s, r in self._running.items() if r.future.done() or r.question.cancelled
            ]
            for sequence in leaving:
                del self._running[sequence]
                self.dropped += 1
            running = [r.output for r in self._running.values() if r.output is not None]
            try:
                finished, duration = await loop.run_in_executor(
                    self._executor, self._step, joining, leaving, running
                )
            except Exception as exc:  # the step failed as a whole: everyone in it hears why
                self._fail_all([*joining, *self._running.values()], exc)
                continue
            for request in joining:
                if request.output is not None:
                    self._running[request.output.sequence] = request
            for request in joining:
                request.started, request.running_at_start = now, self.running
            self._record(finished, duration)

    def _record(self, finished: list[Sequence], duration: float) -> None:
        rows = len(self._running)
        self.batch_size_counts[rows] += 1
        now = self.clock.now()
        for sequence in finished:
            request = self._running.pop(sequence)
            if sequence.finish == "cancelled" or request.prepared is None:
                continue
            in_engine = now - request.started
            self.request_times.record(request.running_at_start, in_engine)
            assert request.output is not None
            generation = request.output.generation()
            answer: Answer = self.pipeline.complete(
                request.prepared, generation, in_engine * 1e3, rows
            )
            _settle(request.future, Completed(answer, request.started - request.arrival, rows))
        self._observe_service(len(finished), duration)
        if self.on_step is not None:  # last, as the batcher's on_batch: the step fully counted
            self.on_step(BatchRecord(rows, duration))

    def _fail_all(self, requests: list[_Request], exc: Exception) -> None:
        for sequence in list(self.engine.active) + list(self.engine.waiting):
            self.engine.cancel(sequence)
        self._running.clear()
        for request in requests:
            _settle(request.future, exc)


def waves_to_wait(ahead: int, running: int, room: int) -> int:
    """Running batches of up to `room` rows that a request behind `ahead` waiting ones
    lives through, its own included: its own alone if a slot is free for it; else the
    running batch's rest, the waves ahead, then its own.  A running batch above `room` (the
    queue has shortened since it grew) frees no slot until it is back below."""
    free = max(room - running, 0)
    return 1 if ahead < free else (ahead - free) // room + 2


def _settle(future: asyncio.Future, outcome: object) -> None:
    """Give a waiting caller its answer or error, unless it has already left."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
