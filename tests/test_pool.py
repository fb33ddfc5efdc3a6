"""The replica pool on a fake clock: the autoscaler's signal is the exact mean of requests
in flight over each interval, and a replica's start deadline runs on the pool's clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from async_helpers import run

from rag.clock import FakeClock
from rag.cluster.local import LocalLauncher
from rag.cluster.pool import Replica, ReplicaPool, State


def pool_on(clock: FakeClock, run_dir: Path, overrides: list[str]) -> ReplicaPool:
    launcher = LocalLauncher(lambda replica: list(overrides), run_dir, cores=1, gpus=[])
    return ReplicaPool(launcher, health_interval_s=0.2, start_timeout_s=10, clock=clock)


async def spawned(replica: Replica) -> None:
    """Yield until the launcher has started the replica's process (it starts once the
    replicas serving use their share of the cores: at once, with none serving)."""
    for _ in range(100):
        if replica.handle is not None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the replica's process was never started")


def test_the_load_signal_is_the_exact_mean_of_requests_in_flight(tmp_path):
    clock = FakeClock()
    pool = pool_on(clock, tmp_path, [])
    a, b = Replica("a"), Replica("b")
    pool.begin(a)
    clock.advance(1.0)
    pool.begin(b)
    clock.advance(2.0)
    pool.end(a)
    clock.advance(1.0)
    first = pool.sample()  # in flight: 1 for 1 s, 2 for 2 s, 1 for 1 s
    clock.advance(2.0)
    pool.end(b)
    second = pool.sample()  # 1 for 2 s, and nothing sent
    assert (first.ongoing, first.rps, first.seconds, first.in_flight) == (1.5, 0.5, 4.0, 1)
    assert (second.ongoing, second.rps, second.seconds, second.in_flight) == (1.0, 0.0, 2.0, 0)
    assert (a.in_flight, b.in_flight, a.requests, b.requests) == (0, 0, 1, 1)
    assert (first.served, first.refused, second.served, second.refused) == (0.25, 0, 0.5, 0)


def test_a_refused_answer_is_counted_apart_from_those_served(tmp_path):
    clock = FakeClock()
    pool = pool_on(clock, tmp_path, [])
    replica = Replica("a")
    pool.replicas[replica.id] = replica
    for served in (True, False, False, True):
        pool.begin(replica)
        pool.end(replica, served)
    pool.begin(replica)  # still in flight at the sample
    clock.advance(2.0)
    sample = pool.sample()
    assert (sample.rps, sample.served, sample.refused, sample.in_flight) == (2.5, 1.0, 1.0, 1)
    # The replica's own: sent to it, and answered by it (what its own rate is judged on).
    assert (replica.rps, replica.served_rps) == (2.5, 1.0)


def test_a_replica_not_ready_by_its_start_deadline_on_the_pools_clock_is_dead(
    tmp_path, cache_overrides
):
    """A real replica process, launched and health-checked; only the clock is fake, so the
    deadline passes exactly when the test says and the check sees it at once."""

    async def scenario():
        clock = FakeClock()
        pool = pool_on(clock, tmp_path, ["model=simulated", *cache_overrides])
        async with aiohttp.ClientSession() as session:
            pool.session = session
            replica = pool.launch()
            try:
                await spawned(replica)
                await pool.check(replica)
                states = [replica.state]
                clock.advance(10.5)
                await pool.check(replica)
                states.append(replica.state)
            finally:
                await pool.stop_all()
        return states, replica

    states, replica = run(scenario())
    assert states == [State.STARTING, State.DEAD]
    assert replica.reason == "not ready within 10 s"
    assert replica.handle.poll() is not None  # stopped with it


def test_a_replica_back_from_a_probe_keeps_the_start_time_of_its_launch(tmp_path):
    """/replicas' start_s is launch to the first /ready: a parked replica that returns
    within a fraction of a second did not start again."""
    clock = FakeClock()
    pool = pool_on(clock, tmp_path, [])
    replica = Replica("a", launched_at=clock.now())
    pool.replicas[replica.id] = replica
    clock.advance(2.0)
    pool.mark_ready(replica)
    pool.drain(replica, park=True)
    assert replica.state is State.PARKED
    clock.advance(30.0)
    pool.unpark(replica)
    clock.advance(0.3)
    pool.mark_ready(replica)
    assert replica.describe()["start_s"] == 2.0
