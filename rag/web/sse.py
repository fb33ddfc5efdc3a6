"""Server-Sent Events as both doors send them: one frame per event, and a response that
sends frames as they come, without buffering, until the last one, or until its client
leaves (then it says so, so the work behind the stream can stop)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response

from rag.web.asgi import Receive, Scope, Send, unless_client_leaves
from rag.web.openai_errors import error_object

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tells a proxy in front (nginx) not to buffer
]


def frame(data: Any, event: str | None = None) -> bytes:
    """One event: `event: <name>` when named, then its data as one line of JSON (or as given
    when a string, as OpenAI's `[DONE]`)."""
    line = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {line}\n\n".encode()


def error_frame(path: str, detail: str, status: int = 502) -> bytes:
    """The event that ends a stream which failed after its first byte, in the format of the
    API at `path`: OpenAI's error object under /v1/, else `event: error`."""
    if path.startswith("/v1/"):
        return frame(error_object(status, detail)) + frame("[DONE]")
    return frame({"detail": detail}, event="error")


class EventStream(Response):
    """A response of `text/event-stream` whose body is `frames` (bytes, several joined when
    they are ready together), each sent as it comes; `on_leave` is called if the client
    disconnects before the last frame."""

    def __init__(
        self, frames: AsyncIterator[bytes], on_leave: Callable[[], None], status: int = 200
    ) -> None:
        self.frames = frames
        self.on_leave = on_leave
        self.status_code = status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code, "headers": HEADERS}
        await send(start)

        async def pump() -> bool:
            async for chunk in self.frames:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True

        if await unless_client_leaves(pump(), receive) is None:
            self.on_leave()


async def drained(queue: asyncio.Queue, first: Any) -> AsyncIterator[list[Any]]:
    """Items of `queue` from `first` on, in lists of those that were waiting together."""
    batch = [first]
    while True:
        while not queue.empty():
            batch.append(queue.get_nowait())
        yield batch
        batch = [await queue.get()]
