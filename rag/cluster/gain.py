"""What a scale-up bought: the pool's served rate before and after it, so that replicas
which only divide what the others already use are taken back.

Load signals cannot tell a replica that adds capacity from one that divides a resource
(two CPU replicas on two cores, two replicas on one GPU): either way the queue per replica
gets shorter.  So once the replicas of a scale-up are ready and a settling time has
passed, the pool's served rate over a window is compared with its rate before:

- the served rate over a window is the arrival rate less the growth of requests in flight
  (the slope of the integrated in-flight mean, which completions arriving a batch at a
  time do not jolt as a count of them would) and less the requests refused or failed
  (replicas that answer 429 at once are short of capacity, not serving), each the slope
  of one fit over the window's checks;
- the pool is saturated when the replicas added serve less than `gain_share` of one
  replica's rate each while the queue still grew (had it stopped growing, the load and not
  the replicas bounded what they served).  The replicas beyond what the rate after is worth
  (the knee: rate after / one replica's rate, at least the count before) are then taken
  back, drained first, and scale-ups above the knee are held for `saturation_cooldown_s`,
  twice as long at each repeat; the hold is forgotten when a replica runs on a host the
  knee was not found on;
- "before" counts only when the replicas were saturated all through it: loaded to their
  target at every check while the queue grew (short of that, they served what came, not
  what they can).  A scale-up out of a lighter load (a step) has no such window; if the
  queue still grows after it, the added replicas are taken out for one window to measure
  the count before (a probe: they are kept running, idle, and return at once if they
  paid);
- none is added while a scale-up is being judged; one at a time when there is no
  saturated window to compare with until a scale-up has paid (and after a knee), so a
  machine with nothing to spare pays for one replica's trial, not for four; at most as
  many as there are at once after a scale-up that paid less than a whole replica's rate
  each (within `gain_share` of it), and straight to what the load asks after one that
  paid in full: replicas that each added a whole replica's rate are not near a knee;
- a window in which arrivals stopped (the load ended, the queue only drains) judges
  nothing: its queue shrinks whatever the replicas can serve.

Replicas on allocations of their own (SLURM jobs) are judged on their own rate instead: the
requests/s each answered over the first window, after a settling time, in which the queue
grew (in a window where it did not, the load bounded what each served, and a later one
judges).  One whose own rate is under `gain_share` of the other replicas' mean is taken
back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rag.cluster.observation import Observation
from rag.config import ScalingConfig

# The queue grew when requests in flight rose by more than this share of the arrivals.
GROWTH_TOLERANCE = 0.05
# Check intervals in a row without an arrival that mean the load stopped, not a lull of a
# poisson load (at 5 requests/s two empty seconds come once in about 22,000).
STOPPED_INTERVALS = 2
MAX_DOUBLINGS = 4  # a repeated knee holds at most 16 x the cool-down


@dataclass(frozen=True)
class Window:
    """The load over consecutive checks."""

    seconds: float
    arrivals: float  # requests/s
    growth: float  # requests/s by which requests in flight rose
    rates: dict[str, float]  # requests/s answered by each replica ready all through it
    refused: float = 0.0  # requests/s refused or failed
    idle: float = 0.0  # the longest run of seconds without an arrival

    @property
    def served(self) -> float:
        return self.arrivals - self.growth - self.refused

    @property
    def grew(self) -> bool:
        """The pool fell short of the arrivals: its queue grew, or it refused what it
        could not take."""
        return self.growth + self.refused > GROWTH_TOLERANCE * self.arrivals


def window_of(observations: Sequence[Observation]) -> Window:
    seconds = sum(o.seconds for o in observations)
    if len(observations) < 3:  # too few to fit: the means, and no growth
        arrivals = sum(o.rps * o.seconds for o in observations) / seconds
        refused = sum(o.refused * o.seconds for o in observations) / seconds
        growth = 0.0
    else:
        # One fit for the three: the slopes of requests in flight and of the running counts
        # of arrivals and refusals.  Arrivals less growth less refusals is then the slope
        # of the running count of answers; a plain mean of bursty arrivals set against a
        # fitted slope of the queue misjudged it by a fifth.
        middles = [o.now - o.seconds / 2 for o in observations]
        weights = np.sqrt([o.seconds for o in observations])

        def slope(values: Sequence[float]) -> float:
            return float(np.polyfit(middles, values, 1, w=weights)[0])

        growth = slope([o.ongoing for o in observations])
        arrivals = slope(running_counts([o.rps for o in observations], observations))
        refused = slope(running_counts([o.refused for o in observations], observations))
    throughout = set.intersection(*(set(o.rates) for o in observations))
    rates = {
        replica: sum(o.rates[replica] * o.seconds for o in observations) / seconds
        for replica in throughout
    }
    return Window(seconds, arrivals, growth, rates, refused, longest_idle(observations))


def running_counts(rates: Sequence[float], observations: Sequence[Observation]) -> list[float]:
    """The running count of events at `rates` over each interval, at its middle."""
    counts, total = [], 0.0
    for rate, o in zip(rates, observations, strict=True):
        counts.append(total + rate * o.seconds / 2)
        total += rate * o.seconds
    return counts


def longest_idle(observations: Sequence[Observation]) -> float:
    """The longest run of consecutive checks without an arrival, in seconds."""
    longest = run = 0.0
    for o in observations:
        run = run + o.seconds if o.rps == 0 else 0.0
        longest = max(longest, run)
    return longest


def replicas(n: int) -> str:
    return f"{n} replica{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class Verdict:
    word: str  # gain | no gain | kept up | probe
    text: str  # for autoscaler.csv
    replicas: int | None = None  # the pool should hold this many now
    drain: tuple[str, ...] = ()  # these replicas first


@dataclass
class Trial:
    """A scale-up from `low` to `high` replicas, being judged."""

    low: int
    high: int
    before: Window | None  # at `low`, saturated; None: none to compare with
    after: Window | None = None  # at `high`; once measured, a probe measures `low`
    settled_at: float | None = None  # since when the pool has the shape being measured

    @property
    def shape(self) -> int:
        return self.low if self.after is not None else self.high


@dataclass(frozen=True)
class Knee:
    replicas: int  # scale-ups above this are held
    until: float
    places: frozenset[str]  # where the replicas ran when it was found


class GainCheck:
    def __init__(self, cfg: ScalingConfig, own_rate: bool = False) -> None:
        """`own_rate`: replicas have allocations of their own; judge each on its own."""
        if cfg.gain_share > 0 and cfg.gain_window_s < 3 * cfg.check_interval_s:
            raise ValueError("gain_window_s must span at least 3 check intervals")
        self.cfg = cfg
        self.own_rate = own_rate
        self.history: deque[Observation] = deque()
        self.trial: Trial | None = None
        self.knee: Knee | None = None
        # What the last scale-up that paid added per replica, in one replica's rate (0:
        # none has): more than one at a time even out of a step, as many as the load asks
        # once it is about a whole replica's rate.
        self.paid = 0.0
        self.strikes = 0  # knees found in a row, each doubling the hold
        self._ready_since: dict[str, float] = {}
        self._judged: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.cfg.gain_share > 0

    @property
    def probing(self) -> bool:
        """Replicas are out for a probe: kept running to return if they paid."""
        return self.trial is not None and self.trial.after is not None

    def observe(self, obs: Observation) -> Verdict | None:
        """Take one check's observation; a verdict when a scale-up has been judged."""
        cfg = self.cfg
        self.history.append(obs)
        keep = 3 * (cfg.gain_settle_s + cfg.gain_window_s)
        while self.history[0].now < obs.now - keep:
            self.history.popleft()
        if self.knee is not None and not obs.places <= self.knee.places:
            self.knee, self.strikes, self.paid = None, 0, 0.0  # another machine
        elif self.knee is not None and obs.now >= self.knee.until:
            self.knee = None
        if not self.enabled:
            return None
        return self._judge_own(obs) if self.own_rate else self._judge_trial(obs)

    def ceiling(self, current: int) -> int | None:
        """The most replicas a scale-up may reach now (None: no limit but max_replicas)."""
        if not self.enabled:
            return None
        if self.knee is not None:
            return max(self.knee.replicas, current)
        if self.own_rate:
            return None
        if self.trial is not None:
            return current
        if self.strikes:
            return current + 1
        if self.paid >= 1 - self.cfg.gain_share:
            return None
        if self.paid or self._saturated_window(current) is not None:
            return 2 * max(current, 1)
        return current + 1

    def limit(self, obs: Observation, wanted: int) -> tuple[int, str]:
        """What a scale-up the load asks for may reach, and why it is less."""
        ceiling = self.ceiling(obs.current)
        if ceiling is None or wanted <= ceiling:
            return wanted, ""
        if self.knee is not None:
            left = self.knee.until - obs.now
            return ceiling, f"no gain above {replicas(self.knee.replicas)} ({left:.0f} s more)"
        if self.trial is not None:
            return ceiling, f"judging {self.trial.low} -> {self.trial.high} replicas"
        if self.strikes:
            return ceiling, "one at a time above the last knee"
        if ceiling > obs.current + 1:
            return ceiling, "at most twice as many at a time"
        return ceiling, "one at a time: no saturated window to compare with"

    def scaled(self, obs: Observation, to: int) -> None:
        """A scale-up from the pool observed to `to` replicas: judge it once settled."""
        if self.enabled and not self.own_rate and self.trial is None:
            self.trial = Trial(obs.current, to, self._saturated_window(obs.current))

    # --- the pool's rate, before and after ---------------------------------------

    def _recent(self, now: float) -> list[Observation]:
        return [o for o in self.history if o.now > now - self.cfg.gain_window_s + 1e-9]

    def _saturated_window(self, count: int) -> Window | None:
        """The last window in which `count` replicas, all ready, carried at least the target
        each at every check while the queue grew, so what they served is what they can
        serve; None when there is none spanning half a window."""
        run: list[Observation] = []
        target = self.cfg.target_ongoing_requests
        for o in reversed(self.history):
            if o.ready != count or not o.settled or o.ongoing < count * target:
                break
            run.append(o)
            if sum(r.seconds for r in run) >= self.cfg.gain_window_s:
                break
        if sum(o.seconds for o in run) < self.cfg.gain_window_s / 2:
            return None
        measured = window_of(run[::-1])
        return measured if measured.grew else None

    def _stopped(self, measured: Window) -> bool:
        """Arrivals stopped in the window: a queue that only drains says nothing of what
        the replicas can serve."""
        return measured.idle >= STOPPED_INTERVALS * self.cfg.check_interval_s - 1e-9

    def _judge_trial(self, obs: Observation) -> Verdict | None:
        trial, cfg = self.trial, self.cfg
        if trial is None:
            return None
        if obs.current != trial.shape:  # the load or a death changed the pool: no verdict
            self.trial = None
            return None
        if not obs.settled:
            trial.settled_at = None
            return None
        if trial.settled_at is None:
            trial.settled_at = obs.now
        if obs.now - trial.settled_at < cfg.gain_settle_s + cfg.gain_window_s - 1e-9:
            return None
        measured = window_of(self._recent(obs.now))
        if self._stopped(measured):
            return None  # judged on the next window with arrivals all through
        if not measured.grew:
            self.trial = None
            return Verdict(
                "kept up",
                f"kept up: {replicas(trial.shape)} serve {measured.served:.1f}/s"
                " and the queue does not grow",
            )
        if trial.after is not None:  # the probe's measurement of `low`
            return self._compare(obs, trial.low, measured, trial.high, trial.after, probed=True)
        if trial.before is None:
            trial.after, trial.settled_at = measured, None
            return Verdict(
                "probe",
                f"probe: {replicas(trial.high)} serve {measured.served:.1f}/s and the queue"
                f" still grows; {trial.low} alone measured to compare",
                replicas=trial.low,
            )
        return self._compare(obs, trial.low, trial.before, trial.high, measured, probed=False)

    def _compare(
        self, obs: Observation, low: int, at_low: Window, high: int, at_high: Window, probed: bool
    ) -> Verdict:
        self.trial = None
        unit = at_low.served / low
        added = (at_high.served - at_low.served) / (high - low)
        rates = (
            f"{replicas(high)} served {at_high.served:.1f}/s, {low} serve{'s' * (low == 1)}"
            f" {at_low.served:.1f}/s"
            if probed
            else f"{replicas(low)} served {at_low.served:.1f}/s, {high} serve"
            f" {at_high.served:.1f}/s"
        )
        if added >= self.cfg.gain_share * unit:
            self.paid, self.strikes = added / unit, 0
            return Verdict("gain", f"gain: {rates}", replicas=high if probed else None)
        # As many replicas as the rate after is worth, if each up to the knee added a whole
        # replica's rate and the rest nothing (a probe is back at `low` already).
        knee = low if probed else max(low, min(high - 1, round(at_high.served / unit)))
        hold = self._hold(obs, knee)
        return Verdict(
            "no gain",
            f"no gain: {rates}; above {knee} held {hold:g} s",
            replicas=None if probed else knee,
        )

    def _hold(self, obs: Observation, knee: int) -> float:
        """Hold scale-ups above `knee`; the next try, after the hold, adds one replica."""
        self.strikes += 1
        self.paid = 0.0
        hold = self.cfg.saturation_cooldown_s * 2 ** min(self.strikes - 1, MAX_DOUBLINGS)
        self.knee = Knee(knee, obs.now + hold, obs.places)
        return hold

    # --- each replica on its own rate ----------------------------------------------

    def _judge_own(self, obs: Observation) -> Verdict | None:
        cfg = self.cfg
        for gone in set(self._ready_since) - set(obs.rates):
            del self._ready_since[gone]
            self._judged.discard(gone)
        for replica in obs.rates:
            self._ready_since.setdefault(replica, obs.now)
        due = [
            r for r, since in self._ready_since.items()
            if r not in self._judged and obs.now - since >= cfg.gain_settle_s + cfg.gain_window_s
        ]  # fmt: skip
        if not due:
            return None
        measured = window_of(self._recent(obs.now))
        if self._stopped(measured):
            return None
        for replica in due:
            others = [r for r in measured.rates if r != replica]
            if not others:  # the first replica, alone: the one the others are set against
                self._judged.add(replica)
                continue
            if replica not in measured.rates or not measured.grew:
                continue  # the load, not the replicas, bounded what each served: a later window
            self._judged.add(replica)
            own = measured.rates[replica]
            unit = sum(measured.rates[r] for r in others) / len(others)
            rates = f"{replica} serves {own:.1f}/s on its own, one replica {unit:.1f}/s"
            if own >= cfg.gain_share * unit:
                self.paid, self.strikes = own / unit, 0
                return Verdict("gain", f"gain: {rates}")
            knee = obs.current - 1
            hold = self._hold(obs, knee)
            return Verdict(
                "no gain",
                f"no gain: {rates}; above {knee} held {hold:g} s",
                replicas=knee,
                drain=(replica,),
            )
        return None
