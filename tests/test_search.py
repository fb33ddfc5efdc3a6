"""The max-rps search: the bracket it narrows and the verdict on one trial."""

from __future__ import annotations

import math

import pytest

from rag.config import SearchConfig, SloConfig
from rag.harness.search import bisect_rates, verdict


def trial(capacity: float, log: list[float]):
    def meets(rate: float) -> bool:
        log.append(rate)
        return rate <= capacity

    return meets


@pytest.mark.parametrize("capacity", [0.7, 1.0, 3.3, 17.0, 100.0])
def test_bisection_finds_the_capacity_within_the_resolution(capacity: float):
    search = SearchConfig(
        start_rps=1.0, min_rps=0.25, max_rps=128.0, resolution=0.05, max_trials=30
    )
    tried: list[float] = []
    best = bisect_rates(search, trial(capacity, tried))
    assert best <= capacity < best * 1.05 + 1e-9
    assert len(tried) < 15, tried


def test_bisection_stops_at_the_ceiling_and_the_floor():
    search = SearchConfig(start_rps=1.0, min_rps=0.25, max_rps=8.0, max_trials=30)
    tried: list[float] = []
    assert bisect_rates(search, trial(math.inf, tried)) == 8.0
    assert tried == [1.0, 2.0, 4.0, 8.0]
    tried.clear()
    assert bisect_rates(search, trial(0.0, tried)) == 0.0
    assert tried == [1.0, 0.5, 0.25]


def test_bisection_respects_the_trial_budget():
    search = SearchConfig(start_rps=1.0, resolution=0.001, max_trials=4)
    tried: list[float] = []
    bisect_rates(search, trial(5.0, tried))
    assert len(tried) == 4


def summary(**over):
    base = {"schedule_kept": True, "schedule_kept_reason": "", "ok_fraction": 1.0,
            "latency_p99_s": 1.0}  # fmt: skip
    return {**base, **over}


def test_verdict():
    slo = SloConfig(p99_s=2.0, max_failed_fraction=0.01)
    assert verdict(summary(), slo)[0]
    assert not verdict(summary(latency_p99_s=2.5), slo)[0]
    assert not verdict(summary(ok_fraction=0.98), slo)[0]
    assert verdict(summary(ok_fraction=0.995), slo)[0]
    ok, why = verdict(summary(schedule_kept=False, schedule_kept_reason="late"), slo)
    assert not ok and "client fell behind" in why
    assert not verdict(summary(latency_p99_s=math.nan), slo)[0]


def test_verdict_on_token_objectives():
    slo = SloConfig(p99_s=2.0, ttft_s=0.5, tpot_s=0.05, e2e_s=1.5)
    fine = {"ttft_p99_s": 0.4, "tpot_p99_s": 0.04}
    ok, why = verdict(summary(**fine), slo)
    assert ok and why == "p99 1 s, ttft p99 0.4 s, tpot p99 0.04 s"
    assert not verdict(summary(**fine, latency_p99_s=1.6), slo)[0]  # e2e_s is the tighter
    ok, why = verdict(summary(**{**fine, "ttft_p99_s": 0.6}), slo)
    assert not ok and why == "ttft p99 0.6 s over 0.5 s"
    assert not verdict(summary(**{**fine, "tpot_p99_s": 0.06}), slo)[0]
    assert not verdict(summary(**{**fine, "ttft_p99_s": math.nan}), slo)[0]  # not streamed
    assert verdict(summary(ttft_p99_s=math.nan), SloConfig(p99_s=2.0))[0]  # none asked
