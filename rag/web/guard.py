"""The connection guard: uvicorn's httptools protocol with the limits of a server that faces
clients it does not control (the RAG server and the balancer alike).

- A cap on open connections.  At the cap, a new connection makes room by closing the
  oldest idle one (one that has sent nothing yet, else one between requests); only when
  none is idle is a request refused, with 503, once its head has arrived.
- A time limit for each request head, counted from when the connection opened or its
  previous response was sent, so a client that sends nothing (or half a head) is closed.
- Limits on the head: at most HEAD_MAX_BYTES (URL and headers) and MAX_HEADERS headers,
  else 431.  What llhttp refuses (a bad method, a bad or duplicated Content-Length,
  Content-Length with Transfer-Encoding, a Transfer-Encoding other than chunked, control
  bytes in a header, TLS on the plain port) gets 400.
- Every refusal is the one JSON error format, quotes no input, and closes the connection
  without reading another byte of it: reading stops, the answer is sent with a FIN, and the
  socket is dropped LINGER_S later, which leaves the client time to read the answer.

uvicorn's protocol attributes this relies on (`app`, `transport`, `send_400_response`, the
parser callbacks) are checked by tests/test_web.py, which fails the day they change.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from httptools import HttpParserError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rag.web.errors import json_error

HEAD_MAX_BYTES = 16 * 1024  # a request line and headers, as nginx's default buffers
MAX_HEADERS = 100
LINGER_S = 0.5  # after a refusal, how long the client has to read it before the socket goes


class _Stage(enum.Enum):
    IDLE = "idle"  # waiting for a request: nothing of it has arrived
    HEAD = "head"  # part of a request head has arrived
    BODY = "body"  # the head is complete; the body is not
    ANSWERING = "answering"  # the request has arrived; its answer has not been sent


class _Refused(Exception):
    """A limit this guard puts on the head, raised from a parser callback."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def error_bytes(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 answer in the one error format that closes the connection."""
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()  # as Starlette
    phrase = {400: "Bad Request", 431: "Request Header Fields Too Large"}.get(status, "")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _LingeringTransport:
    """The connection's transport as uvicorn sees it, except that closing it while a request
    is still arriving stops reading at once, sends what was written with a FIN, and drops
    the socket LINGER_S later: nothing more of the request is read, and the client can read
    its answer (closing with unread bytes would send a reset that may destroy it)."""

    def __init__(self, transport: asyncio.Transport, unread: Callable[[], bool]) -> None:
        self._transport = transport
        self._unread = unread
        self._closing = False

    def write(self, data: bytes) -> None:
        """Dropped once closing: an app still answering a request this guard has refused
        (a bad chunk mid-body) must not write after the FIN."""
        if not self._closing:
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if transport.is_closing() or not self._unread() or not transport.can_write_eof():
            transport.close()  # gone already, or nothing unread to cause a reset
            return
        transport.pause_reading()
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, transport.abort)


