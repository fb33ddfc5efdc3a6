"""Reading a running balancer in tests: its replicas, its autoscaler's decisions, whether a
process still lives; waiting (with a deadline) for a state to be reached, and loading it
until then."""

from __future__ import annotations

import asyncio
import csv
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from rag.loadgen import LoadConfig, run_load_async


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/replicas", timeout=10).json()


def ready(url: str) -> list[dict]:
    return [r for r in replicas(url) if r["state"] == "ready"]


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]
) -> None:
    """`what` may be a function: what it says at the deadline (a log's rows, say) explains
    a failure better than its name."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what() if callable(what) else what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) has stopped too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def decisions(log: Path) -> list[dict]:
    """The rows of an autoscaler.csv so far (rewritten whole at each check)."""
    return list(csv.DictReader(log.read_text().splitlines())) if log.exists() else []


def decided(log: Path, awaited: str) -> Callable[[], str]:
    """What a test awaiting `awaited` says when it does not come: the log's changes."""

    def explain() -> str:
        rows = decisions(log)
        changes = [r for r in rows if r["verdict"] or r["replicas_after"] != r["replicas_before"]]
        lines = [
            f"{r['elapsed_s']} s: {r['ready']} ready, {r['starting']} starting,"
            f" {r['rps']}/s in, {r['served']}/s out, {r['reason']}"
            for r in changes
        ]
        last = f"; last row: {rows[-1]}" if rows else ""
        return f"{awaited}; {len(rows)} checks, the decisions: {lines}{last}"

    return explain


def load_until(
    config: LoadConfig, done: Callable[[], bool], timeout_s: float, what: Callable[[], str]
) -> tuple[list[dict], dict]:
    """Send `config`'s load until `done()` holds (at most for its duration), then stop
    sending and return every row, as Ctrl-C would (waiting `stop_grace` for answers).
    Verdicts that need arrivals all through their window are reached however long a busy
    machine takes to start a replica, not only within a fixed load."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    result: dict = {}

    def send() -> None:
        result["rows"], result["summary"] = loop.run_until_complete(run_load_async(config, stop))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: done() or not sender.is_alive(), timeout_s, what)
    finally:
        loop.call_soon_threadsafe(stop.set)
        sender.join(config.stop_grace + 30)
    loop.close()
    return result["rows"], result["summary"]
