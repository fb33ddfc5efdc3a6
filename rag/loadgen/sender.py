"""The open-loop sender: each request leaves at its scheduled moment and ends as one row.

Request i starts at t0 + offset i on one monotonic clock, whatever happened to earlier
requests, and its latency runs from that scheduled moment, so a stalled server shows up
as latency instead of as a quietly slower send rate (no coordinated omission).  One
session with an unlimited connection pool, so there is no hidden concurrency cap; no
retries; every failure is classified and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import json
import time
from collections import deque
from typing import Any

import aiohttp
from yarl import URL

from rag.loadgen.schedule import Schedule

SPIN_S = 0.0015  # sleep until this long before a send, then yield-spin: timers are 1 ms coarse
JSON_HEADERS = {"Content-Type": "application/json"}
# Connect errors that mean this process ran out of files or ports: the client's failure.
CLIENT_OS_ERRORS = {errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL}
ROW_COLUMNS = (
    "request_id",
    "query",
    "scheduled_s",
    "sent_s",
    "done_s",
    "send_lag_s",
    "latency_s",
    "service_latency_s",
    "status",
    "error",
    "error_detail",
    "response_bytes",
)


class NotRetried(aiohttp.ClientConnectionError):
    """A connection failure of an idempotent request, which aiohttp would otherwise retry
    once on a fresh connection; a measuring client never retries.  `__cause__` is the
    original error."""


async def _never_retry(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: turn the failures aiohttp retries into NotRetried."""
    try:
        return await handler(request)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise NotRetried(str(exc)) from exc


class _Failed(Exception):
    """A response that arrived but is not a success, already classified."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


@functools.lru_cache(maxsize=256)
def endpoint(base: str, path: str) -> URL:
    """`base` + `path`, unless `base` already names a path of its own."""
    url = URL(base)
    return url.with_path(path) if url.path in ("", "/") else url


def _parse(status: int, payload: bytes, required: str) -> dict[str, Any]:
    """The JSON body of a 2xx response that holds `required`, or _Failed."""
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if not 200 <= status < 300:
        detail = data.get("detail") if isinstance(data, dict) else None
        text = str(detail) if detail is not None else payload.decode("utf-8", "replace")
        raise _Failed(f"http_{status // 100}xx", text[:200])
    if not isinstance(data, dict) or required not in data:
        raise _Failed("bad_body", f"no JSON object with {required!r}: {payload[:100]!r}")
    return data


def _error_class(exc: BaseException) -> str:
    if isinstance(exc, NotRetried) and exc.__cause__ is not None:
        return _error_class(exc.__cause__)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno in CLIENT_OS_ERRORS:
        return "client"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return "bad_body"
    return "client"


def new_row(request_id: int, query: str, scheduled_s: float) -> dict[str, Any]:
    """A request's row before it is sent: every column, its own filled in."""
    return {
        **dict.fromkeys(ROW_COLUMNS),
        "request_id": request_id,
        "query": query,
        "scheduled_s": scheduled_s,
    }


def _server_fields(row: dict[str, Any], data: dict[str, Any]) -> None:
    """Copy what the server reports about itself into `server_*` columns."""
    timings = data.get("timings")
    if isinstance(timings, dict):
        for key, value in timings.items():
            row["server_" + key] = value
    for key in ("batch_size", "replica"):
        if key in data:
            row["server_" + key] = data[key]


