"""Replicas as processes on this machine.

Each replica is `python -m rag.serve <replica overrides> port=0` in a process group of its
own, with its output in `<run_dir>/replicas/<id>.log`.  Replicas share the machine's cores:
unless `model.torch_threads` says otherwise, each gets cores / max_replicas threads, so the
largest pool never oversubscribes the CPU (on two cores that means real-model replicas
cannot add throughput; `model=simulated` or a cluster can).  GPUs, when there are several,
are handed out round robin through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from rag.cluster.pool import Replica
from rag.cluster.process import (
    die_with_parent,
    log_tail,
    read_port,
    server_command,
    spawn,
    stop_group,
)

STOP_TIMEOUT_S = 30.0


def default_threads(max_replicas: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // max_replicas)


def visible_gpus(configured: str) -> list[str]:
    """GPU ids to hand out: the configured list, else the parent's CUDA_VISIBLE_DEVICES."""
    source = configured or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g.strip() for g in source.split(",") if g.strip()]


def replica_env(
    index: int, gpus: list[str], threads: int | None, mps_thread_percentage: int
) -> dict[str, str]:
    env: dict[str, str] = {}
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
        threads: int | None,
        gpus: list[str],
        mps_thread_percentage: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        """`overrides(replica)`: the config overrides its `rag.serve` runs with;
        `threads`: its torch threads, or None to leave the user's setting alone."""
        self.overrides = overrides
        self.folder = run_dir / "replicas"
        self.threads = threads
        self.gpus = gpus
        self.mps_thread_percentage = mps_thread_percentage
        self.host = host
        self._launched = 0

    def _port_file(self, replica: Replica) -> Path:
        return self.folder / f"{replica.id}.port"

    def log_path(self, replica: Replica) -> Path:
        return self.folder / f"{replica.id}.log"

    def launch(self, replica: Replica) -> None:
        overrides = self.overrides(replica)
        if self.threads:
            overrides.append(f"model.torch_threads={self.threads}")
        command = server_command("rag.serve", overrides, self.host, self._port_file(replica))
        env = replica_env(self._launched, self.gpus, self.threads, self.mps_thread_percentage)
        self._launched += 1
        replica.handle = spawn(command, self.log_path(replica), env, before_exec=die_with_parent)
        replica.pid = replica.handle.pid

    def address(self, replica: Replica) -> str | None:
        port = read_port(self._port_file(replica))
        return f"http://{self.host}:{port}" if port else None

    def expected_host(self, replica: Replica) -> str | None:
        return self.host

    def exited(self, replica: Replica) -> str | None:
        code = replica.handle.poll()
        if code is None:
            return None
        tail = log_tail(self.log_path(replica), 5).replace("\n", " | ")
        return f"process exited with code {code}: {tail}"

    async def stop(self, replica: Replica) -> None:
        await asyncio.to_thread(stop_group, replica.handle, STOP_TIMEOUT_S)
