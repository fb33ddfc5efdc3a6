"""The replicas behind the balancer: their lifecycle, health and load counters.

A replica is `starting` from launch until its own `/ready` answers 200, then `ready` (only
ready replicas receive traffic), `draining` once chosen for scale-down (no new requests;
stopped when its last one is answered), and finally `stopped` (an orderly end) or `dead`
(it exited, its job ended, it refused a connection or failed its health checks).  A dead
replica is never routed to again; the autoscaler replaces it.  A replica taken out for a
while (to measure the pool without it) is `parked` once drained: kept running, idle, so it
can return at once (`starting` again until its `/ready` answers).

The pool also keeps the autoscaler's signal exactly: the area under the curve of requests
in flight, so the mean over any interval is known without sampling.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import aiohttp

from rag.clock import MONOTONIC, Clock

log = logging.getLogger("rag.cluster")

HEALTH_STRIKES = 3  # health checks that time out in a row before a replica counts as dead


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    PARKED = "parked"
    STOPPED = "stopped"
    DEAD = "dead"


@dataclass(eq=False)
class Replica:
    id: str
    url: str = ""  # known once the replica listens (local: its port file; SLURM: it registers)
    state: State = State.STARTING
    pid: int | None = None  # a local process
    job_id: str = ""  # a SLURM job
    in_flight: int = 0
    requests: int = 0  # forwarded to it, including those it refused to connect
    refused: int = 0  # never reached it (connection refused): sent to another replica
    errors: int = 0
    answered: int = 0  # answers it gave (2xx/3xx)
    rps: float = 0.0  # requests forwarded to it per second over the last check interval
    served_rps: float = 0.0  # answers per second over the last check interval
    reason: str = ""  # why it stopped or died
    launched_at: float = 0.0  # on the pool's clock, as ready_at
    ready_at: float | None = None
    start_s: float | None = None  # launch to its first /ready (a return from a probe is none)
    handle: Any = field(default=None, repr=False)  # the launcher's own (Popen, submitit job)
    strikes: int = 0
    parking: bool = False  # draining to be parked, not stopped
    _requests_at_sample: int = 0
    _answered_at_sample: int = 0

    @property
    def capacity(self) -> bool:
        """Counts towards the replica count the autoscaler steers (starting ones too)."""
        return self.state in (State.STARTING, State.READY)

    def describe(self, private: bool = True) -> dict[str, Any]:
        """What /replicas shows; `private` adds what only the machine's own users may see
        (the process id, the job, and the reason it ended, which quotes its log)."""
        public = {
            "id": self.id,
            "url": self.url,
            "state": self.state.value,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "refused": self.refused,
            "requests_per_s": round(self.rps, 3),
            "answers_per_s": round(self.served_rps, 3),
            "errors": self.errors,
            "start_s": None if self.start_s is None else round(self.start_s, 3),
        }
        if not private:
            return public
        return {**public, "pid": self.pid, "job_id": self.job_id or None, "reason": self.reason}


class Launcher(Protocol):
    """Starts and stops replica processes somewhere (this machine, a SLURM job)."""

    def launch(self, replica: Replica) -> None: ...

    def address(self, replica: Replica) -> str | None: ...

    def expected_host(self, replica: Replica) -> str | None:
        """The host a replica must register from, when the launcher knows it."""
        ...

    def exited(self, replica: Replica) -> str | None: ...

    async def stop(self, replica: Replica) -> None: ...


@dataclass
class Sample:
    """The load over one interval: mean requests in flight, requests forwarded and answered
    per second."""

    ongoing: float
    rps: float
    seconds: float
    in_flight: int  # at the end of the interval
    served: float  # answers per second (2xx/3xx)
    refused: float  # refusals and failures per second


class ReplicaPool:
    def __init__(
        self,
        launcher: Launcher,
        health_interval_s: float,
        start_timeout_s: float,
        on_dead: Callable[[Replica], None] = lambda replica: None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.launcher = launcher
        self.health_interval_s = health_interval_s
        self.start_timeout_s = start_timeout_s
        self.on_dead = on_dead
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self.ready: list[Replica] = []  # the routable ones, kept current on every change
        self.session: aiohttp.ClientSession | None = None
        self._next_id = 0
        self._in_flight = 0
        self._area = 0.0  # integral of requests in flight over time (request-seconds)
        self._changed_at = clock.now()
        self._requests = 0
        self._refused = 0  # hops refused or failed
        # (time, area, requests, in flight, refused) at the last sample
        self._sampled = (self._changed_at, 0.0, 0, 0, 0)
        self._stopping: set[asyncio.Task] = set()
        # Requests in flight that count as a burst: reaching it wakes the autoscaler at
        # once instead of at its next check (set by the autoscaler after each decision).
        self.burst_level = math.inf
        self.burst = asyncio.Event()

    # --- load accounting (on every proxied request; kept cheap) ---------------------

    def _advance(self) -> None:
        now = self.clock.now()
        self._area += self._in_flight * (now - self._changed_at)
        self._changed_at = now

    def begin(self, replica: Replica) -> None:
        self._advance()
        self._in_flight += 1
        self._requests += 1
        if self._in_flight >= self.burst_level:
            self.burst.set()
        replica.in_flight += 1
        replica.requests += 1

    def end(self, replica: Replica, served: bool = True) -> None:
        """A request's hop is over: `served` False when it was refused or failed."""
        self._advance()
        self._in_flight -= 1
        self._refused += not served
        replica.in_flight -= 1
        replica.answered += served
        if replica.state is State.DRAINING and replica.in_flight == 0:
            self._drained(replica)

    def sample(self) -> Sample:
        """Mean requests in flight, the request rate and the answer rate since the previous
        sample."""
        self._advance()
        then, area, requests, in_flight, refused = self._sampled
        now = self._changed_at
        seconds = max(now - then, 1e-9)
        self._sampled = (now, self._area, self._requests, self._in_flight, self._refused)
        for replica in self.replicas.values():
            replica.rps = (replica.requests - replica._requests_at_sample) / seconds
            replica.served_rps = (replica.answered - replica._answered_at_sample) / seconds
            replica._requests_at_sample = replica.requests
            replica._answered_at_sample = replica.answered
        forwarded = self._requests - requests
        refusals = self._refused - refused
        answered = forwarded - (self._in_flight - in_flight) - refusals
        return Sample(
            (self._area - area) / seconds,
            forwarded / seconds,
            seconds,
            self._in_flight,
            answered / seconds,
            refusals / seconds,
        )

    # --- lifecycle --------------------------------------------------------------------

    def count(self, *states: State) -> int:
        return sum(1 for r in self.replicas.values() if r.state in states)

    def launch(self) -> Replica:
        replica = Replica(f"r{self._next_id}", launched_at=self.clock.now())
        self._next_id += 1
        self.replicas[replica.id] = replica
        self.launcher.launch(replica)
        log.info("launched replica %s", replica.id)
        return replica

    def _set_state(self, replica: Replica, state: State) -> None:
        replica.state = state
        self.ready = [r for r in self.replicas.values() if r.state is State.READY]

    def mark_ready(self, replica: Replica) -> None:
        replica.ready_at = self.clock.now()
        if replica.start_s is None:
            replica.start_s = replica.ready_at - replica.launched_at
        replica.strikes = 0
        self._set_state(replica, State.READY)
        log.info("replica %s ready at %s", replica.id, replica.url)

    def mark_dead(self, replica: Replica, reason: str) -> None:
        """Take a replica out at once (never routed to again) and stop what is left of it."""
        if replica.state in (State.DEAD, State.STOPPED):
            return
        log.warning("replica %s is dead: %s", replica.id, reason)
        self._stop(replica, State.DEAD, reason)
        self.on_dead(replica)

    def drain(self, replica: Replica, park: bool = False) -> None:
        """Scale-down: no new requests; once its in-flight requests are answered, stopped
        (or parked, if `park`)."""
        replica.parking = park and replica.state is State.READY
        if replica.state is State.STARTING or replica.in_flight == 0:
            self._drained(replica)
        elif replica.state is State.READY:
            self._set_state(replica, State.DRAINING)

    def _drained(self, replica: Replica) -> None:
        if replica.parking:
            self._set_state(replica, State.PARKED)
        else:
            self._stop(replica, State.STOPPED, "scaled down")

    def unpark(self, replica: Replica) -> None:
        """Back into service: a draining one at once, a parked one once /ready answers."""
        replica.parking = False
        if replica.state is State.DRAINING:
            self._set_state(replica, State.READY)
        elif replica.state is State.PARKED:
            replica.launched_at = self.clock.now()
            self._set_state(replica, State.STARTING)

    def _stop(self, replica: Replica, state: State, reason: str) -> None:
        replica.reason = reason
        self._set_state(replica, state)
        task = asyncio.get_running_loop().create_task(self.launcher.stop(replica))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def stop_all(self) -> None:
        for replica in self.replicas.values():
            if replica.state not in (State.DEAD, State.STOPPED):
                self._stop(replica, State.STOPPED, "balancer stopped")
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # --- health -----------------------------------------------------------------------

    async def check(self, replica: Replica) -> None:
        """One health check: has it exited, does it listen yet, is it (still) ready?"""
        if (reason := self.launcher.exited(replica)) is not None:
            self.mark_dead(replica, reason)
            return
        if not replica.url:
            replica.url = self.launcher.address(replica) or ""
        if replica.state is State.STARTING and not replica.url:
            self._check_start_deadline(replica)
            return
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * self.health_interval_s))
        try:
            async with self.session.get(f"{replica.url}/ready", timeout=timeout) as response:
                ready = response.status == 200
        except aiohttp.ClientConnectorError as exc:
            if replica.state is State.STARTING:  # not listening yet
                self._check_start_deadline(replica)
            else:
                self.mark_dead(replica, f"refused its health check: {exc.os_error}")
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            replica.strikes += 1
            if replica.strikes >= HEALTH_STRIKES and replica.state is not State.STARTING:
                self.mark_dead(replica, f"{replica.strikes} health checks failed ({exc!r})")
            return
        replica.strikes = 0
        if replica.state is State.STARTING:
            if ready:
                self.mark_ready(replica)
            else:
                self._check_start_deadline(replica)
        elif replica.state is State.READY and not ready:
            self.mark_dead(replica, "its /ready stopped answering 200")

    def _check_start_deadline(self, replica: Replica) -> None:
        if self.clock.now() - replica.launched_at > self.start_timeout_s:
            self.mark_dead(replica, f"not ready within {self.start_timeout_s:g} s")

    async def health_loop(self) -> None:
        while True:
            watched = [
                r for r in self.replicas.values() if r.state in (State.STARTING, State.READY)
            ]
            await asyncio.gather(*(self.check(r) for r in watched))
            await asyncio.sleep(self.health_interval_s)
