"""The compute side as the HTTP side sees it: a question goes in (`submit`), and its events
come out through `publish` (rag.service.events): the documents and tokens of a streamed
answer as the pipeline produces them, then `done` with the whole answer, or `error` with the
status that tells the client why there is none.  `cancel` withdraws a question whose answer
is no longer wanted; one cancelled mid-generation stops at the engine's next step.

Everything here runs on the core process's event loop (rag.service.core); the requests' ids
are all the HTTP side holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rag.config import Config
from rag.service.batching import Completed, DeadlineExceeded, Draining, Overloaded
from rag.service.events import Event, Kind, Publish, docs_payload
from rag.service.questions import Question
from rag.service.validation import QueryRejected

if TYPE_CHECKING:
    from rag.service.batching import Batcher
    from rag.service.continuous import ContinuousBatcher
    from rag.service.pipeline import Answer

log = logging.getLogger("rag.service")


class NotReady(Exception):
    """The models are still loading (or failed to): 503."""


# Every way the compute side ends a request without an answer, and the status that tells
# the client; the exception's message is the detail.
STATUSES: dict[type[Exception], int] = {
    QueryRejected: 422,
    Overloaded: 429,
    NotReady: 503,
    Draining: 503,
    DeadlineExceeded: 504,
}


def error_payload(exc: Exception) -> dict[str, Any]:
    status = next((s for kind, s in STATUSES.items() if isinstance(exc, kind)), 500)
    if status == 500:
        log.error("answering failed: %s: %s", type(exc).__name__, exc)
        detail = f"internal error: {type(exc).__name__}"
    else:
        detail = str(exc)
    payload: dict[str, Any] = {"status": status, "detail": detail}
    if isinstance(exc, Overloaded):
        payload["retry_after"] = exc.retry_after_s
    return payload


class Answering:
    def __init__(
        self,
        cfg: Config,
        serving: Callable[[], Batcher | ContinuousBatcher],
        publish: Publish,
        observe: Callable[[dict[str, Any]], None],
    ) -> None:
        """`serving` is the batcher to submit to (or raises Draining / NotReady); `observe`
        takes every answer's payload for the metrics."""
        self.cfg = cfg
        self.serving = serving
        self.publish = publish
        self.observe = observe
        self.cancelled = 0  # questions whose answer was withdrawn mid-generation
        self._running: dict[int, tuple[Question, asyncio.Task[None]]] = {}

    def submit(self, question: Question, timeout_s: float) -> None:
        """Queue a question; its events follow (the first may be its refusal)."""
        task = asyncio.get_running_loop().create_task(self._answer(question, timeout_s))
        self._running[question.id] = (question, task)
        task.add_done_callback(lambda _: self._running.pop(question.id, None))

    def cancel(self, request: int) -> None:
        """The answer is no longer wanted: dropped if queued, stopped if generating."""
        found = self._running.pop(request, None)
        if found is None:
            return
        question, task = found
        if question.generating and not question.cancelled:
            self.cancelled += 1
        question.cancelled = True
        task.cancel()

    async def _answer(self, question: Question, timeout_s: float) -> None:
        """Answer within `timeout_s` of the question's arrival at the HTTP process (on the
        clock both processes share), not of this later moment; an answer built after that
        is not served."""
        deadline = question.arrival + timeout_s
        try:
            left = max(deadline - time.perf_counter(), 0.0)
            completed = await self.serving().submit(question, left)
        except asyncio.CancelledError:
            question.cancelled = True
            raise
        except Exception as exc:
            question.cancelled = True  # a deadline passed mid-batch: stop generating it
            if isinstance(exc, DeadlineExceeded) and time.perf_counter() >= deadline:
                exc = DeadlineExceeded.after(timeout_s)  # the deadline asked for, not `left`
            self.publish([Event(question.id, Kind.ERROR, error_payload(exc))])
            return
        payload = answer_payload(completed, question, self.cfg)
        if time.perf_counter() > deadline:  # settled in time, but built after its deadline
            late = DeadlineExceeded.after(timeout_s)
            self.publish([Event(question.id, Kind.ERROR, error_payload(late))])
            return
        self.observe(payload)
        self.publish([Event(question.id, Kind.DONE, payload)])


def answer_payload(completed: Completed[Answer], question: Question, cfg: Config) -> dict:
    """The whole answer, as a non-streamed `/rag` request receives it."""
    answer = completed.value
    total_ms = (time.perf_counter() - question.arrival) * 1e3
    timings = {"queue_ms": completed.queue_s * 1e3, **answer.timings_ms, "total_ms": total_ms}
    ttft_ms = (answer.first_token_at - question.arrival) * 1e3 if answer.new_tokens else None
    tpot_ms = (
        (answer.last_token_at - answer.first_token_at) * 1e3 / (answer.new_tokens - 1)
        if answer.new_tokens > 1
        else None
    )
    payload = {
        "query": answer.query,
        "result": answer.result,
        "docs": docs_payload(answer.docs),
        "timings": timings,
        "batch_size": completed.requests_in_batch,
        "prompt_tokens": answer.prompt_tokens,
        "new_tokens": answer.new_tokens,
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.new_tokens,
            "total_tokens": answer.prompt_tokens + answer.new_tokens,
        },
        "finish_reason": answer.finish_reason,
        "ttft_ms": ttft_ms,
        "tpot_ms": tpot_ms,
        "variant": cfg.variant.name,
        "model": cfg.model.name,
    }
    if cfg.server.replica_id:
        payload["replica"] = cfg.server.replica_id
    return payload
