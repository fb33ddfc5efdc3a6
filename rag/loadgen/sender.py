"""The open-loop sender: each request leaves at its scheduled moment and ends as one row.

Request i starts at t0 + offset i on one monotonic clock, whatever happened to earlier
requests, and its latency runs from that scheduled moment, so a stalled server shows up
as latency instead of as a quietly slower send rate (no coordinated omission); so does its
time to first token.  One session with an unlimited connection pool, so there is no hidden
concurrency cap; no retries; every failure is classified and kept.  What a request's body
is and what its answer means is its API's business (`rag.loadgen.apis`); a streamed answer
is read event by event as it arrives, each text event's arrival kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import numpy as np
from yarl import URL

from rag.loadgen.apis import MODELS_PATH, Api, Failed, Reply, error_detail, served_model
from rag.loadgen.schedule import Schedule
from rag.loadgen.sse import EventReader

# The event loop's timers are 1 ms coarse: a send sleeps on one until this long before its
# moment, then on the kernel's high-resolution timer in a thread.
COARSE_S = 0.0015
# Connect errors that mean this process ran out of files or ports: the client's failure.
CLIENT_OS_ERRORS = {errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL}
ROW_COLUMNS = (
    "request_id",
    "query",
    "max_tokens",
    "scheduled_s",
    "sent_s",
    "first_token_s",
    "done_s",
    "send_lag_s",
    "latency_s",
    "service_latency_s",
    "ttft_s",
    "tpot_s",
    "itl_mean_s",
    "itl_max_s",
    "prompt_tokens",
    "output_tokens",
    "status",
    "error",
    "error_detail",
    "response_bytes",
)
TOKEN_TIMES = "token_times"  # a row's text-event arrivals: in memory for the summary, not in CSV


def csv_table(
    rows: list[dict[str, Any]], leading: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows as requests.csv holds them, and its columns: `leading` (a sweep point's
    own columns, the same on every row) first, then the fixed columns, then whatever some
    rows add (backend, server_*, tag), sorted; the token times stay in memory."""
    leading = leading or {}
    table = [{**leading, **{k: v for k, v in row.items() if k != TOKEN_TIMES}} for row in rows]
    extra = set().union(*table) - {*leading, *ROW_COLUMNS} if table else set()
    return table, [*leading, *ROW_COLUMNS, *sorted(extra)]


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


@functools.lru_cache(maxsize=256)
def endpoint(base: str, path: str) -> URL:
    """`base` + `path`, unless `base` already names a path of its own."""
    url = URL(base)
    return url.with_path(path) if url.path in ("", "/") else url


def _refused(status: int, payload: bytes) -> Failed:
    """A non-2xx answer as its failure, with the server's own message when it gave one."""
    try:
        detail = error_detail(json.loads(payload))
    except ValueError:
        detail = None
    text = detail if detail is not None else payload.decode("utf-8", "replace")
    return Failed(f"http_{status // 100}xx", text)


def _keep_retry_after(row: dict[str, Any], header: str | None) -> None:
    """A refusal's `Retry-After` in seconds, as `retry_after_s` (a date form is ignored)."""
    with contextlib.suppress(TypeError, ValueError):
        row["retry_after_s"] = max(0.0, float(header))  # type: ignore[arg-type]


def _error_class(exc: BaseException, streaming: bool) -> str:
    if isinstance(exc, NotRetried) and exc.__cause__ is not None:
        return _error_class(exc.__cause__, streaming)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno in CLIENT_OS_ERRORS:
        return "client"
    if streaming and isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return "stream_cut"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return "bad_body"
    return "client"


def new_row(request_id: int, query: str, max_tokens: int, scheduled_s: float) -> dict[str, Any]:
    """A request's row before it is sent: every column, its own filled in."""
    return {
        **dict.fromkeys(ROW_COLUMNS),
        "request_id": request_id,
        "query": query,
        "max_tokens": max_tokens,
        "scheduled_s": scheduled_s,
    }


def _keep_reply(row: dict[str, Any], reply: Reply, streamed: bool) -> None:
    """What the answer said about itself, into the row."""
    if streamed:
        row[TOKEN_TIMES] = reply.token_times
    row["prompt_tokens"] = reply.prompt_tokens
    row["output_tokens"] = reply.output_tokens
    row.update(reply.server)