class Sender:
    """Sends one schedule to one target and fills `rows`, one per scheduled request.

    With `assign`, each request first asks `GET <target>/assign` for a backend (the older
    two-step load balancer) and then posts to exactly the URL it was given.
    `max_in_flight` > 0 caps concurrency; the wait for a slot delays the send and so shows
    as send lag and latency.
    """

    def __init__(
        self,
        schedule: Schedule,
        target: str,
        *,
        path: str = "/rag",
        k: int = 2,
        assign: bool = False,
        timeout: float = 60.0,
        max_in_flight: int = 0,
        stop_grace: float = 5.0,
    ) -> None:
        self.offsets = schedule.offsets
        self.k = k
        self._encoded: dict[str, bytes] = {}
        self.bodies = [self.body(q) for q in schedule.queries]
        self.rows: list[dict[str, Any]] = [
            new_row(i, q, float(t))
            for i, (t, q) in enumerate(zip(schedule.offsets, schedule.queries, strict=True))
        ]
        self.url = endpoint(target, path)
        self.assign_url = endpoint(target, "/assign") if assign else None
        self.timeout = timeout
        self.stop_grace = stop_grace
        self.slot: Any = (
            asyncio.Semaphore(max_in_flight) if max_in_flight > 0 else contextlib.nullcontext()
        )
        self.t0 = 0.0
        # Progress: launched = started at their scheduled moment (sent, or waiting for a
        # slot); succeeded and failed = those of them that have ended, by outcome.
        self.launched = 0
        self.succeeded = 0
        self.failed = 0
        self.recent: deque[float] = deque(maxlen=1000)  # latest latencies, for progress
        self.session: aiohttp.ClientSession

    @property
    def planned(self) -> int | None:
        """Requests the run will send, when known before it ends."""
        return len(self.rows)

    def body(self, query: str) -> bytes:
        """The JSON request body for `query` (encoded once per distinct query)."""
        if query not in self._encoded:
            self._encoded[query] = json.dumps({"query": query, "k": self.k}).encode()
        return self._encoded[query]

    async def run(self, stop: asyncio.Event) -> bool:
        """Send the whole schedule (until `stop`), wait for what is in flight, then derive
        each row's intervals; True when stopped early."""
        connector = aiohttp.TCPConnector(limit=0)  # no hidden cap: the schedule decides
        async with aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),  # our own per-request timeout
        ) as self.session:
            pending: set[asyncio.Task[None]] = set()
            gc.freeze()  # the rows are long-lived: keep collections from scanning them
            try:
                await self._send_all(stop, pending)
                await self._drain(stop, pending)
            finally:
                gc.unfreeze()
        finish_rows(self.rows)
        return stop.is_set()

    async def _send_all(self, stop: asyncio.Event, pending: set[asyncio.Task[None]]) -> None:
        """Start request i at t0 + offset i: sleep until just before, then yield-spin, so
        a send is neither early nor late by a timer's coarseness."""
        clock = time.perf_counter
        create_task = asyncio.get_running_loop().create_task
        self.t0 = t0 = clock()
        due = (t0 + self.offsets).tolist()
        n = len(due)
        i = 0
        while i < n and not stop.is_set():
            now = clock()
            while i < n and due[i] <= now:
                task = create_task(self._request(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
            self.launched = i
            if i < n:
                wait = due[i] - clock()
                await asyncio.sleep(wait - SPIN_S if wait > SPIN_S else 0)

    async def _drain(self, stop: asyncio.Event, pending: set[asyncio.Task[None]]) -> None:
        """Wait for every request in flight; once stopped, only for `stop_grace` seconds,
        then cancel the rest (their rows say so)."""
        if pending:
            all_done = asyncio.ensure_future(asyncio.wait(set(pending)))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({all_done, stopped}, return_when=asyncio.FIRST_COMPLETED)
            all_done.cancel()
            stopped.cancel()
        if pending:
            await asyncio.wait(set(pending), timeout=self.stop_grace)
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _request(self, i: int) -> None:
        row = self.rows[i]
        try:
            async with self.slot:
                await self._exchange(row, self.bodies[i])
        except asyncio.CancelledError:
            row["error"] = "cancelled" if row["sent_s"] is not None else "not_sent"
            raise
        if row["error"] is None:
            self.succeeded += 1
            self.recent.append(row["done_s"] - row["scheduled_s"])
        else:
            self.failed += 1

    async def _exchange(self, row: dict[str, Any], body: bytes) -> None:
        """One request, once: fill in its times, status and outcome."""
        clock, t0, session = time.perf_counter, self.t0, self.session
        row["sent_s"] = clock() - t0
        try:
            async with asyncio.timeout(self.timeout):
                url = self.url
                if self.assign_url is not None:
                    async with session.get(
                        self.assign_url, allow_redirects=False, middlewares=(_never_retry,)
                    ) as resp:
                        payload = await resp.read()
                    row["status"] = resp.status
                    row["backend"] = backend = str(
                        _parse(resp.status, payload, "backend")["backend"]
                    )
                    url = URL(backend)
                async with session.post(
                    url, data=body, headers=JSON_HEADERS, allow_redirects=False
                ) as resp:
                    payload = await resp.read()
            row["done_s"] = clock() - t0
            row["status"] = resp.status
            row["response_bytes"] = len(payload)
            _server_fields(row, _parse(resp.status, payload, "result"))
        except _Failed as failure:
            if row["done_s"] is None:
                row["done_s"] = clock() - t0
            row["error"], row["error_detail"] = failure.error, failure.detail
        except Exception as exc:
            row["done_s"] = clock() - t0
            row["error"] = _error_class(exc)
            row["error_detail"] = f"{type(exc).__name__}: {exc}"[:200]


def finish_rows(rows: list[dict[str, Any]]) -> None:
    """Derive the per-row intervals and mark what never finished."""
    for row in rows:
        scheduled, sent, done = row["scheduled_s"], row["sent_s"], row["done_s"]
        if sent is None:
            row["error"] = row["error"] or "not_sent"
        else:
            row["send_lag_s"] = sent - scheduled
            if done is None:
                row["error"] = row["error"] or "cancelled"
        if done is not None:
            row["latency_s"] = done - scheduled
            row["service_latency_s"] = done - sent
