"""Reading a running balancer in tests: its replicas, whether a process still lives, and
waiting (with a deadline) for a state to be reached."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/replicas", timeout=10).json()


def ready(url: str) -> list[dict]:
    return [r for r in replicas(url) if r["state"] == "ready"]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


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
