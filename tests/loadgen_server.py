"""A real HTTP server on 127.0.0.1 for the load generator's tests.

It runs aiohttp.web in its own thread and event loop, counts every hit by path, and
answers with whatever async behaviour a test sets, so a test can make it slow, stall,
fail or misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def rag_ok(request: web.Request) -> web.Response:
    """What the service answers: the query, a result and its own timings."""
    body = await request.json()
    return web.json_response(
        {
            "query": body["query"],
            "result": "an answer",
            "docs": [],
            "timings": {
                "queue_ms": 1.5,
                "embed_ms": 2.0,
                "retrieve_ms": 0.5,
                "generate_ms": 10.0,
                "total_ms": 14.0,
            },
            "batch_size": 3,
            "replica": "r0",
        }
    )


class LocalServer:
    """Start with `with LocalServer() as server:`; `server.url` is its base URL."""

    def __init__(self, behaviour: Behaviour = rag_ok) -> None:
        self.behaviour = behaviour
        self.hits: Counter[str] = Counter()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        return await self.behaviour(request)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> LocalServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def event_stream(
    request: web.Request, events: list[tuple[str, object]], gap_s: float = 0.0
) -> web.StreamResponse:
    """Answer with Server-Sent Events, each (name, data) written and flushed on its own,
    `gap_s` apart; a name of "" sends a bare `data:` event, data that is not a string is
    sent as JSON."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, (name, data) in enumerate(events):
        if i and gap_s:
            await asyncio.sleep(gap_s)
        text = data if isinstance(data, str) else json.dumps(data)
        await response.write(((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode())
    await response.write_eof()
    return response


def rag_events(tokens: int, usage: bool = True) -> list[tuple[str, object]]:
    """A streamed /rag answer: docs, one token event per step, done."""
    done: dict[str, object] = {
        "result": "word " * tokens,
        "timings": {"queue_ms": 1.0, "generate_ms": 5.0, "total_ms": 7.0},
        "batch_size": 2,
        "ttft_ms": 3.0,
        "tpot_ms": 1.0,
    }
    if usage:
        done["usage"] = {"prompt_tokens": 40, "completion_tokens": tokens}
    return [
        ("docs", {"query": "q", "docs": []}),
        *(("token", {"text": "word ", "tokens": i + 1}) for i in range(tokens)),
        ("done", done),
    ]


def chat_chunks(tokens: int, usage: bool = True) -> list[tuple[str, object]]:
    """A streamed chat completion as vLLM sends it: a role chunk with no text, a chunk
    per token, a finishing chunk, usage when asked, [DONE]."""

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"object": "chat.completion.chunk", "usage": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    events: list[tuple[str, object]] = [("", chunk({"role": "assistant", "content": ""}))]
    events += [("", chunk({"content": f"w{i} "})) for i in range(tokens)]
    events.append(("", chunk({}, "length")))
    if usage:
        events.append(("", {"choices": [], "usage": {"prompt_tokens": 9,
                                                      "completion_tokens": tokens}}))  # fmt: skip
    return [*events, ("", "[DONE]")]
