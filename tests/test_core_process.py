"""A server is two processes: the HTTP process (torch-free) and its core process (models,
index, engine, serving loop).  Each one's death is the other's, and the server's failure."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvloop
from cluster_helpers import alive, wait_for
from server_metrics import metric
from sse_helpers import events

from rag.config import compose
from rag.service.core_link import CoreLink
from rag.service.events import Event, Kind
from rag.service.questions import Decoding, Question

HOVER = "Which animals can hover in the air?"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def core_of(front: int) -> int:
    """The core process: the front's child that loaded torch."""
    (core,) = [pid for pid in children(front) if loads_torch(pid)]
    return core


def loads_torch(pid: int) -> bool:
    """Whether torch's native library is mapped into the process (importing torch maps it)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("variant", ["base", "batched", "continuous"])
def test_a_ready_servers_http_process_never_loads_torch(shared_server, variant):
    server = shared_server(variant=variant)
    answer = httpx.post(f"{server.url}/rag", json={"query": HOVER, "stream": True}, timeout=60)
    assert answer.status_code == 200
    for route in ("/stats", "/metrics", "/openapi.json"):
        assert httpx.get(f"{server.url}{route}", timeout=30).status_code == 200
    front = server.process.pid
    assert not loads_torch(front)
    assert loads_torch(core_of(front))  # the check would see torch where it is


def test_the_core_dying_fails_the_server_and_its_open_requests(start_server):
    """A stream in flight ends with a 503 error event, and the HTTP process exits non-zero
    (a launcher restarts it)."""
    server = start_server("variant=continuous", "server.max_tokens_limit=4000")
    body = {"query": HOVER, "k": 1, "stream": True, "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/rag", json=body, timeout=60) as response:
        received = []
        for name, data in events(response):
            received.append((name, data))
            if name == "token" and len(received) == 2:
                os.kill(core_of(server.process.pid), signal.SIGKILL)
    assert received[0][0] == "docs" and received[1][0] == "token"
    assert received[-1] == ("error", {"detail": "the compute process has ended"})
    assert server.process.wait(30) != 0


def test_the_core_ends_when_only_the_http_process_is_killed(start_server):
    server = start_server("variant=batched")
    core = core_of(server.process.pid)
    server.process.kill()  # the HTTP process alone, by SIGKILL: no chance to stop the core
    server.process.wait(30)
    try:
        wait_for(lambda: not alive(core), 30, "the core process ended with the HTTP process")
    finally:
        if alive(core):
            os.kill(core, signal.SIGKILL)


def test_a_message_larger_than_the_pipe_reaches_the_core(tmp_path):
    """On uvloop (what the server runs on), whose reader makes the pipe non-blocking, a
    message the pipe cannot hold at once still goes through whole: the question arrives
    and is answered (here refused for its length), and the core lives on."""
    cfg = compose(["model=simulated", f"corpus.cache_dir={tmp_path}"])

    async def ask() -> list[Event]:
        answered: asyncio.Queue[list[Event]] = asyncio.Queue()
        ready = asyncio.Event()
        link = CoreLink(
            cfg,
            deliver=answered.put_nowait,
            on_ready=lambda _: ready.set(),
            on_failure=lambda detail: answered.put_nowait([]),
            on_batch=lambda _: None,
        )
        link.start()
        try:
            await asyncio.wait_for(ready.wait(), 120)
            link.submit(Question("x" * 2**24, 2, Decoding(4)), timeout_s=60)
            return await asyncio.wait_for(answered.get(), 120)
        finally:
            link.close()

    (event,) = uvloop.run(ask())
    assert event.kind is Kind.ERROR and event.payload["status"] == 422


def test_while_the_core_refuses_every_arrival_the_http_process_answers_429_itself(start_server):
    """A full queue behind a running batch shuts the door: the core says until when, the
    HTTP process answers 429 on its word (the core never hears of it) before reading the
    request (a malformed body is refused alike), in each route's own error format, every
    refusal is counted in /stats and /metrics, and once the running batch has ended the
    door is open again.  The simulated model's batches take seconds, so the door stays
    shut far longer than the test needs."""
    server = start_server(
        "variant.max_batch_size=1",
        "variant.max_queue=1",
        "variant.max_wait_ms=0",
        "model.simulated.generate_fixed_ms=3000",
        model="simulated",
    )

    def post() -> httpx.Response:
        return httpx.post(f"{server.url}/rag", json={"query": HOVER}, timeout=60)

    def stats() -> dict:
        return httpx.get(f"{server.url}/stats", timeout=10).json()

    assert post().status_code == 200  # a batch measured: the door's estimates exist
    assert stats()["door_shut_for_s"] is None
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post)
        wait_for(lambda: stats()["running"] == 1, 30, "a batch running")
        queued = pool.submit(post)
        wait_for(lambda: stats()["door_shut_for_s"] is not None, 30, "the door shut")
        refused = post()
        assert refused.status_code == 429
        assert "queue is full" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        malformed = httpx.post(f"{server.url}/rag", content=b"{not json", timeout=10)
        assert malformed.status_code == 429 and "queue is full" in malformed.json()["detail"]
        completion = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": HOVER, "max_tokens": 4}, timeout=10
        )
        assert completion.status_code == 429
        assert "queue is full" in completion.json()["error"]["message"]
        counts = stats()
        assert counts["refused_by_front"] == 3 and counts["refused"] == 3
        assert metric(server.url, "rag_refused_total") == 3
        assert metric(server.url, 'rag_requests_total{status="429"}') == 2
        v1 = 'rag_v1_requests_total{endpoint="/v1/completions",status="429"}'
        assert metric(server.url, v1) == 1
        assert running.result().status_code == 200
        assert queued.result().status_code == 200
    assert post().status_code == 200  # the door open again
    assert stats()["refused"] == 3
