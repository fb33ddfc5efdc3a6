"""The flow of an answer from the compute side to the HTTP side, as plain data events:
(request id, kind, payload), in order, for each request:

    docs (streamed requests: the query and the retrieved documents)
    token* (streamed requests: one per engine step that produced text)
    done (the answer, as a non-streamed request receives it) | error (status, detail)

The compute side publishes lists of events through a `Publish` callable (from any thread)
in the core process (rag.service.core); they cross a pipe, and the HTTP side subscribes to
a request's events by its id.  Nothing here holds an HTTP object."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag.service.index import Hit


class Kind(StrEnum):
    DOCS = "docs"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Event:
    request: int
    kind: Kind
    payload: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.kind in (Kind.DONE, Kind.ERROR)


Publish = Callable[[list[Event]], None]


def docs_payload(hits: list[Hit]) -> list[dict[str, Any]]:
    """Retrieved documents as every answer shows them."""
    return [{"id": h.doc.id, "text": h.doc.text, "score": h.score} for h in hits]


class Subscriptions:
    """The HTTP side's end: one queue of events per open request, fed in publishing order
    on the event loop (the core process's pipe is read there)."""

    def __init__(self) -> None:
        self._queues: dict[int, asyncio.Queue[Event]] = {}

    def open(self, request: int) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[request] = queue
        return queue

    def close(self, request: int) -> None:
        self._queues.pop(request, None)

    def deliver(self, events: list[Event]) -> None:
        """On the event loop; events of a request that is no longer open are dropped."""
        for event in events:
            queue = self._queues.get(event.request)
            if queue is not None:
                queue.put_nowait(event)
