"""Driving a server's bounded queue from tests: requests sent from threads, a request sent
exactly when one is running and the queue is full, and one that joins a running one."""

from __future__ import annotations

import threading
import time

import httpx
from cluster_helpers import wait_for

# Several seconds a request on the tiny model: long enough to be seen running on a busy machine.
LONG = ("model.ignore_eos=true", "model.max_new_tokens=5000")


def post(url: str, body: object, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/rag", json=body, timeout=timeout)


def stats(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=10).json()


def send_in_background(url: str, bodies: list[dict]) -> tuple[list[threading.Thread], dict]:
    """Start one thread per request; the responses land in the returned dict by index."""
    results: dict[int, httpx.Response] = {}

    def send(i: int, body: dict) -> None:
        results[i] = post(url, body)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for thread in threads:
        thread.start()
    return threads, results


def sent_to_a_full_queue(url: str, body: dict, timeout_s: float = 240) -> httpx.Response:
    """The answer to a third request sent while one runs and one waits, on a server with
    one batch slot and a queue of one (and LONG requests).  On a busy machine the running
    request can end while this process waits for a core, before the second is seen queued
    or before the third arrives (which is then rightly queued, 200): such a round is
    repeated until a third meets a full queue."""
    deadline = time.monotonic() + timeout_s
    while True:
        # One at a time: two sent together could both find the queue before either runs.
        running_threads, running = send_in_background(url, [body])
        wait_for(lambda: stats(url)["running"] == 1, 60, "one running")
        queued_threads, queued = send_in_background(url, [body])
        first = running_threads[0]
        wait_for(
            lambda first=first: stats(url)["queue_depth"] == 1 or not first.is_alive(),
            60,
            "one running, one queued (or the running one answered first)",
        )
        third = post(url, body)
        for thread in running_threads + queued_threads:
            thread.join(120)
        assert (running[0].status_code, queued[0].status_code) == (200, 200)
        if third.status_code == 429:
            return third
        assert third.status_code == 200 and time.monotonic() < deadline, third.text


def joined_while_running(
    url: str, first: dict, second: dict, timeout_s: float = 240
) -> tuple[httpx.Response, httpx.Response]:
    """The answers to `second`, sent while `first` (LONG) decodes, and to `first`, once the
    two have run in one batch.  On a busy machine the first can end while this process
    waits for a core, before the second joins it: such a round is repeated until the two
    are seen running together."""
    deadline = time.monotonic() + timeout_s
    while True:
        early_threads, early = send_in_background(url, [first])
        wait_for(lambda: stats(url)["running"] == 1, 60, "the first request decoding")
        late_threads, late = send_in_background(url, [second])
        together = False

        def joined_or_over(thread: threading.Thread = early_threads[0]) -> bool:
            nonlocal together
            together = together or stats(url)["running"] == 2
            return together or not thread.is_alive()

        wait_for(joined_or_over, 60, "the newcomer in the running batch (or the first answered)")
        for thread in early_threads + late_threads:
            thread.join(120)
        assert (early[0].status_code, late[0].status_code) == (200, 200)
        if together:
            return early[0], late[0]
        assert time.monotonic() < deadline, "the two never ran together"
