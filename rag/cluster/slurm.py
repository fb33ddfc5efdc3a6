"""Replicas as SLURM jobs, submitted with submitit, one GPU each.

A job runs `serve_replica`: it starts `python -m rag.serve <replica overrides>` on its node,
waits for the port, and registers `http://<node>:<port>` with the balancer (with the
balancer's token); from then on the balancer's health checks
decide when it is ready.  SIGTERM (scancel, scale-down) is passed to the server, which
drains; a job whose balancer has been unreachable for half a minute (killed before it
could cancel its jobs) stops itself, so no replica outlives its balancer.  The launcher
reads its jobs' states every few seconds (`rag.cluster.slurm_state`, as the sweep's SLURM
launcher does), so a job that was cancelled or died before it registered is noticed too,
as is one that can never start (it asks for more than the partition's nodes have): that
replica is dead at once, with SLURM's reason, instead of at its start deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rag.cluster.admin import TOKEN_ENV, TOKEN_HEADER
from rag.cluster.balancer import is_loopback
from rag.cluster.pool import Replica
from rag.cluster.process import (
    die_with_parent,
    http_get,
    log_tail,
    read_port,
    server_command,
    spawn,
    stop_group,
)
from rag.cluster.slurm_state import JobState, read_states
from rag.config import SlurmReplicaConfig
from rag.storage import scratch_folder

log = logging.getLogger("rag.cluster")

POLL_S = 2.0  # how often the jobs' states are read
STOP_TIMEOUT_S = 30.0
BALANCER_CHECK_S = 5.0
ORPHAN_AFTER_S = 30.0


def serve_replica(
    overrides: list[str],
    balancer: str,
    replica_id: str,
    token: str,
    log_path: str,
    start_timeout_s: float,
) -> int:
    """The job: serve one replica on this node and tell the balancer where it listens."""
    on_loopback = is_loopback(balancer.split("//", 1)[1].rsplit(":", 1)[0].strip("[]"))
    host = "127.0.0.1" if on_loopback else "0.0.0.0"
    with scratch_folder("replica") as folder:
        port_file = Path(folder) / "port"
        command = server_command("rag.serve", overrides, host, port_file)
        env = {TOKEN_ENV: token}  # for the balancer's admin calls
        process = spawn(command, Path(log_path), env, before_exec=die_with_parent)
        signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
        deadline = time.monotonic() + start_timeout_s
        while (port := read_port(port_file)) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_group(process, STOP_TIMEOUT_S)
                print(log_tail(Path(log_path)), file=sys.stderr)
                return 1
            time.sleep(0.1)
        address = "127.0.0.1" if on_loopback else socket.getfqdn()
        request = urllib.request.Request(
            f"{balancer}/register",
            data=json.dumps({"replica": replica_id, "url": f"http://{address}:{port}"}).encode(),
            headers={"Content-Type": "application/json", TOKEN_HEADER: token},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            print(f"registered with {balancer}: {response.read().decode()}", flush=True)
        return _serve_while_balancer_lives(process, balancer)


def _serve_while_balancer_lives(process: subprocess.Popen, balancer: str) -> int:
    """Wait for the server; stop it if the balancer has been gone for ORPHAN_AFTER_S (it
    was killed before it could cancel this job), so no replica outlives its balancer."""
    last_seen = time.monotonic()
    while process.poll() is None:
        time.sleep(BALANCER_CHECK_S)
        if http_get(f"{balancer}/ping", timeout_s=5)[0] == 200:
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen > ORPHAN_AFTER_S:
            print(f"balancer {balancer} gone for {ORPHAN_AFTER_S:g} s; stopping", flush=True)
            return stop_group(process, STOP_TIMEOUT_S)
    return process.returncode


class SlurmLauncher:
    def __init__(
        self,
        overrides: Callable[[Replica], list[str]],
        run_dir: Path,
        cfg: SlurmReplicaConfig,
        balancer: Callable[[], str],
        token: str,
        start_timeout_s: float,
    ) -> None:
        """`balancer()`: the URL replicas register with (known once it listens)."""
        import submitit

        self.overrides = overrides
        self.folder = run_dir / "replicas"
        self.balancer = balancer
        self.token = token
        self.start_timeout_s = start_timeout_s
        self.executor = submitit.AutoExecutor(folder=run_dir / "slurm", cluster="slurm")
        options: dict[str, Any] = {
            "cpus_per_task": cfg.cpus_per_task,
            "mem_gb": cfg.mem_gb,
            "timeout_min": cfg.time_min,
            "name": "ragbench-replica",
        }
        for key in ("gres", "partition", "account", "qos"):
            if value := getattr(cfg, key):
                options[f"slurm_{key}"] = value
        if cfg.setup:
            options["slurm_setup"] = list(cfg.setup)
        self.executor.update_parameters(**options)
        self.jobs: dict[str, Any] = {}  # job id -> submitit job
        self.states: dict[str, JobState] = {}  # job id -> its state, read every POLL_S
        self._watcher: asyncio.Task | None = None
        self._submissions: dict[str, asyncio.Task] = {}  # replica id -> its sbatch call

    def launch(self, replica: Replica) -> None:
        """Submit off the event loop (sbatch takes a while); the job id comes later."""
        loop = asyncio.get_running_loop()
        if self._watcher is None:
            self._watcher = loop.create_task(self._watch())
        self._submissions[replica.id] = loop.create_task(self._submit(replica))

    async def _submit(self, replica: Replica) -> None:
        log_path = self.folder / f"{replica.id}.log"
        self.folder.mkdir(parents=True, exist_ok=True)
        args = (self.overrides(replica), self.balancer(), replica.id, self.token,
                str(log_path), self.start_timeout_s)  # fmt: skip
        try:
            job = await asyncio.to_thread(self.executor.submit, serve_replica, *args)
        except Exception as exc:  # sbatch refused: the replica is dead on arrival
            replica.reason = f"submission failed: {exc}"
            return
        replica.handle = job
        replica.job_id = str(job.job_id)
        self.jobs[replica.job_id] = job
        log.info("replica %s is SLURM job %s", replica.id, replica.job_id)

    def address(self, replica: Replica) -> str | None:
        return None  # the job registers its address itself

    def expected_host(self, replica: Replica) -> str | None:
        return None  # a job's node is not known here: its token vouches for it

    def exited(self, replica: Replica) -> str | None:
        if replica.handle is None:
            return replica.reason or None  # a failed submission; else not submitted yet
        state = self.states.get(replica.job_id)
        if state and state.ended:
            return f"SLURM job {replica.job_id} ended: {state.state}"
        if state and state.never_starts:
            return f"SLURM job {replica.job_id} cannot start: {state.reason}"
        return None

    async def stop(self, replica: Replica) -> None:
        """scancel (SIGTERM: the replica drains), then wait for the job to end, bounded."""
        await self._submissions[replica.id]  # a job being submitted is cancelled once it is
        if replica.handle is None:
            return
        await asyncio.to_thread(replica.handle.cancel, check=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and not self.exited(replica):
            await asyncio.sleep(POLL_S / 2)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            unended = [job for i, job in self.jobs.items() if not self._ended(i)]
            if unended:  # nothing known when SLURM does not answer: the health checks go on
                self.states.update(await asyncio.to_thread(read_states, unended))

    def _ended(self, job_id: str) -> bool:
        state = self.states.get(job_id)
        return state is not None and state.ended
