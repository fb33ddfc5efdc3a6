"""A streaming client for the benchmarks: streamed `/rag` requests on a schedule (open
loop, poisson) or from N users in a closed loop, each timed at its first token event and at
its end, in one asyncio loop.  Time is from each request's scheduled send (open loop), so a
slow server cannot hide its queue."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp

QUERIES = (
    "Which animals can hover in the air?",
    "How is sushi made?",
    "What is machine learning?",
    "Why is the sky blue?",
    "Who built the first telescope?",
)


@dataclass
class Timed:
    ttft_s: float  # from the scheduled send to the first token event (inf: none)
    end_s: float  # to the last byte
    tokens: int  # completion tokens (the answer's usage)
    ok: bool


async def one(session: aiohttp.ClientSession, url: str, body: dict, sent: float) -> Timed:
    """One request, streamed or not (`body["stream"]`), timed from `sent`."""
    first = float("inf")
    answer: dict = {}
    try:
        async with session.post(f"{url}/rag", json=body) as response:
            if response.status != 200:
                await response.read()
                return Timed(first, time.perf_counter() - sent, 0, False)
            if not body.get("stream"):
                answer = await response.json()
                end = time.perf_counter() - sent
                return Timed(end, end, answer["usage"]["completion_tokens"], True)
            event = ""
            async for line in response.content:
                text = line.decode().strip()
                if text.startswith("event:"):
                    event = text.removeprefix("event:").strip()
                elif text.startswith("data:") and event == "token" and first == float("inf"):
                    first = time.perf_counter() - sent
                elif text.startswith("data:") and event == "done":
                    answer = json.loads(text.removeprefix("data:"))
    except (aiohttp.ClientError, TimeoutError):
        return Timed(first, time.perf_counter() - sent, 0, False)
    tokens = answer.get("usage", {}).get("completion_tokens", 0)
    return Timed(first, time.perf_counter() - sent, tokens, bool(answer))


def body_of(n: int, stream: bool, extra: dict | None) -> dict:
    return {"query": QUERIES[n % len(QUERIES)], "k": 2, "stream": stream, **(extra or {})}


async def open_loop(url: str, rps: float, seconds: float, seed: int, stream: bool = True,
                    extra: dict | None = None) -> list[Timed]:  # fmt: skip
    """Poisson arrivals at `rps` for `seconds`."""
    rng = random.Random(seed)
    gaps, at = [], 0.0
    while (at := at + rng.expovariate(rps)) < seconds:
        gaps.append(at)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter() + 0.05
        tasks = []
        for n, offset in enumerate(gaps):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            body = body_of(n, stream, extra)
            tasks.append(asyncio.create_task(one(session, url, body, start + offset)))
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, users: int, seconds: float, stream: bool,
                      extra: dict | None = None) -> tuple[list[Timed], float]:  # fmt: skip
    """`users` users for `seconds`, each sending its next request when its answer ends;
    the answers and the wall time they took (from the first send to the last answer)."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    done: list[Timed] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def user(u: int) -> None:
            n = u
            while time.perf_counter() - start < seconds:
                done.append(await one(session, url, body_of(n, stream, extra), time.perf_counter()))
                n += users

        await asyncio.gather(*(user(u) for u in range(users)))
        return done, time.perf_counter() - start


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("inf")