@dataclass(eq=False)
class ConnectionGuard:
    """The limits and counts shared by every connection of one server; `protocol()` is
    what uvicorn runs them with.  The counts feed /metrics."""

    max_connections: int
    head_timeout_s: float
    refused: int = 0  # requests answered 503 for being over the cap with none idle
    timed_out: int = 0  # connections closed for not sending a request head in time
    evicted: int = 0  # idle connections closed to make room for a new one
    malformed: int = 0  # requests refused as bad HTTP (400, 431)
    open: int = 0
    # Idle connections, oldest first: those that have sent nothing, those between requests.
    _fresh: dict[GuardedProtocol, None] = field(default_factory=dict, repr=False)
    _between: dict[GuardedProtocol, None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.head_timeout_s <= 0:
            raise ValueError("max_connections must be >= 1 and head_timeout_s > 0")

    def protocol(self) -> type[GuardedProtocol]:
        """The protocol class for `uvicorn.Config(http=...)`, bound to this guard."""
        return type("Guarded", (GuardedProtocol,), {"guard": self})

    def make_room(self) -> bool:
        """Close the oldest idle connection, if there is one, to stay within the cap."""
        for idle in (self._fresh, self._between):
            if idle:
                next(iter(idle)).evict()
                self.evicted += 1
                return True
        return False

    @property
    def over_cap(self) -> bool:
        return self.open > self.max_connections

    def idle(self, connection: GuardedProtocol, fresh: bool) -> None:
        (self._fresh if fresh else self._between)[connection] = None

    def busy(self, connection: GuardedProtocol) -> None:
        self._fresh.pop(connection, None)
        self._between.pop(connection, None)


class GuardedProtocol(HttpToolsProtocol):
    guard: ConnectionGuard  # set on the subclass that ConnectionGuard.protocol() makes

    _stage = _Stage.IDLE
    _counted = False  # counted in guard.open
    _head_timer: asyncio.TimerHandle | None = None
    _head_due: float | None = None  # loop time by which a request head must be complete
    _head_bytes = 0
    _headers = 0

    # --- the connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self._unread))  # type: ignore[arg-type]
        guard = self.guard
        guard.open += 1
        self._counted = True
        if guard.over_cap:
            guard.make_room()
        guard.idle(self, fresh=True)
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.guard.busy(self)
        if self._counted:
            self._counted = False
            self.guard.open -= 1
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room: it has sent nothing of a request, so nothing is lost."""
        self.guard.busy(self)
        self._counted = False
        self.guard.open -= 1
        self.transport.close()

    def _unread(self) -> bool:
        return self._stage in (_Stage.HEAD, _Stage.BODY)

    # --- the request head -----------------------------------------------------------------

    def _expect_head(self) -> None:
        """A head is due within the head timeout from now.  One timer per connection,
        re-armed only when it fires early (a request's head and answer cost no timer)."""
        self._head_due = self.loop.time() + self.guard.head_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_due, self._no_head)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _no_head(self) -> None:
        """Too late for a head: closed, or reset when part of one came (there is nothing
        to answer, so no reason to linger)."""
        self._head_timer = None
        if self._head_due is None or self.transport.is_closing():
            return  # a head came in time; the next answer sets a new due time
        if self.loop.time() < self._head_due:
            self._head_timer = self.loop.call_at(self._head_due, self._no_head)
            return
        self.guard.timed_out += 1
        if self._stage is _Stage.HEAD:
            self.transport.abort()
        else:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._stage is _Stage.IDLE:
            self._stage = _Stage.HEAD
            self._head_bytes = self._headers = 0
            self.guard.busy(self)
        if self._stage is _Stage.HEAD:
            self._head_bytes += len(data)
        super().data_received(data)
        too_long = self._stage is _Stage.HEAD and self._head_bytes > HEAD_MAX_BYTES
        if too_long and not self.transport.is_closing():
            self.refuse(431, f"the request head is over {HEAD_MAX_BYTES} bytes")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > HEAD_MAX_BYTES:
            raise _Refused(431, f"the request head is over {HEAD_MAX_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > MAX_HEADERS:
            raise _Refused(431, f"the request has over {MAX_HEADERS} headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_due = None
        self._stage = _Stage.BODY
        guard = self.guard
        if guard.over_cap and not guard.make_room():
            guard.refused += 1
            self.app = _over_capacity(guard.max_connections)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stage = _Stage.ANSWERING
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._stage is _Stage.ANSWERING:  # else a refusal ended the request early
            self._stage = _Stage.IDLE
            self.guard.idle(self, fresh=False)
        self._expect_head()

    # --- refusals -------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this while handling the parser's error: a limit of this guard that a
        callback raised (its context), or what llhttp found wrong (fixed words, no input)."""
        error = sys.exc_info()[1]
        if isinstance(error, HttpParserError) and isinstance(error.__context__, _Refused):
            self.refuse(error.__context__.status, error.__context__.detail)
        else:
            reason = f": {error}" if isinstance(error, HttpParserError) else ""
            self.refuse(400, f"the request is not valid HTTP/1.1{reason}")

    def refuse(self, status: int, detail: str) -> None:
        """Answer `status` in the one error format and close without reading further."""
        self.guard.malformed += 1
        if self._stage is _Stage.IDLE:
            self._stage = _Stage.HEAD
        self.transport.write(error_bytes(status, detail))
        self.transport.close()


def _over_capacity(limit: int) -> Any:
    detail = f"too many open connections (the limit is {limit}); retry shortly"
    return json_error(503, detail, {"Retry-After": "1", "Connection": "close"})
