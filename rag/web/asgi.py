"""What every request to an ASGI app here passes through: its body counted as it arrives
and bounded in size and time, its answer counted by status, and its work cancelled when its
client leaves.

A request body is counted whatever its framing (Content-Length or chunked) and refused with
413 past the limit; one that has not all arrived in time is refused with 408, so a client
that dribbles it cannot hold a connection.  Both answers close the connection without
reading the rest of the body (the guarded protocol stops reading at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from rag.web.errors import json_error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's code for "client closed request": counted, never sent


class BodyRefused(Exception):
    """Raised from `receive` inside the app: BodyLimit answers with `response` (an app that
    catches every exception must let this one through)."""

    def __init__(self, response: JSONResponse) -> None:
        self.response = response


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413, from its declared
    Content-Length before reading it, or counted as it arrives whatever the framing; and
    one not all received `timeout_s` after the request began with 408.  Either closes the
    connection, so the rest of the body is never read."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        if max_bytes < 0 or timeout_s <= 0:
            raise ValueError("max_bytes must be >= 0 and timeout_s > 0")
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> JSONResponse:
        detail = f"the request body is {size} bytes; the limit is {self.max_bytes}"
        return json_error(413, detail, {"Connection": "close"})

    def _too_slow(self) -> JSONResponse:
        detail = f"the request body did not arrive within {self.timeout_s:g} s"
        return json_error(408, detail, {"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(str(int(declared)))(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        received = 0
        body_complete = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # what follows is the disconnect, whenever it comes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyRefused(self._too_slow()) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyRefused(self._too_large(f"over {self.max_bytes}"))
                body_complete = not message.get("more_body", False)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyRefused as refused:
            if started:  # nothing left to say: the connection goes
                raise
            await refused.response(scope, receive, send)


class CountResponses:
    """ASGI middleware: call `count(status)` for every response to `path`, including the
    ones sent before the handler runs (413 and 408 from BodyLimit)."""

    def __init__(self, app: ASGIApp, path: str, count: Callable[[int], None]) -> None:
        self.app = app
        self.path = path
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def read_body(receive: Receive) -> bytes:
    """The whole request body (bounded by BodyLimit), as the messages bring it;
    ClientDisconnect if the client leaves first."""
    parts = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(parts)


async def unless_client_leaves(work: Awaitable[T], receive: Receive) -> T | None:
    """`work`'s result, or None if the client disconnected first (then `work` is
    cancelled).  Call once the request body has been read: the next ASGI message can only
    be the disconnect.  `work` runs in the calling task (one watcher task is all it costs)."""
    current = asyncio.current_task()
    assert current is not None
    left = finished = False

    def cancel_work(watcher: asyncio.Task[None]) -> None:
        nonlocal left
        if not (finished or watcher.cancelled()):
            left = True
            current.cancel()

    watcher = asyncio.ensure_future(_client_gone(receive))
    watcher.add_done_callback(cancel_work)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise
        current.uncancel()
        return None
    finally:
        finished = True
        watcher.cancel()


async def _client_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
