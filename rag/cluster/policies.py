"""Which ready replica gets the next request.

Every policy reads the balancer's own in-flight counters (requests it has forwarded and
not yet seen answered), so choosing costs no probe round trip.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Routable(Protocol):
    in_flight: int


R = TypeVar("R", bound=Routable)


class RoundRobin:
    """Each replica in turn, whatever its load."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, replicas: Sequence[R]) -> R:
        return replicas[next(self._turn) % len(replicas)]


class LeastOutstanding:
    """The replica with the fewest requests in flight; ties go round robin, so an idle
    pool still spreads its load."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, replicas: Sequence[R]) -> R:
        start = next(self._turn) % len(replicas)
        rotated = [*replicas[start:], *replicas[:start]]
        return min(rotated, key=lambda r: r.in_flight)


class PowerOfTwo:
    """Two replicas drawn at random, the less loaded one wins (Mitzenmacher): nearly as
    good as least outstanding, and it does not herd when counters are stale."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def choose(self, replicas: Sequence[R]) -> R:
        if len(replicas) == 1:
            return replicas[0]
        a, b = self._random.sample(range(len(replicas)), 2)
        return replicas[a] if replicas[a].in_flight <= replicas[b].in_flight else replicas[b]


POLICIES = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwo,
}


def make_policy(name: str) -> RoundRobin | LeastOutstanding | PowerOfTwo:
    if name not in POLICIES:
        raise ValueError(f"unknown balancer policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
