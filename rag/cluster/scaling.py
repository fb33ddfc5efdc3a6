"""`python -m rag.serve variant=scaling ...`: the balancer, the autoscaler and the replicas
as one command.

The balancer listens on `port` (clients need not know which variant they talk to), the
pool starts `min_replicas` replicas of the batched server with the same model and corpus
settings, and every `check_interval_s` the autoscaler sizes the pool, writing one row per
decision to `<run_dir>/autoscaler.csv`.  Ctrl-C or SIGTERM stops taking requests, lets the
forwarded ones finish, then drains and stops every replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from hydra.core.override_parser.overrides_parser import OverridesParser

from rag.cluster.admin import TOKEN_ENV
from rag.cluster.autoscaler import Autoscaler, DecisionLog
from rag.cluster.balancer import Balancer, BalancerSettings
from rag.cluster.local import LocalLauncher, machine_cores, visible_gpus
from rag.cluster.observation import Observation
from rag.cluster.policies import make_policy
from rag.cluster.pool import Launcher, Replica, ReplicaPool, State
from rag.cluster.process import write_port_file
from rag.config import Config, ScalingConfig, compose_from_argv
from rag.storage import scratch_folder
from rag.web import connection_cap

log = logging.getLogger("rag.cluster")

# Keys that configure the scaling process itself; every other override goes to replicas.
OWN_KEYS = ("variant", "host", "port", "port_file", "run_dir")
# Replicas that may die before any replica was ever ready before the service gives up: a
# replica that cannot start (a bad override, a missing model) would otherwise be replaced
# forever, and whoever started the variant would wait for a readiness that never comes.
START_FAILURES_TO_GIVE_UP = 3
REPLICA_VARIANTS = ("batched", "continuous")


def is_own_key(key: str) -> bool:
    return any(key == own or key.startswith(own + ".") for own in OWN_KEYS)


def replica_overrides(argv: list[str], cfg: Config, replica: Replica) -> list[str]:
    """The overrides a replica's `rag.serve` runs with: the user's model, corpus and
    server settings, the replica variant (batched or continuous) with this variant's batching
    settings, its id."""
    parsed = OverridesParser.create().parse_overrides(argv)
    shared = [o.input_line for o in parsed if not is_own_key(o.key_or_group)]
    v = cfg.variant
    assert v.scaling is not None
    return [
        *shared,
        f"variant={v.scaling.replica_variant}",
        f"variant.max_batch_size={v.max_batch_size}",
        f"variant.max_wait_ms={v.max_wait_ms}",
        f"variant.max_queue={v.max_queue}",
        f"variant.request_timeout_s={v.request_timeout_s}",
        f"server.replica_id={replica.id}",
    ]


class ScalingService:
    def __init__(self, cfg: Config, argv: list[str], run_dir: Path) -> None:
        scaling = cfg.variant.scaling
        assert scaling is not None
        self.cfg = cfg
        self.scaling: ScalingConfig = scaling
        self.run_dir = run_dir
        # SLURM jobs have allocations of their own: each is judged on its own rate.
        self.autoscaler = Autoscaler(scaling, own_rate=scaling.launcher == "slurm")
        self.decisions = DecisionLog(run_dir / "autoscaler.csv")
        self.deaths: list[str] = []  # since the last check, for the decision's reason
        self.url = ""  # where replicas reach the balancer, once it listens
        # Registration always needs it; the launcher hands it to its own replicas, and the
        # balancer presents it to their admin calls.
        self.token = os.environ.get(TOKEN_ENV) or secrets.token_hex(16)
        self.pool = ReplicaPool(
            self._launcher(argv),
            scaling.health_interval_s,
            scaling.replica_start_timeout_s,
            on_dead=self._on_dead,
        )
        self.stopping = asyncio.Event()
        self.failure = ""  # why the service gave up, when it did
        simulated = "simulated" in (cfg.model.generator, cfg.model.embedder)
        self.balancer = Balancer(
            self.pool,
            BalancerSettings(
                policy=make_policy(scaling.policy),
                # as the server's limit: a query's characters may take 12 bytes each as JSON
                max_body_bytes=12 * cfg.server.max_query_chars + 1024,
                body_timeout_s=cfg.server.body_timeout_s,
                head_timeout_s=cfg.server.head_timeout_s,
                hop_timeout_s=scaling.hop_timeout_s,
                # each client connection may hold one to a replica too
                max_connections=connection_cap(scaling.max_connections, files_per_connection=2),
                token=self.token,
                labels={
                    "variant": cfg.variant.name,
                    "model": cfg.model.name,
                    "simulated": simulated,
                    "policy": scaling.policy,
                    "launcher": scaling.launcher,
                    "min_replicas": scaling.min_replicas,
                    "max_replicas": scaling.max_replicas,
                },
            ),
        )

    def _on_dead(self, replica: Replica) -> None:
        self.deaths.append(f"{replica.id} died: {replica.reason}")
        replicas = self.pool.replicas.values()
        if any(r.ready_at is not None for r in replicas):
            return  # the replicas can start: replace the dead one
        if sum(r.state is State.DEAD for r in replicas) >= START_FAILURES_TO_GIVE_UP:
            self.failure = (
                f"{START_FAILURES_TO_GIVE_UP} replicas died before any became ready;"
                f" the last: {replica.reason}"
            )
            self.stopping.set()

    def _launcher(self, argv: list[str]) -> Launcher:
        scaling, cfg = self.scaling, self.cfg

        def overrides(replica: Replica) -> list[str]:
            return replica_overrides(argv, cfg, replica)

        if scaling.launcher == "local":
            return LocalLauncher(
                overrides,
                self.run_dir,
                # the user's model.torch_threads reaches replicas with their overrides
                cores=None if cfg.model.torch_threads else machine_cores(),
                gpus=visible_gpus(scaling.gpus),
                mps_thread_percentage=scaling.mps_thread_percentage,
                token=self.token,
            )
        if scaling.launcher == "slurm":
            from rag.cluster.slurm import SlurmLauncher  # imports submitit

            return SlurmLauncher(
                overrides,
                self.run_dir,
                scaling.slurm,
                balancer=lambda: self.url,
                token=self.token,
                start_timeout_s=scaling.replica_start_timeout_s,
            )
        raise ValueError(f"unknown launcher {scaling.launcher!r}; choose local or slurm")

    async def autoscale_forever(self) -> None:
        """A check every interval, and one at once when a burst fills the replicas (at
        most every tenth of an interval), so a step in load is answered within one."""
        interval = self.scaling.check_interval_s
        next_check = time.monotonic() + interval
        while True:
            try:
                await asyncio.wait_for(self.pool.burst.wait(), next_check - time.monotonic())
            except TimeoutError:  # the scheduled check (a timer may fire a little early)
                next_check += interval
            self.check()
            self.pool.burst.clear()
            await asyncio.sleep(interval / 10)

    def observe(self) -> Observation:
        """The pool as the autoscaler sees it now, with the load since the last check."""
        sample = self.pool.sample()
        return Observation(
            now=self.pool.clock.now(),
            seconds=sample.seconds,
            ongoing=sample.ongoing,
            rps=sample.rps,
            ready=len(self.pool.ready),
            starting=self.pool.count(State.STARTING),
            draining=self.pool.count(State.DRAINING),
            in_flight=sample.in_flight,
            served=sample.served,
            refused=sample.refused,
            rates={r.id: r.served_rps for r in self.pool.ready},
            places=frozenset(urlsplit(r.url).hostname or "" for r in self.pool.ready),
        )

    def check(self) -> None:
        """One autoscaler decision, applied to the pool and logged."""
        obs = self.observe()
        decision = self.autoscaler.decide(obs)
        self.pool.burst_level = self.autoscaler.burst_level(decision.replicas)
        change = decision.replicas - obs.current
        parked = [r for r in self.pool.replicas.values() if r.parking or r.state is State.PARKED]
        returning = parked[: max(0, change)]
        for replica in returning:  # out for a probe that found they paid: back at once
            self.pool.unpark(replica)
        for _ in range(change - len(returning)):
            self.pool.launch()
        for replica in self._scale_down_order(decision.drain)[: max(0, -change)]:
            self.pool.drain(replica, park=decision.park)
        if not decision.park:
            for replica in parked[len(returning) :]:
                self.pool.drain(replica)  # no probe waits for them: stopped
        if isinstance(self.pool.launcher, LocalLauncher):
            self.pool.launcher.share_cores()
        reason = "; ".join([decision.reason, *self.deaths])
        self.deaths.clear()
        self.decisions.record(dataclasses.replace(decision, reason=reason), obs)

    def _scale_down_order(self, first: tuple[str, ...] = ()) -> list[Replica]:
        """The replicas named first, then starting ones (nothing to drain), then the least
        busy, newest first."""
        capacity = [r for r in self.pool.replicas.values() if r.capacity]
        return sorted(
            reversed(capacity),
            key=lambda r: (r.id not in first, r.state is not State.STARTING, r.in_flight),
        )

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector) as session:
            self.pool.session = session
            if isinstance(self.pool.launcher, LocalLauncher):
                self.pool.launcher.session = session  # for the replicas' admin calls
            try:
                port = await self.balancer.start(cfg.host, cfg.port)
            except OSError as exc:
                print(f"ragbench serve: cannot listen on {cfg.host}:{cfg.port}: {exc}",
                      file=sys.stderr)  # fmt: skip
                return 2
            print(
                f"ragbench serve: scaling balancer listening on http://{cfg.host}:{port}"
                f" ({self.scaling.min_replicas}-{self.scaling.max_replicas} replicas,"
                f" {self.scaling.launcher} launcher, run folder {self.run_dir})",
                flush=True,
            )
            wildcard = cfg.host in ("0.0.0.0", "::", "")
            self.url = f"http://{socket.getfqdn() if wildcard else cfg.host}:{port}"
            if cfg.port_file:
                write_port_file(cfg.port_file, port)
            for _ in range(self.scaling.min_replicas):
                self.pool.launch()
            gc.freeze()  # start-up objects live on: keep collections from rescanning them
            tasks = [
                loop.create_task(self.pool.health_loop()),
                loop.create_task(self.autoscale_forever()),
            ]
            await self.stopping.wait()
            if self.failure:
                print(f"ragbench serve: giving up: {self.failure}", file=sys.stderr, flush=True)
            print("ragbench serve: stopping: finishing forwarded requests", flush=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.balancer.stop()
            await self.pool.stop_all()
        return 1 if self.failure else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg: Config = compose_from_argv(args)  # type: ignore[assignment]
    logging.basicConfig(level=cfg.server.log_level.upper())
    if cfg.variant.scaling is None:
        sys.exit("config error: variant=scaling needs its variant.scaling settings")
    if cfg.variant.scaling.replica_variant not in REPLICA_VARIANTS:
        sys.exit(f"config error: variant.scaling.replica_variant must be one of {REPLICA_VARIANTS}")
    scratch = None if cfg.run_dir else scratch_folder("scaling")  # no run_dir: one of its own
    run_dir = Path(scratch.name if scratch else cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        service = ScalingService(cfg, args, run_dir)
    except ValueError as exc:
        sys.exit(f"config error: {exc}")
    try:
        with suppress(KeyboardInterrupt):
            return _run(service.run())
        return 0
    finally:
        if scratch:
            scratch.cleanup()


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    """uvloop where installed: the proxy's added latency is about a third lower with it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
