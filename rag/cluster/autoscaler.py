"""How many replicas the load asks for, decided once per check interval.

The rules, and where they come from:

- Signal: requests in flight per replica (queued or computing at the replica), against
  `target_ongoing_requests` (Ray Serve); optionally also requests/s per replica against
  `target_rps_per_replica`; the larger recommendation wins.  The mean is exact over each
  interval (the pool integrates requests in flight over time), not a point sample.
- Scale-up follows the mean over `stable_window_s`, once it has exceeded the target by
  Kubernetes HPA's 10 % tolerance at every check of the last `upscale_delay_s` (Ray
  Serve's delay).
- Panic (Knative): when the mean over the short `panic_window_s`, or the requests in
  flight right now, reach `panic_threshold` x what the replicas should carry, it scales
  up to that at once, and nothing scales down until a whole stable window has passed
  without panic.  A burst also wakes the check early (see `burst_level`), so a step in
  load is answered within one check interval.
- Scale-down is stabilised (HPA): the count falls only when the highest recommendation of
  the last `downscale_delay_s` (10 % below the target) is lower, one replica at a time,
  and not within `downscale_delay_s` of the previous change.  A steady load near a
  boundary stays in the band between the up and down rules instead of flapping.
- Starting replicas count as capacity, so a burst that waits for new replicas does not
  ask for them again at every check (the overshoot Ray Serve and HPA users report).
- Dead replicas are not capacity: they are replaced at the next check.
- What a scale-up bought is measured (rag/cluster/gain.py): replicas that only divide what
  the others already use are taken back, and scale-ups above that count are held.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag.cluster.gain import GainCheck
from rag.cluster.observation import Observation
from rag.config import ScalingConfig
from rag.storage import write_csv

# As Kubernetes HPA's default: load within 10 % of the target changes nothing.
TOLERANCE = 0.1
DECISION_COLUMNS = (
    "time",
    "elapsed_s",
    "ongoing",
    "ongoing_stable",
    "ongoing_panic",
    "rps",
    "served",
    "refused",
    "ready",
    "starting",
    "draining",
    "replicas_before",
    "replicas_after",
    "recommended",
    "panic",
    "verdict",
    "knee",
    "reason",
)


@dataclass(frozen=True)
class Decision:
    replicas: int  # what the pool should hold (ready + starting) after this check
    recommended: int  # what the load alone asks for, before limits and stabilisation
    panic: bool
    reason: str
    ongoing_stable: float
    ongoing_panic: float
    verdict: str = ""  # what a scale-up bought, when one was judged at this check
    knee: int | None = None  # scale-ups above this are held
    drain: tuple[str, ...] = ()  # replicas to take back first
    park: bool = False  # keep the replicas taken back running, to return at once


class Autoscaler:
    def __init__(self, cfg: ScalingConfig, own_rate: bool = False) -> None:
        """`own_rate`: replicas have allocations of their own (SLURM jobs), so each one's
        gain is judged on its own rate rather than on the pool's."""
        if not 1 <= cfg.min_replicas <= cfg.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if cfg.target_ongoing_requests <= 0 or cfg.check_interval_s <= 0:
            raise ValueError("target_ongoing_requests and check_interval_s must be > 0")
        if not 0 < cfg.panic_window_s <= cfg.stable_window_s:
            raise ValueError("need 0 < panic_window_s <= stable_window_s")
        self.cfg = cfg
        self._samples: deque[tuple[float, float, float, float]] = deque()  # (t, s, ongoing, rps)
        self._recommendations: deque[tuple[float, int]] = deque()  # (t, replicas) for down
        self._ups: deque[tuple[float, int]] = deque()  # (t, replicas) for up
        self._last_change = -math.inf
        self._first = math.inf  # the first check
        self._panic_until = -math.inf
        self.gain = GainCheck(cfg, own_rate)

    def _mean(self, now: float, window_s: float, column: int) -> float:
        recent = [(s[1], s[column]) for s in self._samples if s[0] > now - window_s]
        seconds = sum(length for length, _ in recent)
        return sum(length * value for length, value in recent) / seconds if seconds else 0.0

    def _want(self, ongoing: float, rps: float, slack: float = 1.0) -> int:
        """Replicas for this load at the target, each allowed `slack` x the target."""
        want = math.ceil(ongoing / (slack * self.cfg.target_ongoing_requests) - 1e-9)
        if self.cfg.target_rps_per_replica > 0:
            want = max(want, math.ceil(rps / (slack * self.cfg.target_rps_per_replica) - 1e-9))
        return want

    def burst_level(self, replicas: int) -> float:
        """Requests in flight at which `replicas` would panic: worth a check at once
        (never while a scale-up could not follow)."""
        ceiling = self.gain.ceiling(replicas)
        if replicas >= min(self.cfg.max_replicas, ceiling or math.inf):
            return math.inf
        return self.cfg.panic_threshold * self.cfg.target_ongoing_requests * max(replicas, 1)

    def decide(self, obs: Observation) -> Decision:
        """One check: the load over the last interval and the pool as it is now."""
        cfg, now = self.cfg, obs.now
        self._first = min(self._first, now)
        self._samples.append((now, obs.seconds, obs.ongoing, obs.rps))
        while self._samples and self._samples[0][0] <= now - cfg.stable_window_s:
            self._samples.popleft()
        stable = self._mean(now, cfg.stable_window_s, 2)
        stable_rps = self._mean(now, cfg.stable_window_s, 3)
        # A step in load shows first in the requests in flight now; the window's mean
        # catches up a window later.
        panic_load = max(self._mean(now, cfg.panic_window_s, 2), obs.in_flight)
        want_stable = self._want(stable, stable_rps)
        want_panic = self._want(panic_load, self._mean(now, cfg.panic_window_s, 3))
        current = obs.current
        # Panic compares the load itself (not a rounded-up count) with what the replicas
        # are meant to carry, as Knative does, but counting starting ones: a burst already
        # answered by replicas on their way must not panic again.
        burst = panic_load / cfg.target_ongoing_requests
        bursting = burst >= cfg.panic_threshold * max(current, 1)
        if bursting:
            self._panic_until = now + cfg.stable_window_s
        panic = now < self._panic_until
        recommended = max(want_stable, want_panic) if panic else want_stable
        # Up only when the load exceeds the target by the tolerance at every check of the
        # last upscale_delay_s (panic excepted); down only when fewer replicas stay under
        # it by the tolerance for downscale_delay_s.  Between the two a steady load holds.
        self._ups.append((now, self._want(stable, stable_rps, 1 + TOLERANCE)))
        while self._ups[0][0] <= now - cfg.upscale_delay_s:
            self._ups.popleft()
        held = now - self._first >= cfg.upscale_delay_s - cfg.check_interval_s / 2
        want_up = min(r for _, r in self._ups) if held else 0
        if bursting:  # not for the rest of the panic: a backlog that built up while the
            want_up = max(want_up, want_panic)  # new replicas started is no new burst
        down = self._want(stable, stable_rps, 1 - TOLERANCE)
        self._recommendations.append((now, max(down, want_panic) if panic else down))
        while self._recommendations[0][0] <= now - cfg.downscale_delay_s:
            self._recommendations.popleft()

        verdict = self.gain.observe(obs)
        word, note = (verdict.word, f"; {verdict.text}") if verdict else ("", "")

        def decision(replicas: int, reason: str, drain: tuple[str, ...] = ()) -> Decision:
            if replicas != current:
                self._last_change = now
            knee = self.gain.knee.replicas if self.gain.knee else None
            return Decision(
                replicas,
                recommended,
                panic,
                reason + note,
                stable,
                panic_load,
                word,
                knee,
                drain,
                park=self.gain.probing,
            )

        if current < cfg.min_replicas:
            return decision(cfg.min_replicas, f"below min_replicas ({current})")
        if verdict is not None and verdict.replicas is not None and verdict.replicas != current:
            to = min(max(verdict.replicas, cfg.min_replicas), cfg.max_replicas)
            return decision(
                to, f"{'take back' if to < current else 'back up'} to {to}", verdict.drain
            )
        if want_up > current and current < cfg.max_replicas:
            wanted, why = self.gain.limit(obs, min(want_up, cfg.max_replicas))
            if wanted <= current:
                return decision(current, f"hold: {why}")
            self.gain.scaled(obs, wanted)
            mode = "panic" if bursting and want_panic > want_stable else "load"
            return decision(wanted, f"scale up ({mode}{'; ' + why if why else ''})")
        if current > cfg.max_replicas:
            return decision(cfg.max_replicas, "above max_replicas")
        lowest_safe = max(max(r for _, r in self._recommendations), cfg.min_replicas)
        settled = now - self._last_change >= cfg.downscale_delay_s
        if lowest_safe < current and settled and not panic:
            # One at a time: with batching, requests in flight do not fall in proportion
            # to the load per replica, so the recommendation made at N replicas
            # undershoots what N - 2 would see.  The next step waits a whole delay.
            return decision(current - 1, "scale down (stabilised)")
        return decision(current, "hold")


class DecisionLog:
    """autoscaler.csv: one row per check, the whole file rewritten atomically each time, so
    a reader (the harness plotting replicas over time) never sees a half row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        write_csv(self.path, self.rows, DECISION_COLUMNS)

    def record(self, decision: Decision, obs: Observation) -> None:
        self.rows.append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
                "elapsed_s": f"{obs.now - self.started:.3f}",
                "ongoing": f"{obs.ongoing:.3f}",
                "ongoing_stable": f"{decision.ongoing_stable:.3f}",
                "ongoing_panic": f"{decision.ongoing_panic:.3f}",
                "rps": f"{obs.rps:.3f}",
                "served": f"{obs.served:.3f}",
                "refused": f"{obs.refused:.3f}",
                "ready": obs.ready,
                "starting": obs.starting,
                "draining": obs.draining,
                "replicas_before": obs.current,
                "replicas_after": decision.replicas,
                "recommended": decision.recommended,
                "panic": int(decision.panic),
                "verdict": decision.verdict,
                "knee": decision.knee,
                "reason": decision.reason,
            }
        )
        write_csv(self.path, self.rows, DECISION_COLUMNS)
