"""What the scaling rules see at each check: the load over the interval since the previous
check and the replicas as they are now.  The rules are functions of a sequence of these, so
each is tested alone on synthetic traces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Observation:
    now: float  # monotonic seconds
    seconds: float  # the interval's length
    ongoing: float  # mean requests in flight over the interval (exact: integrated)
    rps: float  # requests forwarded per second over the interval
    ready: int
    starting: int = 0
    draining: int = 0  # taken out of rotation, still answering what they hold
    in_flight: int = 0  # requests in flight now
    served: float = 0.0  # requests answered per second over the interval (2xx/3xx)
    # Requests/s the replicas refused or failed (429, 503, 504, ...): an answer that costs a
    # replica next to nothing is not capacity.
    refused: float = 0.0
    # Requests/s each ready replica answered over the interval, by replica id: what it
    # served, not what the balancer sent it (a backlogged replica is sent less).
    rates: Mapping[str, float] = field(default_factory=dict)
    # Where the ready replicas compute (their hosts): replicas on one host share it.
    places: frozenset[str] = frozenset()

    @property
    def current(self) -> int:
        """The replicas the autoscaler steers: ready and starting."""
        return self.ready + self.starting

    @property
    def settled(self) -> bool:
        """Every replica is ready: none loading, none finishing before it stops."""
        return self.starting == 0 and self.draining == 0
