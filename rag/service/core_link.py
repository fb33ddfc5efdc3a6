"""The HTTP process's end of the core process (rag.service.core): starts it, sends it
questions, cancels and calls, and hands what it says to the HTTP side.

Torch-free: the HTTP process never imports the models.  The pipe is read on the event loop
(`add_reader`), a few microseconds of unpickling per message.  The core's death (the pipe's
EOF) is the server's failure: every open request hears 503 and `on_death` runs.

While the core says its door is shut (rag.service.core: every arrival would be refused,
until a given moment), `submit` answers 429 here, with the core's reason, and counts it in
`refused`; the core hears nothing of those questions.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from rag.config import Config
from rag.service.answering import error_payload
from rag.service.batching import Overloaded
from rag.service.events import Event, Kind
from rag.service.questions import Question
from rag.service.validation import QueryLimits


class CoreGone(Exception):
    """The core process ended: nothing can be answered any more (503)."""


class CoreLink:
    def __init__(
        self,
        cfg: Config,
        deliver: Callable[[list[Event]], None],
        on_ready: Callable[[QueryLimits], None],
        on_failure: Callable[[str], None],
        on_batch: Callable[[int], None],
    ) -> None:
        """`deliver` takes the answers' events; `on_ready` the corpus's limits once the
        models are loaded and warm; `on_failure` why loading failed or the core died;
        `on_batch` the size of each batch (continuous: step) computed."""
        self.cfg = cfg
        self.deliver = deliver
        self.on_ready = on_ready
        self.on_failure = on_failure
        self.on_batch = on_batch
        self.process: multiprocessing.process.BaseProcess | None = None
        self._calls = itertools.count(1)
        self._replies: dict[int, asyncio.Future] = {}
        self._open: set[int] = set()  # questions submitted and not yet answered
        self._gone = False
        self._door: tuple[float, str] | None = None  # shut until (monotonic), and why
        self.refused = 0  # questions answered 429 here, the core's door being shut

    def start(self) -> None:
        """Spawn the core process and read its pipe on the running event loop."""
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        from rag.service import core  # torch-free at import: the models load in the child

        self.process = context.Process(
            target=core.main, args=(self.cfg, child, os.getpid()), name="ragbench-core"
        )
        self.process.start()
        child.close()
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._read)
        # uvloop's reader makes the descriptor non-blocking, and a Connection needs it
        # blocking (a full pipe would fail a send); the core reads promptly, its own sends
        # never wait for this process, so a send here waits at most for the core's loop.
        os.set_blocking(self.conn.fileno(), True)

    def submit(self, question: Question, timeout_s: float) -> None:
        """Its events follow (the first may be its refusal)."""
        if self._gone:
            self.deliver([_gone(question.id)])
            return
        refusal = self.door_refusal()
        if refusal is not None:
            self.deliver([Event(question.id, Kind.ERROR, refusal)])
            return
        self._open.add(question.id)
        self._send(("submit", question, timeout_s))

    def door_refusal(self) -> dict[str, Any] | None:
        """While the core says its door is shut, the 429 payload for an arrival (counted
        in `refused`); None while it is open."""
        shut_for = self.door_shut_for()
        if self._gone or shut_for is None or self._door is None:
            return None
        self.refused += 1
        return error_payload(Overloaded(self._door[1], shut_for))

    def door_shut_for(self) -> float | None:
        """Seconds until the core's door opens, as the core last said; None while open."""
        if self._door is None:
            return None
        left = self._door[0] - time.monotonic()
        return left if left > 0 else None

    def cancel(self, request: int) -> None:
        if request in self._open:
            self._open.discard(request)
            self._send(("cancel", request))

    async def call(self, name: str, argument: Any = None) -> Any:
        """One call on the core (stats, threads, drain) and its reply."""
        if self._gone:
            raise CoreGone("the compute process has ended")
        call = next(self._calls)
        future = self._replies[call] = asyncio.get_running_loop().create_future()
        self._send(("call", call, name, argument))
        return await future

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:
            self._die()

    def _read(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._die()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            events: list[Event] = message[1]
            for event in events:
                if event.final:
                    self._open.discard(event.request)
            self.deliver(events)
        elif kind == "batch":
            self.on_batch(message[1])
        elif kind == "door":
            self._door = message[1]
        elif kind == "reply":
            future = self._replies.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "ready":
            self.on_ready(message[1])
        elif kind == "failed":
            self.on_failure(message[1])

    def _die(self) -> None:
        """The core has ended: every open request and call hears it, once."""
        if self._gone:
            return
        self._gone = True
        asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.deliver([_gone(request) for request in self._open])
        self._open.clear()
        for future in self._replies.values():
            if not future.done():
                future.set_exception(CoreGone("the compute process has ended"))
        self._replies.clear()
        self.on_failure("the compute process has ended")

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipe (the core stops at its EOF) and wait for the process to end."""
        if self.process is None:
            return
        if not self._gone:
            self._gone = True
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.conn.close()
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _gone(request: int) -> Event:
    return Event(request, Kind.ERROR, {"status": 503, "detail": "the compute process has ended"})
