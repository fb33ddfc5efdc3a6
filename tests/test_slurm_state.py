"""The one reader of SLURM job states: which pending reasons never clear, and, on the real
one-node cluster (`slurm/local-cluster.sh up`), what it reads of real jobs: a job that
asks for more CPUs than any node has waits for a reason that never clears, a job that
waits for the node's one GPU for one that does, and a cancelled job's end comes from
submitit's watcher once it has left the queue."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rag.cluster.slurm_state import JobState, cannot_clear, read_partition, read_states


@pytest.mark.parametrize(
    "reason",
    ["PartitionConfig", "PartitionTimeLimit", "BadConstraints", "InvalidQOS",
     "QOSMaxCpuPerJobLimit", "AssocMaxGRESPerJob", "QOSMaxMemoryPerNode", "QOSMinGRES",
     "DependencyNeverSatisfied"],
)  # fmt: skip
def test_reasons_that_waiting_cannot_clear(reason: str):
    assert cannot_clear(reason)
    assert JobState("PENDING", reason).never_starts
    assert not JobState("RUNNING", reason).never_starts


@pytest.mark.parametrize(
    "reason",
    ["Resources", "Priority", "QOSMaxJobsPerUserLimit", "AssocGrpCpuLimit", "JobHeldUser",
     "ReqNodeNotAvail, UnavailableNodes:node1", "BeginTime", "Dependency", ""],
)  # fmt: skip
def test_reasons_that_clear_with_time(reason: str):
    assert not cannot_clear(reason)
    assert not JobState("PENDING", reason).never_starts


def test_ended_states_include_the_ones_sacct_annotates():
    assert JobState("CANCELLED by 0").ended and JobState("ENDED").ended
    assert not JobState("COMPLETING").ended and not JobState("PENDING").ended
    assert JobState("PENDING", "Resources").describe() == "pending (Resources)"


def wait_for_state(job, done, timeout_s: float = 60) -> JobState:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_states([job]).get(job.job_id)
        if state is not None and done(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job.job_id}: not within {timeout_s:g} s (last: {state})")


@pytest.mark.slurm
def test_the_reader_on_real_jobs(tmp_path: Path):
    import submitit

    partition = read_partition(None)
    assert partition is not None and partition.max_cpus >= 1
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_gres="gpu:1")
    holder = executor.submit(time.sleep, 120)  # holds the node's one GPU
    executor.update_parameters(cpus_per_task=1)
    queued = executor.submit(time.sleep, 1)  # waits for it
    executor.update_parameters(cpus_per_task=partition.max_cpus + 64, slurm_gres=None)
    impossible = executor.submit(time.sleep, 1)
    try:
        running = wait_for_state(holder, lambda s: s.state == "RUNNING")
        assert not running.ended and running.reason == ""
        waiting = wait_for_state(queued, lambda s: s.reason not in ("", "None"))
        assert waiting.state == "PENDING" and not waiting.never_starts, waiting
        stuck = wait_for_state(impossible, lambda s: s.never_starts)
        assert stuck.reason == "PartitionConfig"
    finally:
        for job in (holder, queued, impossible):
            job.cancel(check=False)
    ended = wait_for_state(holder, lambda s: s.ended)
    assert ended.state.startswith("CANCELLED"), ended
