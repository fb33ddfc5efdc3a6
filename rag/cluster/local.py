"""Replicas as processes on this machine.

Each replica is `python -m rag.serve <replica overrides> port=0` in a process group of its
own, with its output in `<run_dir>/replicas/<id>.log`.  Replicas share the machine's cores:
unless `model.torch_threads` says otherwise, each computes with cores / replicas torch
threads, where every replica that computes counts (one loading or draining too, not one
parked).  When the count changes, the replicas serving are told their share through their
admin call, and a new replica starts loading only once they use it (after the batch they
are running), so no batch ever runs with more threads than the cores allow: one replica
alone computes as fast as a server started by itself, and four never oversubscribe the
CPU.  GPUs, when there are several, are handed out round robin through
CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp

from rag.cluster import admin
from rag.cluster.pool import Replica, State
from rag.cluster.process import (
    die_with_parent,
    log_tail,
    read_port,
    server_command,
    spawn,
    stop_group,
)

log = logging.getLogger("rag.cluster")

STOP_TIMEOUT_S = 30.0
ADMIN_TIMEOUT_S = 30.0  # a thread change waits for the batch being computed
COMPUTING = (State.STARTING, State.READY, State.DRAINING)  # a parked replica idles


def machine_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def core_share(replicas: int, cores: int) -> int:
    """Torch threads for each of `replicas` sharing `cores` (at least one)."""
    return max(1, cores // max(1, replicas))


def visible_gpus(configured: str) -> list[str]:
    """GPU ids to hand out: the configured list, else the parent's CUDA_VISIBLE_DEVICES."""
    source = configured or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g.strip() for g in source.split(",") if g.strip()]


def replica_env(
    index: int, gpus: list[str], threads: int | None, mps_thread_percentage: int, token: str = ""
) -> dict[str, str]:
    env: dict[str, str] = {admin.TOKEN_ENV: token} if token else {}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    if mps_thread_percentage:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(mps_thread_percentage)
    return env


class LocalLauncher:
    def __init__(
        self,
        overrides: Callable[[Replica], list[str]],
        run_dir: Path,
        cores: int | None,
        gpus: list[str],
        mps_thread_percentage: int = 0,
        host: str = "127.0.0.1",
        token: str = "",
    ) -> None:
        """`overrides(replica)`: the config overrides its `rag.serve` runs with; `cores`:
        the cores the replicas share, or None to leave the user's thread setting alone;
        `token`: the balancer's, for the replicas' admin calls."""
        self.overrides = overrides
        self.folder = run_dir / "replicas"
        self.cores = cores
        self.gpus = gpus
        self.mps_thread_percentage = mps_thread_percentage
        self.host = host
        self.token = token
        self.session: aiohttp.ClientSession | None = None  # for admin calls, once it runs
        self._launched = 0
        self.live: dict[str, Replica] = {}  # launched and not yet stopped
        self.threads: dict[str, int] = {}  # what each live replica was given
        self._telling: dict[str, asyncio.Task] = {}  # admin calls under way
        self._spawning: dict[str, asyncio.Task] = {}  # launches waiting for room

    @property
    def share(self) -> int | None:
        """Torch threads for each replica that computes now (None: the user's setting)."""
        if not self.cores:
            return None
        computing = [r for r in self.live.values() if r.state in COMPUTING]
        return core_share(len(computing), self.cores)

    def _port_file(self, replica: Replica) -> Path:
        return self.folder / f"{replica.id}.port"

    def log_path(self, replica: Replica) -> Path:
        return self.folder / f"{replica.id}.log"

    def launch(self, replica: Replica) -> None:
        """Start the replica's process once the others compute with their new share."""
        self.live[replica.id] = replica
        overrides = self.overrides(replica)
        threads = self.share
        if threads:
            overrides.append(f"model.torch_threads={threads}")
            self.threads[replica.id] = threads
        command = server_command("rag.serve", overrides, self.host, self._port_file(replica))
        env = replica_env(
            self._launched, self.gpus, threads, self.mps_thread_percentage, self.token
        )
        self._launched += 1
        task = asyncio.get_running_loop().create_task(self._spawn(replica, command, env))
        self._spawning[replica.id] = task
        task.add_done_callback(lambda _: self._spawning.pop(replica.id, None))

    async def _spawn(self, replica: Replica, command: list[str], env: dict[str, str]) -> None:
        await self.make_room()
        replica.handle = spawn(command, self.log_path(replica), env, before_exec=die_with_parent)
        replica.pid = replica.handle.pid

    async def make_room(self) -> None:
        """Tell the serving replicas their share now and wait until they use it."""
        self.share_cores()
        await asyncio.gather(*self._telling.values(), return_exceptions=True)

    def address(self, replica: Replica) -> str | None:
        port = read_port(self._port_file(replica))
        return f"http://{self.host}:{port}" if port else None

    def expected_host(self, replica: Replica) -> str | None:
        return self.host

    def exited(self, replica: Replica) -> str | None:
        if replica.handle is None:
            return None  # waiting for room to start in (bounded by the start deadline)
        code = replica.handle.poll()
        if code is None:
            return None
        tail = log_tail(self.log_path(replica), 5).replace("\n", " | ")
        return f"process exited with code {code}: {tail}"

    async def stop(self, replica: Replica) -> None:
        self.live.pop(replica.id, None)
        self.threads.pop(replica.id, None)
        if (waiting := self._spawning.get(replica.id)) is not None:
            waiting.cancel()
        if replica.handle is not None:
            await asyncio.to_thread(stop_group, replica.handle, STOP_TIMEOUT_S)

    def share_cores(self) -> None:
        """Tell every serving replica whose threads differ from the share now (a replica
        still loading took its share at launch and is told once it is ready)."""
        threads = self.share
        if threads is None or self.session is None:
            return
        for replica in self.live.values():
            serving = replica.state in (State.READY, State.DRAINING)
            if (
                serving
                and self.threads.get(replica.id) != threads
                and replica.id not in self._telling
            ):
                task = asyncio.get_running_loop().create_task(self._tell(replica, threads))
                self._telling[replica.id] = task

    async def _tell(self, replica: Replica, threads: int) -> None:
        assert self.session is not None
        try:
            await admin.set_threads(self.session, replica.url, threads, self.token, ADMIN_TIMEOUT_S)
            if replica.id in self.live:
                self.threads[replica.id] = threads
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            log.warning("replica %s: setting %d threads failed: %s", replica.id, threads, exc)
        finally:
            del self._telling[replica.id]
