"""Reading a running server's Prometheus metrics, for tests that count what it answered."""

from __future__ import annotations

import httpx


def metric(url: str, sample: str) -> float:
    """The value of one Prometheus sample, e.g. 'rag_requests_total{status="429"}' (0 when
    the server has not reported it yet)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0
