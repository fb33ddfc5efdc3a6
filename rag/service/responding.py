"""The HTTP side of one answer, whatever the API: submit the question, wait for its first
event (an error there is an ordinary status), then answer with the whole of it, or stream
its events as they come.  A client that leaves withdraws its question.

A `Face` is how one API shows an answer: `/rag`'s own format, or OpenAI's chat or
completion formats (rag.service.openai_api)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from rag.service.events import Event, Kind
from rag.service.questions import Question
from rag.service.state import ServerState
from rag.web import CLIENT_GONE, EventStream, drained, frame, json_error, unless_client_leaves


class Face(Protocol):
    def error(self, status: int, detail: str, retry_after: int | None = None) -> Response:
        """A refusal before the first byte."""
        ...

    def body(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The whole answer (the `done` payload) as this API's JSON body."""
        ...

    def frames(self, events: list[Event]) -> bytes:
        """Events of a streamed answer as this API's Server-Sent Events (b"" for none)."""
        ...


class RAGFace:
    """`/rag`: the answer as the pipeline states it; a stream of `docs`, `token`, then
    `done` or `error` events."""

    def error(self, status: int, detail: str, retry_after: int | None = None) -> Response:
        return json_error(
            status, detail, {"Retry-After": str(retry_after)} if retry_after else None
        )

    def body(self, answer: dict[str, Any]) -> dict[str, Any]:
        return answer

    def frames(self, events: list[Event]) -> bytes:
        return b"".join(
            frame({"detail": e.payload["detail"]} if e.kind is Kind.ERROR else e.payload, e.kind)
            for e in events
        )


async def respond(request: Request, state: ServerState, question: Question, face: Face) -> Response:
    """The answer to `question`, as `face` shows it."""
    events = state.subscriptions.open(question.id)

    def withdraw() -> None:
        state.cancel(question.id)
        state.subscriptions.close(question.id)

    state.submit(question, state.cfg.variant.request_timeout_s)
    first = await unless_client_leaves(events.get(), request.receive)
    if first is None:
        withdraw()
        return Response(status_code=CLIENT_GONE)
    if first.kind is Kind.ERROR:
        state.subscriptions.close(question.id)
        return face.error(**first.payload)
    if not question.stream:  # nothing but the answer is published for it
        state.subscriptions.close(question.id)
        return JSONResponse(face.body(first.payload))
    close = lambda: state.subscriptions.close(question.id)  # noqa: E731
    return EventStream(_frames(events, first, face, close), on_leave=withdraw)  # type: ignore[return-value]


async def _frames(
    events: asyncio.Queue[Event], first: Event, face: Face, close: Callable[[], None]
) -> AsyncIterator[bytes]:
    try:
        async for ready in drained(events, first):
            if chunk := face.frames(ready):
                yield chunk
            if ready[-1].final:
                return
    finally:
        close()
