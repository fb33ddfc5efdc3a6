"""HTTP guards for a server that faces clients it does not control: the RAG server and any
proxy in front of it (an ASGI app served by uvicorn).  Torch-free.

- One error format: `{"detail": "<what went wrong>"}`, never more than a short excerpt of
  the input it complains about.
- A request body is counted as it arrives, whatever its framing (Content-Length or chunked),
  and refused with 413 past the limit; the rest is never read, so memory stays flat.  A
  body that has not all arrived in time is refused with 408, so a client that dribbles it
  cannot hold a connection.
- JSON is parsed strictly: NaN, Infinity and numbers that overflow to them are bad input.
- A cap on concurrent connections (503 beyond it) and a time limit for each request head, so
  clients that open connections and send nothing (or half a head) cannot hold the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import reprlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import h11
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 40


class Error(BaseModel):
    """Every error this project's servers answer (the OpenAPI schema of all of them)."""

    detail: str = Field(description="What went wrong, in words; quotes input only in part.")


def excerpt(value: object) -> str:
    """A repr of `value` cut to a few dozen characters: enough to recognise it, never a copy
    of a megabyte the client sent."""
    return _SHORT.repr(value)


def json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class BadJSON(ValueError):
    """The body is not UTF-8 JSON with finite numbers; the message says where."""


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise BadJSON(f"the number {excerpt(text)} is out of range")
    return number


def _no_constant(name: str) -> None:
    raise BadJSON(f"{name} is not a JSON number")


def parse_json(body: bytes) -> Any:
    """Parse a request body as JSON, refusing NaN, Infinity and numbers too large for a
    float (`1e999`): Python's json module accepts them, and they cannot be answered back."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = body[exc.start : exc.start + 1]
        raise BadJSON(f"the body is not UTF-8 (byte {byte!r} at {exc.start})") from None
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON("the body nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise BadJSON(f"the body is not valid JSON: {str(exc)[:120]}") from None


class NotJSON(Exception):
    """The body is not declared as JSON: 415."""


def require_json(content_type: str | None) -> None:
    """Accept `application/json` and `application/<x>+json`, with any parameters."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise NotJSON(
            f"the body must be sent as Content-Type: application/json, not {excerpt(media or None)}"
        )


class _BodyRefused(Exception):
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
                raise _BodyRefused(self._too_slow()) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyRefused(self._too_large(f"over {self.max_bytes}"))
                body_complete = not message.get("more_body", False)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyRefused as refused:
            if started:  # nothing left to say: the connection goes
                raise
            await refused.response(scope, receive, send)


@dataclass
class ConnectionGuard:
    """A cap on concurrent connections and a time limit for each request head, for uvicorn.

    A connection beyond `max_connections` is answered 503 (once its head arrives) and
    closed.  A connection that has not sent a complete request head `head_timeout_s` after
    it opened, or after its previous response, is closed.  The counts feed /metrics.
    """

    max_connections: int
    head_timeout_s: float
    refused: int = 0  # connections answered 503 for being over the cap
    timed_out: int = 0  # connections closed for not sending a request head in time

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.head_timeout_s <= 0:
            raise ValueError("max_connections must be >= 1 and head_timeout_s > 0")

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's h11 protocol with this guard; pass as `uvicorn.Config(http=...)`."""
        guard = self

        class GuardedH11Protocol(H11Protocol):
            _head_timer: asyncio.TimerHandle | None = None

            def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
                super().connection_made(transport)
                if len(self.connections) > guard.max_connections:
                    guard.refused += 1
                    self.app = _over_capacity(guard.max_connections)
                self._expect_head()

            def on_response_complete(self) -> None:
                super().on_response_complete()
                if not self.transport.is_closing():
                    self._expect_head()

            def connection_lost(self, exc: Exception | None) -> None:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                super().connection_lost(exc)

            def _expect_head(self) -> None:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                self._head_timer = self.loop.call_later(guard.head_timeout_s, self._no_head)

            def _no_head(self) -> None:
                if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                    guard.timed_out += 1
                    self.transport.close()

        return GuardedH11Protocol


def _over_capacity(limit: int) -> ASGIApp:
    detail = f"too many open connections (the limit is {limit}); retry shortly"
    return json_error(503, detail, {"Retry-After": "1", "Connection": "close"})
