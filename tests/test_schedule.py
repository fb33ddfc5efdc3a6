"""Arrival schedules: exact where they should be, the right distribution where random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag.loadgen.schedule import (
    Prompt,
    arrival_offsets,
    build_schedule,
    load_prompts,
    load_trace,
    write_schedule,
)


def test_ideal_spacing_is_exact():
    offsets = arrival_offsets("ideal", rps=250.0, num_requests=1000)
    assert len(offsets) == 1000 and offsets[0] == 0.0
    np.testing.assert_allclose(np.diff(offsets), 1 / 250.0, rtol=0, atol=1e-12)
    # absolute positions, not accumulated gaps: no drift at the end
    assert offsets[-1] == pytest.approx(999 / 250.0, abs=1e-12)
    assert build_schedule("ideal", rps=250.0, num_requests=1000).rate == pytest.approx(250.0)


# Kolmogorov's asymptotic critical value at the 1% level: sqrt(-ln(0.01 / 2) / 2).
KS_CRITICAL_1PC = 1.6276


def ks_distance_from_exponential(gaps: np.ndarray, mean: float) -> float:
    """The Kolmogorov-Smirnov statistic: the largest gap between the gaps' empirical CDF
    and the exponential CDF of that mean."""
    x = np.sort(gaps)
    cdf = 1 - np.exp(-x / mean)
    steps = np.arange(1, len(x) + 1) / len(x)
    return float(max((steps - cdf).max(), (cdf - (steps - 1 / len(x))).max()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_poisson_gaps_are_exponential_at_the_right_mean(seed: int):
    rps = 40.0
    gaps = np.diff(arrival_offsets("poisson", rps=rps, num_requests=5000, seed=seed))
    assert gaps.mean() == pytest.approx(1 / rps, rel=0.05)
    critical = KS_CRITICAL_1PC / np.sqrt(len(gaps))
    assert ks_distance_from_exponential(gaps, 1 / rps) < critical
    # and not some other mean: the same test rejects a 20% slower rate
    assert ks_distance_from_exponential(gaps, 1.2 / rps) > critical


def test_gamma_burstiness_sets_the_coefficient_of_variation():
    def cv(burstiness: float) -> float:
        offsets = arrival_offsets("gamma", rps=100.0, num_requests=20000, burstiness=burstiness)
        gaps = np.diff(offsets)
        assert gaps.mean() == pytest.approx(0.01, rel=0.05)
        return gaps.std() / gaps.mean()

    assert cv(0.25) == pytest.approx(2.0, rel=0.1)  # burstier than poisson
    assert cv(1.0) == pytest.approx(1.0, rel=0.05)  # poisson
    assert cv(4.0) == pytest.approx(0.5, rel=0.05)  # more regular


def test_same_seed_same_schedule_and_queries_do_not_move_the_times():
    a = build_schedule("poisson", rps=10.0, num_requests=50, seed=7)
    b = build_schedule("poisson", rps=10.0, num_requests=50, seed=7)
    c = build_schedule("poisson", rps=10.0, num_requests=50, seed=8)
    d = build_schedule("poisson", rps=10.0, num_requests=50, seed=7, prompts=[Prompt("only this")])
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.queries == b.queries
    assert not np.array_equal(a.offsets, c.offsets)
    np.testing.assert_array_equal(a.offsets, d.offsets)
    assert d.queries == ["only this"] * 50


def test_duration_and_count_bound_the_schedule():
    assert len(arrival_offsets("ideal", rps=10.0, duration=2.0)) == 20
    assert len(arrival_offsets("ideal", rps=10.0, num_requests=5, duration=2.0)) == 5
    assert len(arrival_offsets("ideal", rps=10.0, num_requests=50, duration=2.0)) == 20
    offsets = arrival_offsets("poisson", rps=200.0, duration=5.0, seed=3)
    assert offsets.max() < 5.0
    assert len(offsets) == pytest.approx(1000, rel=0.1)  # the whole duration is covered


def test_trace_replay_from_text_and_from_a_saved_schedule(tmp_path: Path):
    trace = tmp_path / "trace.txt"
    trace.write_text("# arrival times\n100.5\n100.0\n\n101.25  # late one\n100.0\n")
    np.testing.assert_allclose(load_trace(str(trace)), [0.0, 0.0, 0.5, 1.25])
    assert len(arrival_offsets("trace", trace=str(trace), num_requests=2)) == 2

    saved = build_schedule("poisson", rps=20.0, num_requests=30, seed=4)
    path = tmp_path / "schedule.csv"
    write_schedule(saved, path)
    # Another seed and another query list: the saved times and queries replay all the same.
    other = [Prompt("other"), Prompt("queries")]
    replay = build_schedule("trace", trace=str(path), seed=5, prompts=other)
    np.testing.assert_array_equal(replay.offsets, saved.offsets)
    assert replay.queries == saved.queries
    assert len(set(saved.queries)) > 10  # a draw whose order the replay had to keep
    shorter = build_schedule("trace", trace=str(path), num_requests=12, seed=5)
    assert shorter.queries == saved.queries[:12]


def test_replay_keeps_each_query_with_its_time_when_rows_are_out_of_order(tmp_path: Path):
    path = tmp_path / "schedule.csv"
    path.write_text(
        'request_id,scheduled_s,query\n0,10.5,"late, with a comma"\n1,10.0,first\n2,10.25,second\n'
    )
    replay = build_schedule("trace", trace=str(path))
    np.testing.assert_allclose(replay.offsets, [0.0, 0.25, 0.5])
    assert replay.queries == ["first", "second", "late, with a comma"]


def test_builtin_queries_and_query_files(tmp_path: Path):
    builtin = load_prompts()
    assert 25 <= len(builtin) <= 40
    assert Prompt("What is photosynthesis?") in builtin
    assert all(p.text.endswith("?") and p.max_tokens == 0 for p in builtin)
    path = tmp_path / "q.txt"
    path.write_text("# comment\nfirst\n\n  second  \n")
    assert load_prompts(str(path)) == [Prompt("first"), Prompt("second")]
    drawn = build_schedule("ideal", rps=1.0, num_requests=200, prompts=builtin).queries
    assert len(set(drawn)) > len(builtin) // 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timing_mode": "bursty", "rps": 1.0, "num_requests": 1}, "timing_mode"),
        ({"timing_mode": "ideal", "rps": 0.0, "num_requests": 1}, "rps"),
        ({"timing_mode": "poisson", "rps": 1.0}, "num_requests or duration"),
        ({"timing_mode": "gamma", "rps": 1.0, "num_requests": 5, "burstiness": 0}, "burstiness"),
        ({"timing_mode": "trace"}, "trace file"),
    ],
)
def test_bad_schedules_are_refused(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        arrival_offsets(**kwargs)
