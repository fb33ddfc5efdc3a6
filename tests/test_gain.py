"""What a scale-up bought, judged on synthetic traces: a pool whose replicas add capacity
scales to what the load needs, one whose replicas share one resource stops at the knee and
takes the rest back, and noise makes neither flap.  The pool is a fluid queue: each second
the ready replicas serve up to their capacity, the rest waits."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from rag.cluster.autoscaler import Autoscaler, Decision
from rag.cluster.gain import GainCheck, Window, window_of
from rag.cluster.observation import Observation
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
    gain_share=0.25,
    gain_settle_s=2,
    gain_window_s=6,
    saturation_cooldown_s=60,
)


def adds(per_replica: float) -> Callable[[int], float]:
    """Replicas with a resource each: capacity grows with them."""
    return lambda n: per_replica * n


def shares(total: float, knee: int = 1) -> Callable[[int], float]:
    """Replicas dividing one resource: capacity stops growing at `knee` replicas."""
    return lambda n: total * min(n, knee) / knee


class FluidPool:
    """Replicas as the autoscaler sees them: new ones ready `start_s` after launch, ones
    taken back gone `drain_s` after; each second they serve up to `capacity(ready)`, each
    request in service for `service_s` (in flight: the queue and those in service); past
    `queue_limit` waiting, a request is refused at once."""

    def __init__(
        self,
        capacity: Callable[[int], float],
        cfg: ScalingConfig = CFG,
        start_s: int = 3,
        drain_s: int = 2,
        service_s: float = 0.5,
        noise: float = 0.0,
        seed: int = 0,
        queue_limit: float = math.inf,
    ) -> None:
        self.scaler = Autoscaler(cfg)
        self.capacity = capacity
        self.start_s, self.drain_s, self.noise = start_s, drain_s, noise
        self.service_s = service_s
        self.queue_limit = queue_limit  # beyond it a request is refused at once (429)
        self.rng = random.Random(seed)
        self.ready = 1
        self.starting: list[int] = []  # when each becomes ready
        self.draining: list[int] = []  # when each is gone
        self.queue = 0.0
        self.places = frozenset({"here"})
        self.now = 0
        self.counts: list[int] = []
        self.served: list[float] = []
        self.rows: list[tuple[str, str]] = []  # (verdict, reason) at each check

    def run(self, arrivals: float, seconds: int) -> FluidPool:
        for _ in range(seconds):
            self.step(arrivals)
        return self

    def step(self, arrivals: float) -> int:
        self.now += 1
        self.ready += sum(1 for t in self.starting if t <= self.now)
        self.starting = [t for t in self.starting if t > self.now]
        self.draining = [t for t in self.draining if t > self.now]
        before = self.queue
        capacity = self.capacity(self.ready) * (1 + self.rng.uniform(-self.noise, self.noise))
        served = min(before + arrivals, capacity)
        self.queue = before + arrivals - served
        refused = max(0.0, self.queue - self.queue_limit)
        self.queue -= refused
        obs = Observation(
            now=float(self.now),
            seconds=1.0,
            ongoing=(before + self.queue) / 2 + served * self.service_s,
            rps=arrivals,
            ready=self.ready,
            starting=len(self.starting),
            draining=len(self.draining),
            in_flight=round(self.queue + served * self.service_s),
            served=served,
            refused=refused,
            rates={f"r{i}": served / self.ready for i in range(self.ready)},
            places=self.places,
        )
        decision = self.scaler.decide(obs)
        change = decision.replicas - obs.current
        self.starting += [self.now + self.start_s] * max(0, change)
        for _ in range(max(0, -change)):
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1
                self.draining.append(self.now + self.drain_s)
        self.counts.append(decision.replicas)
        self.served.append(served)
        self.rows.append((decision.verdict, decision.reason))
        return decision.replicas

    def verdicts(self, word: str) -> list[str]:
        return [reason for verdict, reason in self.rows if verdict == word]

    def changes(self, since: int = 0) -> int:
        return sum(a != b for a, b in itertools.pairwise(self.counts[since:]))


def test_replicas_that_add_capacity_scale_to_what_the_load_needs():
    """A step out of light load: no rate before it to compare with, so the first replica
    added is judged by a probe; once it paid a whole replica's rate it is back at once, and
    the pool goes straight to what the load asks (the backlog of the probe: 6, then 35/s
    in service for half a second each at 4 per replica: 5 replicas)."""
    pool = FluidPool(adds(10.0)).run(arrivals=5, seconds=20).run(arrivals=35, seconds=90)
    assert pool.counts[-1] == 5 and pool.changes(since=95) == 0
    assert "back up to 2" in pool.verdicts("gain")[0]
    assert pool.counts[pool.counts.index(6) - 1] == 2  # 2 -> 6 at once
    assert not pool.verdicts("no gain")
    assert len(pool.verdicts("probe")) == 1
    (gain,) = pool.verdicts("gain")
    assert "2 replicas served 20.0/s, 1 serves 10.0/s" in gain
    assert sum(pool.served[-20:]) / 20 == pytest.approx(35)  # keeps up


def test_a_step_onto_a_shared_resource_is_probed_and_taken_back():
    pool = FluidPool(shares(10.0)).run(arrivals=2, seconds=20).run(arrivals=15, seconds=80)
    assert max(pool.counts) == 2  # one trial, never more at once
    assert len(pool.verdicts("probe")) == 1
    (no_gain,) = pool.verdicts("no gain")
    assert "2 replicas served 10.0/s, 1 serves 10.0/s; above 1 held 60 s" in no_gain
    back = pool.counts.index(1, pool.counts.index(2))
    assert set(pool.counts[back:]) == {1}  # held for the cool-down
    assert "no gain above 1 replica" in pool.rows[-1][1]  # and saying why


def test_replicas_that_refuse_what_they_cannot_take_are_judged_on_what_they_served():
    """A bounded queue: past it the replicas answer 429 at once, so requests in flight stop
    growing while the load still exceeds what they serve.  Refusals are no capacity: the
    scale-up onto the shared resource is seen to serve nothing more and taken back."""
    pool = FluidPool(shares(10.0), queue_limit=20).run(arrivals=15, seconds=80)
    (no_gain,) = pool.verdicts("no gain")
    assert "2 replicas served 10.0/s, 1 serves 10.0/s" in no_gain
    assert pool.counts[-1] == 1 and not pool.verdicts("kept up")


def test_a_loaded_pool_judges_its_scale_up_against_the_rate_before_it():
    """A load just over what one replica serves: the replica was loaded before the
    scale-up, so its rate then is the comparison, and the new one goes at once."""
    pool = FluidPool(shares(10.0)).run(arrivals=11, seconds=60)
    assert not pool.verdicts("probe")
    (no_gain,) = pool.verdicts("no gain")
    assert "1 replica served 10.0/s, 2 serve 10.0/s" in no_gain
    assert pool.counts[-1] == 1


def test_replicas_that_add_less_than_a_whole_replica_at_most_double():
    """Each replica adds half of the first one's rate: a gain, but one that shrinks towards
    a knee, so each scale-up after it at most doubles the pool."""
    pool = FluidPool(lambda n: 5.0 * (n + 1)).run(arrivals=5, seconds=20).run(40, 120)
    assert all(b <= 2 * a for a, b in itertools.pairwise(pool.counts))
    assert pool.counts[-1] == 6 and not pool.verdicts("no gain")
    assert "2 replicas served 15.0/s, 1 serves 10.0/s" in pool.verdicts("gain")[0]


def test_replicas_that_share_two_cores_stop_at_the_knee():
    """Once the second replica paid a whole replica's rate, the pool goes to what the load
    asks; six serve what two do, so four go back, and the next try after the hold adds
    one."""
    pool = FluidPool(shares(20.0, knee=2)).run(arrivals=4, seconds=20).run(30, 150)
    assert pool.counts[-1] == 2 and max(pool.counts) == 6
    first, second = pool.verdicts("no gain")
    assert "6 replicas served 20.0/s, 2 serve 20.0/s; above 2 held 60 s" in first
    assert "2 replicas served 20.0/s, 3 serve 20.0/s; above 2 held 120 s" in second


def test_noisy_replicas_that_add_capacity_neither_flap_nor_look_saturated():
    pool = FluidPool(adds(10.0), noise=0.2, seed=3).run(arrivals=5, seconds=20).run(28, 240)
    assert not pool.verdicts("no gain")
    assert pool.counts[100] in (3, 4) and pool.changes(since=100) == 0


def test_noisy_replicas_on_a_shared_resource_stay_at_the_knee_between_trials():
    """After each hold the pool tries one replica more, and each hold is twice the last:
    four minutes hold three trials, each taken back."""
    pool = FluidPool(shares(10.0), noise=0.2, seed=5).run(arrivals=2, seconds=20).run(14, 240)
    assert max(pool.counts) == 2 and pool.counts[-1] == 1
    holds = [reason.split("held ")[1] for reason in pool.verdicts("no gain")]
    assert holds == ["60 s", "120 s", "240 s"]
    ups = sum(b > a for a, b in itertools.pairwise(pool.counts))
    assert ups == len(holds)


def test_a_scale_up_is_not_judged_once_the_load_has_stopped():
    """The load ends while a scale-up is being judged: the queue only drains, whatever the
    replicas can serve, so no window after it says anything (neither kept up nor a gain),
    and the pool falls back once the load asks for less."""
    pool = FluidPool(adds(10.0)).run(arrivals=5, seconds=20).run(arrivals=35, seconds=5)
    assert pool.scaler.gain.trial is not None
    pool.run(arrivals=0, seconds=40)
    assert not any(verdict for verdict, _ in pool.rows)
    assert pool.counts[-1] == 1


def test_a_lull_shorter_than_two_checks_is_still_load():
    """A poisson load has empty seconds; one check without arrivals does not stop the
    judgement."""
    pool = FluidPool(shares(10.0))
    for second in range(80):
        pool.step(arrivals=0.0 if second % 5 == 0 else 15.0)
    assert pool.verdicts("no gain")


def test_a_replica_on_another_host_forgets_the_knee():
    pool = FluidPool(shares(10.0)).run(arrivals=11, seconds=30)
    assert pool.scaler.gain.knee is not None and pool.counts[-1] == 1
    pool.places = frozenset({"here", "there"})  # the machine changed
    pool.run(arrivals=11, seconds=1)
    assert pool.scaler.gain.knee is None


def own_rate_decisions(
    rates_at: Callable[[int], dict[str, float]], arrivals_at: Callable[[int], float], seconds: int
) -> list[Decision]:
    """The decisions, second by second, over replicas on allocations of their own that
    answer `rates_at(second)` while requests arrive at `arrivals_at(second)`."""
    scaler = Autoscaler(CFG, own_rate=True)
    queue = 0.0
    decisions = []
    for second in range(1, seconds + 1):
        rates, arrivals = rates_at(second), arrivals_at(second)
        served = sum(rates.values())
        before, queue = queue, queue + arrivals - served
        obs = Observation(float(second), 1.0, (before + queue) / 2, arrivals, ready=len(rates),
                          served=served, rates=rates, places=frozenset({"n1"}))  # fmt: skip
        decisions.append(scaler.decide(obs))
    return decisions


def test_replicas_on_their_own_allocations_are_judged_on_their_own_rate():
    """r1 serves a tenth of what r0 does while the queue grows: taken back, itself."""
    decisions = own_rate_decisions(
        lambda second: {"r0": 10.0} if second < 5 else {"r0": 10.0, "r1": 1.0},
        lambda second: 15.0,
        29,
    )
    (taken,) = [d for d in decisions if d.verdict == "no gain"]
    assert taken.drain == ("r1",) and taken.replicas == 1
    assert "r1 serves 1.0/s on its own, one replica 10.0/s" in taken.reason


def test_the_served_rate_is_arrivals_less_the_growth_of_requests_in_flight():
    # In flight rising 3/s with arrivals at 10/s: 7/s served, the queue grew.
    trace = [Observation(float(t), 1.0, 3.0 * t, 10.0, ready=1) for t in range(1, 8)]
    measured = window_of(trace)
    assert measured == Window(7.0, pytest.approx(10.0), pytest.approx(3.0), {})
    assert measured.served == pytest.approx(7.0) and measured.grew
    # In flight steady, 4/s of the 10/s refused at once: 6/s served, the pool fell short.
    refusing = [Observation(float(t), 1.0, 5.0, 10.0, ready=1, refused=4.0) for t in range(1, 8)]
    measured = window_of(refusing)
    assert measured.served == pytest.approx(6.0) and measured.grew
    # The longest run of checks without an arrival: the load stopped, not a lull.
    stopping = [Observation(float(t), 1.0, 5.0, 10.0 * (t not in (3, 5, 6)), ready=1)
                for t in range(1, 8)]  # fmt: skip
    assert window_of(stopping).idle == 2.0


def test_the_check_can_be_turned_off():
    pool = FluidPool(shares(10.0), cfg=replace(CFG, gain_share=0.0))
    pool.run(arrivals=2, seconds=20).run(arrivals=15, seconds=60)
    assert max(pool.counts) > 2 and not any(verdict for verdict, _ in pool.rows)


def test_refuses_a_window_too_short_to_measure():
    with pytest.raises(ValueError, match="gain_window_s"):
        GainCheck(replace(CFG, gain_window_s=2))


def test_a_replica_is_judged_on_the_first_window_in_which_the_queue_grew():
    """While the load only matches what the two serve, r1's windows say nothing of its
    capacity; once the load outgrows them, it is judged (not passed over for good)."""
    decisions = own_rate_decisions(
        lambda second: {"r0": 10.0} if second < 5 else {"r0": 10.0, "r1": 9.0},
        lambda second: 10.0 if second < 5 else (19.0 if second < 25 else 30.0),
        39,
    )
    verdicts = [(second, d.verdict) for second, d in enumerate(decisions, start=1) if d.verdict]
    ((second, verdict),) = verdicts
    assert verdict == "gain" and second >= 25


def test_bursty_arrivals_do_not_bend_the_served_rate():
    """A pool answering 33/s while a busy load generator sends in bursts (the arrivals of
    a busy run's autoscaler.csv, half-second checks): the window's served rate is 33/s."""
    arrivals = [38.0, 34.0, 36.0, 56.0, 44.0, 40.0]
    queue, trace = 200.0, []
    for t, rate in enumerate(arrivals, start=1):
        before, queue = queue, queue + (rate - 33.0) * 0.5
        trace.append(Observation(t * 0.5, 0.5, (before + queue) / 2, rate, ready=1))
    assert window_of(trace).served == pytest.approx(33.0)
