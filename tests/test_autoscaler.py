"""The autoscaler's load rules (what a scale-up bought is off here: tests/test_gain.py
has it) and the balancer's policies, on known loads and counters."""

from __future__ import annotations

import csv
import itertools
import random
from dataclasses import dataclass, replace

import pytest

from rag.cluster.autoscaler import DECISION_COLUMNS, Autoscaler, DecisionLog
from rag.cluster.observation import Observation
from rag.cluster.policies import LeastOutstanding, PowerOfTwo, RoundRobin, make_policy
from rag.config import ScalingConfig

CFG = ScalingConfig(
    min_replicas=1,
    max_replicas=6,
    target_ongoing_requests=4,
    check_interval_s=1,
    stable_window_s=10,
    panic_window_s=2,
    panic_threshold=2.0,
    upscale_delay_s=4,
    downscale_delay_s=8,
    gain_share=0.0,
)


def load(now: float, ongoing: float, ready: int, starting: int = 0, **more) -> Observation:
    """One check's observation over the last second."""
    return Observation(now, 1.0, ongoing, more.pop("rps", 0.0), ready, starting, **more)


class Pool:
    """Replicas as the autoscaler sees them; new ones start ready after `start_s`."""

    def __init__(self, cfg: ScalingConfig = CFG, replicas: int = 1, start_s: float = 3) -> None:
        self.scaler = Autoscaler(cfg)
        self.ready = replicas
        self.starting: list[float] = []  # when each starting replica becomes ready
        self.start_s = start_s
        self.now = 0.0
        self.history: list[int] = []
        self.reasons: list[str] = []

    def step(self, ongoing: float, rps: float = 0.0) -> int:
        self.now += 1
        self.ready += sum(1 for t in self.starting if t <= self.now)
        self.starting = [t for t in self.starting if t > self.now]
        decision = self.scaler.decide(
            load(self.now, ongoing, self.ready, len(self.starting), rps=rps)
        )
        change = decision.replicas - self.ready - len(self.starting)
        self.starting += [self.now + self.start_s] * max(0, change)
        for _ in range(max(0, -change)):
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1
        self.history.append(decision.replicas)
        self.reasons.append(decision.reason)
        return decision.replicas


def test_holds_at_min_replicas_under_light_load():
    pool = Pool()
    assert {pool.step(ongoing=2.0) for _ in range(30)} == {1}


def test_a_burst_panics_up_within_one_check_and_starting_replicas_count():
    pool = Pool()
    for _ in range(12):
        pool.step(ongoing=2.0)
    # A burst: 20 in flight asks for 5 replicas of target 4.  The short window reacts at
    # the first check (2-s window mean 11 -> 3 replicas, >= 2x the one ready).
    first = pool.step(ongoing=20.0)
    assert first >= 3 and "panic" in pool.reasons[-1]
    # While the new replicas start, the same load must not ask for more than it needs;
    # the stable window then brings the pool to what the load needs.
    for _ in range(20):
        pool.step(ongoing=20.0)
    assert max(pool.history) == pool.history[-1] == 5


def test_scales_down_only_after_the_stabilisation_window_and_not_below_min():
    pool = Pool()
    for _ in range(20):
        pool.step(ongoing=16.0)
    assert pool.history[-1] == 4
    downs = []
    for second in range(40):
        if pool.step(ongoing=0.0) < 4 and not downs:
            downs.append(second)
    # Panic ends a stable window after its last trigger; then the lower recommendations
    # must have held for the whole downscale delay.
    assert downs and downs[0] >= CFG.downscale_delay_s - 1
    assert pool.history[-1] == CFG.min_replicas


def test_no_oscillation_under_noisy_steady_load():
    rng = random.Random(7)
    pool = Pool(start_s=2)
    for _ in range(30):  # settle
        pool.step(ongoing=max(0.0, rng.gauss(11.0, 3.0)))
    settled = pool.history[-1]
    for _ in range(240):  # four minutes of the same load, noisy around 2.75 replicas
        pool.step(ongoing=max(0.0, rng.gauss(11.0, 3.0)))
    changes = sum(a != b for a, b in itertools.pairwise(pool.history[29:]))
    assert settled in (3, 4) and changes == 0  # 4 when the noise reached 12 in the window


def test_request_rate_target_sizes_the_pool_when_it_asks_for_more():
    cfg = replace(CFG, target_rps_per_replica=10.0)
    pool = Pool(cfg)
    for _ in range(15):
        pool.step(ongoing=1.0, rps=35.0)
    assert pool.history[-1] == 4


def test_replaces_a_dead_replica_below_min_and_respects_max():
    scaler = Autoscaler(replace(CFG, min_replicas=2, max_replicas=3))
    decision = scaler.decide(load(1.0, 0.0, ready=1))  # one of two died
    assert decision.replicas == 2 and "min_replicas" in decision.reason
    decision = scaler.decide(load(2.0, 100.0, ready=2))
    assert decision.replicas == 3


@pytest.mark.parametrize(
    "change",
    [{"min_replicas": 0}, {"min_replicas": 5, "max_replicas": 4}, {"panic_window_s": 20}],
)
def test_refuses_inconsistent_settings(change):
    with pytest.raises(ValueError):
        Autoscaler(replace(CFG, **change))


def test_decision_log_rows_are_complete_after_every_write(tmp_path):
    path = tmp_path / "autoscaler.csv"
    log = DecisionLog(path)
    scaler = Autoscaler(CFG)
    for second in range(1, 4):
        decision = scaler.decide(load(float(second), 30.0, ready=1, rps=5.0))
        log.record(decision, load(log.started + second, 30.0, ready=1, rps=5.0))
        rows = list(csv.DictReader(path.open()))
        assert len(rows) == second and all(len(r) == len(DECISION_COLUMNS) for r in rows)
    assert rows[0]["replicas_before"] == "1" and int(rows[0]["replicas_after"]) > 1
    assert not list(tmp_path.glob(".*"))  # no staging file left behind


@dataclass(eq=False)
class Counted:
    name: str
    in_flight: int


def test_policies_choose_from_known_in_flight_counts():
    replicas = [Counted("a", 3), Counted("b", 0), Counted("c", 5), Counted("d", 0)]
    least = LeastOutstanding()
    picks = [least.choose(replicas).name for _ in range(4)]
    assert set(picks) == {"b", "d"}  # the idle ones, taking turns
    two = PowerOfTwo(seed=1)
    assert "c" not in {two.choose(replicas).name for _ in range(200)}  # never the busiest
    robin = RoundRobin()
    assert [robin.choose(replicas).name for _ in range(5)] == ["a", "b", "c", "d", "a"]
    with pytest.raises(ValueError, match="unknown balancer policy"):
        make_policy("random")


def test_requests_in_flight_now_reveal_a_step_before_the_window_mean_does():
    scaler = Autoscaler(CFG)
    for second in range(1, 6):
        scaler.decide(load(float(second), 2.0, ready=1, in_flight=2))
    assert scaler.burst_level(1) == CFG.panic_threshold * CFG.target_ongoing_requests
    # 0.2 s into a step the interval's mean has barely moved, but 12 are in flight.
    decision = scaler.decide(Observation(5.2, 0.2, 3.0, 0.0, ready=1, in_flight=12))
    assert decision.panic and decision.replicas == 3
    assert scaler.burst_level(CFG.max_replicas) == float("inf")  # nothing left to add
