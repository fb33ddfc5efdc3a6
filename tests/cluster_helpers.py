"""Reading a running balancer in tests: its replicas, and waiting (with a deadline) for a
state to be reached."""

from __future__ import annotations

import time
from collections.abc import Callable

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