class Sender:
    """Sends one schedule to one target through one API and fills `rows`, one per
    scheduled request.

    `path` overrides the API's own path.  An OpenAI API without a model name asks the
    target's `/v1/models` once before the first send.  With `assign`, each request first
    asks `GET <target>/assign` for a backend (the older two-step load balancer) and then
    posts to exactly the URL it was given.  `max_in_flight` > 0 caps concurrency; the wait
    for a slot delays the send and so shows as send lag and latency.
    """

    def __init__(
        self,
        schedule: Schedule,
        target: str,
        api: Api,
        *,
        path: str = "",
        assign: bool = False,
        timeout: float = 60.0,
        max_in_flight: int = 0,
        stop_grace: float = 5.0,
    ) -> None:
        self.offsets = schedule.offsets
        self.api = api
        self.target = target
        self._encoded: dict[tuple[str, int], bytes] = {}
        self.bodies: list[bytes] = []
        self.rows: list[dict[str, Any]] = [
            new_row(i, q, m, float(t))
            for i, (t, q, m) in enumerate(
                zip(schedule.offsets, schedule.queries, schedule.max_tokens, strict=True)
            )
        ]
        self.url = endpoint(target, path or api.path)
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
        self.headers: dict[str, str] = {}

    @property
    def planned(self) -> int | None:
        """Requests the run will send, when known before it ends."""
        return len(self.rows)

    def body(self, query: str, max_tokens: int) -> bytes:
        """The JSON request body (encoded once per distinct query and length)."""
        key = (query, max_tokens)
        if key not in self._encoded:
            self._encoded[key] = json.dumps(self.api.body(query, max_tokens)).encode()
        return self._encoded[key]

    async def _name_the_model(self) -> None:
        """Ask the target which model it serves, where the API needs one and none is given."""
        if not self.api.needs_model or self.api.options.model:
            return
        url = endpoint(self.target, MODELS_PATH).with_path(MODELS_PATH)
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.get(url, headers=self.api.headers()) as resp:
                    payload = await resp.read()
            if resp.status != 200:
                raise ValueError(f"status {resp.status}")
            model = served_model(payload)
        except (ValueError, TimeoutError, aiohttp.ClientError) as exc:
            raise ValueError(
                f"could not learn the model from {url} ({exc}): give model_name"
            ) from None
        self.api = type(self.api)(dataclasses.replace(self.api.options, model=model))

    async def run(self, stop: asyncio.Event) -> bool:
        """Send the whole schedule (until `stop`), wait for what is in flight, then derive
        each row's intervals; True when stopped early."""
        connector = aiohttp.TCPConnector(limit=0)  # no hidden cap: the schedule decides
        async with aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),  # our own per-request timeout
        ) as self.session:
            await self._name_the_model()
            self.headers = self.api.headers()
            self.bodies = [self.body(r["query"], r["max_tokens"]) for r in self.rows]
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
        """Start request i at t0 + offset i: sleep on the loop's timer until just before,
        then in a thread to the moment, so that a send is neither early nor late by the
        loop timer's coarseness, and no CPU is spent spinning (a client sharing a small
        machine would take it from the service it measures)."""
        clock = time.perf_counter
        loop = asyncio.get_running_loop()
        create_task = loop.create_task
        self.t0 = t0 = clock()
        due = (t0 + self.offsets).tolist()
        n = len(due)
        i = 0
        with ThreadPoolExecutor(1, thread_name_prefix="loadgen-pacer") as pacer:
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
                    if wait > COARSE_S:
                        await asyncio.sleep(wait - COARSE_S)
                    elif wait > 0:
                        await loop.run_in_executor(pacer, time.sleep, wait)

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

    async def _backend(self, row: dict[str, Any]) -> URL:
        """Where to post: the target, or in assign mode the backend it names."""
        if self.assign_url is None:
            return self.url
        async with self.session.get(
            self.assign_url, allow_redirects=False, middlewares=(_never_retry,)
        ) as resp:
            payload = await resp.read()
        row["status"] = resp.status
        if not 200 <= resp.status < 300:
            raise _refused(resp.status, payload)
        try:
            row["backend"] = backend = str(json.loads(payload)["backend"])
        except (ValueError, KeyError, TypeError):
            raise Failed("bad_body", f"no JSON object with 'backend': {payload[:100]!r}") from None
        return URL(backend)

    async def _exchange(self, row: dict[str, Any], body: bytes) -> None:
        """One request, once: fill in its times, status and outcome."""
        clock, t0 = time.perf_counter, self.t0
        row["sent_s"] = clock() - t0
        reply, streamed = Reply(), False
        try:
            async with asyncio.timeout(self.timeout):
                url = await self._backend(row)
                async with self.session.post(
                    url, data=body, headers=self.headers, allow_redirects=False
                ) as resp:
                    row["status"] = resp.status
                    ok = 200 <= resp.status < 300
                    if ok and resp.content_type == "text/event-stream":
                        streamed = True
                        await self._read_stream(resp, row, reply)
                    else:
                        payload = await resp.read()
                        row["response_bytes"] = len(payload)
                        if not ok:
                            _keep_retry_after(row, resp.headers.get("Retry-After"))
                            raise _refused(resp.status, payload)
                        self.api.whole(payload, reply)
            row["done_s"] = clock() - t0
        except Failed as failure:
            row["done_s"] = clock() - t0
            row["error"], row["error_detail"] = failure.error, failure.detail
        except Exception as exc:
            row["done_s"] = clock() - t0
            row["error"] = _error_class(exc, streamed)
            row["error_detail"] = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            _keep_reply(row, reply, streamed)

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, row: dict[str, Any], reply: Reply
    ) -> None:
        """Read the events as they arrive, each chunk's events stamped with its arrival."""
        clock, t0, api = time.perf_counter, self.t0, self.api
        reader = EventReader()
        row["response_bytes"] = 0
        async for chunk in resp.content.iter_any():
            now = clock() - t0
            row["response_bytes"] += len(chunk)
            for event in reader.feed(chunk):
                api.event(event, now, reply)
        if not reply.ended:
            raise Failed("stream_cut", "the stream ended before its last event")


def _token_figures(row: dict[str, Any]) -> None:
    """TTFT from the scheduled send; inter-token latency between text events; time per
    output token after the first, over the output tokens counted (as vLLM's TPOT)."""
    times = row.get(TOKEN_TIMES)
    if not times:
        return
    first, last = times[0], times[-1]
    row["first_token_s"] = first
    row["ttft_s"] = first - row["scheduled_s"]
    if len(times) > 1:
        gaps = np.diff(times)
        row["itl_mean_s"] = float(gaps.mean())
        row["itl_max_s"] = float(gaps.max())
    tokens = row["output_tokens"]
    if len(times) > 1 and tokens is not None and tokens > 1:
        row["tpot_s"] = (last - first) / (tokens - 1)


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
        _token_figures(row)
