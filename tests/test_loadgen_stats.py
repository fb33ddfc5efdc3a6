"""Summary statistics: percentiles, failure accounting and the validity verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rag.loadgen.sender import finish_rows, new_row
from rag.loadgen.stats import ERROR_CLASSES, percentile, summarise


def row(scheduled: float, lag: float | None = 0.0, service: float | None = 0.1, error=None):
    """A finished row as the sender leaves it (None lag = never sent)."""
    sent = None if lag is None else scheduled + lag
    done = None if sent is None or service is None else sent + service
    finished = {**new_row(0, "q", 0, scheduled), "sent_s": sent, "done_s": done, "error": error}
    finish_rows([finished])
    return finished


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(q: float):
    values = np.random.default_rng(0).lognormal(size=101)
    assert percentile(values, q) == pytest.approx(np.percentile(values, q, method="linear"))


def test_percentile_with_failures_as_infinity():
    assert percentile([1.0, 2.0, 3.0, math.inf], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, math.inf], 99) == math.inf
    assert percentile([1.0, 2.0, 3.0, math.inf], 100 * 2 / 3) == 3.0  # exactly on a rank
    assert percentile([math.inf, math.inf], 50) == math.inf
    assert math.isnan(percentile([], 50))


def test_counts_rates_and_latencies():
    rows = [row(i * 0.01) for i in range(100)]  # 100/s, each 100 ms
    rows[10] = row(0.10, error="timeout", service=1.0)
    rows[20] = row(0.20, error="http_5xx")
    rows[99] = row(0.99, lag=None, error="not_sent")
    s = summarise(rows, schedule_rps=100.0, target_rps=100.0)
    assert (s["scheduled"], s["sent"], s["ok"], s["failed"]) == (100, 99, 97, 3)
    assert (s["failed_timeout"], s["failed_http_5xx"], s["failed_not_sent"]) == (1, 1, 1)
    assert all(f"failed_{c}" in s for c in ERROR_CLASSES)
    assert s["achieved_send_rps"] == pytest.approx(100.0)
    assert s["duration_s"] == pytest.approx(1.1)  # first scheduled 0 -> timeout done at 1.1
    assert s["throughput_rps"] == pytest.approx(97 / 1.1)
    assert s["latency_p50_s"] == pytest.approx(0.1)
    assert s["latency_adj_p50_s"] == pytest.approx(0.1)
    assert s["latency_adj_p99_s"] == math.inf
    assert s["percentile_method"] == "linear"
    assert s["schedule_kept"] is True and s["schedule_kept_reason"] == ""


def test_late_sends_void_the_run():
    rows = [row(i * 0.01, lag=0.006 if i % 50 == 0 else 0.0) for i in range(100)]
    s = summarise(rows, schedule_rps=100.0, target_rps=100.0)
    assert s["late_fraction"] == pytest.approx(0.02)
    assert s["schedule_kept"] is False
    assert "2.0% of sends late by more than 5 ms" in s["schedule_kept_reason"]
    just_one = [row(i * 0.01, lag=0.006 if i == 50 else 0.0) for i in range(100)]
    assert summarise(just_one, schedule_rps=100.0, target_rps=100.0)["schedule_kept"] is True


def test_a_slow_send_rate_voids_the_run():
    rows = [row(i * 0.01, lag=i * 0.0002) for i in range(100)]  # drifts to 2% slow
    s = summarise(rows, schedule_rps=100.0, target_rps=100.0)
    assert s["achieved_send_rps"] == pytest.approx(100 / 1.02, rel=1e-3)
    assert s["schedule_kept"] is False
    assert "under 99% of the schedule's 100.0/s" in s["schedule_kept_reason"]


def test_interrupted_runs_are_not_valid():
    s = summarise([row(0.0), row(0.01)], 100.0, 100.0, interrupted=True)
    assert s["interrupted"] is True and s["schedule_kept"] is False
    assert s["schedule_kept_reason"] == "interrupted"


def test_client_side_failures_void_the_run():
    s = summarise([row(0.0), row(0.01, error="client")], 100.0, 100.0)
    assert s["failed_client"] == 1 and s["schedule_kept"] is False
    assert s["schedule_kept_reason"] == "1 requests failed in the client itself"
