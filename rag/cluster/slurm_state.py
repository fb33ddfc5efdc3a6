"""What SLURM says about jobs and partitions, read one way for every launcher (the sweep's
array jobs and the scaling variant's replica jobs).

A queued job's state comes from one `squeue` call for all jobs, which also says why a
pending one waits; a job that has left the queue gets its final state from submitit's own
watcher (one `sacct` call for every job it knows).  Without accounting, where `sacct`
cannot answer, such a job has ENDED and how is not known.

A pending job's reason says whether waiting can start it.  Some never clear: the job asks
for more than the partition's nodes have or its limits allow (`PartitionConfig`,
`PartitionNodeLimit`, `PartitionTimeLimit`, a QOS's or association's per-job or per-node
maximum or minimum), names a constraint no node has, an account or QOS it may not use, or
depends on a job that failed.  Others clear with time (`Resources`, `Priority`, per-user
and group limits, held jobs, nodes down or reserved: `ReqNodeNotAvail`).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                   "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "ENDED"})  # fmt: skip
NEVER_CLEARS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                          "BadConstraints", "InvalidAccount", "InvalidQOS", "AccountNotAllowed",
                          "QOSNotAllowed", "DependencyNeverSatisfied"})  # fmt: skip
# A QOS's or association's limit on one job (or one node of it): e.g. QOSMaxCpuPerJobLimit,
# AssocMaxGRESPerJob, QOSMaxMemoryPerNode, QOSMinGRES.  Per-user and group limits clear.
LIMIT_ON_ONE_JOB = re.compile(r"^(QOS|Assoc)Max\w*Per(Job|Node)|^QOSMin")
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's: PENDING, RUNNING, COMPLETED, CANCELLED, ...; ENDED when not known how
    reason: str = ""  # why a pending job waits, as squeue says it

    @property
    def ended(self) -> bool:
        """sacct says e.g. 'CANCELLED by 0'."""
        return self.state.split(" ")[0] in ENDED

    @property
    def never_starts(self) -> bool:
        """Pending for a reason that waiting cannot clear."""
        return self.state == "PENDING" and cannot_clear(self.reason)

    def describe(self) -> str:
        return f"{self.state.lower()} ({self.reason})" if self.reason else self.state.lower()


def cannot_clear(reason: str) -> bool:
    """Whether a pending job's reason is one no amount of waiting clears."""
    code = reason.split(",")[0].strip()  # "ReqNodeNotAvail, UnavailableNodes:n1" -> code
    return code in NEVER_CLEARS or bool(LIMIT_ON_ONE_JOB.match(code))


def read_states(jobs: Sequence[Any]) -> dict[str, JobState]:
    """The state of each submitit job, by job id: for the queued ones from one squeue call,
    for the others from submitit's watcher.  Empty when SLURM did not answer this time."""
    if not jobs:
        return {}
    queued = _squeue([job.job_id for job in jobs])
    if queued is None:
        return {}
    gone = [job for job in jobs if job.job_id not in queued]
    if gone:
        gone[0].get_info(mode="force")  # one sacct call refreshes every job the watcher knows
    for job in gone:
        queued[job.job_id] = JobState(job.get_info(mode="cache").get("State") or "ENDED")
    return queued


def _squeue(job_ids: list[str]) -> dict[str, JobState] | None:
    """The jobs among `job_ids` still in the queue, None when squeue failed."""
    listed = run(["squeue", "--noheader", "--array", "--format=%i|%T|%r",
                  f"--jobs={','.join(job_ids)}"])  # fmt: skip
    if listed is None:
        return None
    states = {}
    for line in listed.splitlines():
        fields = line.split("|", 2)
        if len(fields) == 3:
            job_id, state, reason = fields
            states[job_id] = JobState(state, "" if reason == "None" else reason)
    return states


@dataclass(frozen=True)
class NodeShape:
    """What one kind of node in a partition has (sinfo groups identical nodes)."""

    cpus: int
    memory_mb: int
    gres: str  # e.g. gpu:a6000:1; "" for none
    time_limit: str  # the partition's, as sinfo writes it (e.g. 2-00:00:00, infinite)
    count: int

    def describe(self) -> str:
        gres = f", gres {self.gres}" if self.gres else ", no gres"
        return (f"{self.count} node(s) of {self.cpus} CPUs, {self.memory_mb // 1024} GB{gres},"
                f" time limit {self.time_limit}")  # fmt: skip


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[NodeShape, ...]

    @property
    def max_cpus(self) -> int:
        return max(n.cpus for n in self.nodes)

    @property
    def max_memory_gb(self) -> int:
        return max(n.memory_mb for n in self.nodes) // 1024

    def describe(self) -> str:
        return f"partition {self.name} has " + "; ".join(n.describe() for n in self.nodes)


def read_partition(name: str | None) -> Partition | None:
    """The nodes of partition `name` (the cluster's default when None), or None when sinfo
    cannot tell."""
    command = ["sinfo", "--noheader", "--format=%P|%c|%m|%G|%l|%D"]
    listed = run([*command, f"--partition={name}"] if name else command)
    if listed is None:
        return None
    found: dict[str, list[NodeShape]] = {}
    default = None
    for line in listed.splitlines():
        fields = line.split("|")
        if len(fields) != 6:
            continue
        partition, cpus, memory, gres, limit, count = fields
        if partition.endswith("*"):
            partition = default = partition[:-1]
        try:
            shape = NodeShape(int(cpus.rstrip("+")), int(memory.rstrip("+")),
                              "" if gres == "(null)" else gres, limit, int(count))  # fmt: skip
        except ValueError:
            continue
        found.setdefault(partition, []).append(shape)
    chosen = name or default
    if chosen not in found:
        return None
    return Partition(chosen, tuple(found[chosen]))


def run(command: list[str]) -> str | None:
    """stdout of a SLURM command, or None when it failed or took over TIMEOUT_S.  squeue's
    'Invalid job id' (every job named has left the queue, on older SLURM) is an empty list."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode == 0:
        return done.stdout
    return "" if "Invalid job id" in done.stderr else None
