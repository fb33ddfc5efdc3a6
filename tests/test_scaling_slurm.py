"""Replicas as real SLURM jobs on the local one-node cluster (`slurm/local-cluster.sh up`):
submitted with submitit, each asking for one GPU (the cluster's one fake A6000, so one job
runs at a time), registering with the balancer; one cancelled with scancel is noticed and
replaced, and jobs that can never start fail the variant at once.  Skipped when no cluster
is up; run inside `flock /tmp/ragbench-slurm.lock` with `slurm/local-cluster.sh up` (as
.ci/run does)."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from cluster_helpers import decided, decisions, load_until, ready, replicas, wait_for

from rag.cluster.process import ServerFailed, ServerProcess
from rag.cluster.slurm_state import read_partition
from rag.loadgen import LoadConfig

pytestmark = pytest.mark.slurm


def slurm_is_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "UP" in ping.stdout


@pytest.fixture
def cluster() -> None:
    if not slurm_is_up():
        pytest.skip("no SLURM controller answers (start one: slurm/local-cluster.sh up)")


def job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                         capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    return out.strip()


def test_replicas_run_as_slurm_jobs_and_a_cancelled_one_is_replaced(
    cluster, cache_overrides, tmp_path
):
    server = ServerProcess(
        [
            "variant=scaling", "model=simulated", *cache_overrides, f"run_dir={tmp_path}",
            "variant.scaling.launcher=slurm", "variant.scaling.slurm.cpus_per_task=1",
            "variant.scaling.slurm.mem_gb=1", "variant.scaling.slurm.time_min=10",
            "variant.scaling.slurm.gres=gpu:a6000:1", "variant.scaling.health_interval_s=0.5",
        ],
        ready_timeout_s=180,
    )  # fmt: skip
    server.start()  # returns once the first replica job has registered and is ready
    jobs = []
    try:
        (first,) = ready(server.url)
        jobs.append(first["job_id"])
        answer = httpx.post(f"{server.url}/rag", json={"query": "hover?"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["replica"] == first["id"]
        subprocess.run(["scancel", first["job_id"]], check=True, timeout=30)
        wait_for(lambda: {r["id"]: r for r in replicas(server.url)}[first["id"]]["state"] == "dead",
                 60, "the cancelled replica taken out")  # fmt: skip
        wait_for(lambda: [r["id"] for r in ready(server.url)] not in ([], [first["id"]]), 180,
                 "a replacement job ready")  # fmt: skip
        (second,) = ready(server.url)
        jobs.append(second["job_id"])
        assert second["job_id"] not in ("", first["job_id"])
        answer = httpx.post(f"{server.url}/rag", json={"query": "hover?"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["replica"] == second["id"]
    finally:
        server.stop(timeout_s=90)
    # Stopping the balancer cancels every job it started, within a bound.
    wait_for(lambda: all(job_state(j) and "RUNNING" not in job_state(j) and
                         "PENDING" not in job_state(j) for j in jobs),
             60, "every replica job ended")  # fmt: skip


def test_replica_jobs_that_can_never_start_fail_the_variant_at_once(
    cluster, cache_overrides, tmp_path
):
    """Not at each replica's start deadline: SLURM's reason marks each job dead as soon as
    it is read, and after three the variant gives up, quoting it."""
    partition = read_partition(None)
    assert partition is not None
    server = ServerProcess(
        [
            "variant=scaling", "model=simulated", *cache_overrides, f"run_dir={tmp_path}",
            "variant.scaling.launcher=slurm", "variant.scaling.slurm.mem_gb=1",
            f"variant.scaling.slurm.cpus_per_task={partition.max_cpus + 64}",
            "variant.scaling.slurm.gres=gpu:a6000:1", "variant.scaling.replica_start_timeout_s=600",
        ],
        ready_timeout_s=300,
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ServerFailed) as failed:
        server.start()
    assert time.monotonic() - started < 60
    message = str(failed.value)
    assert "3 replicas died before any became ready" in message
    assert "cannot start: PartitionConfig" in message
    assert not subprocess.run(["squeue", "-h", "-n", "ragbench-replica"], capture_output=True,
                              text=True, timeout=30).stdout.strip()  # fmt: skip


def test_a_replica_job_is_judged_on_its_own_rate(cluster, cache_overrides, tmp_path):
    """A load one replica cannot carry brings a second job; once it has served a window
    with the queue still growing, its own rate (the answers it gave) is set against the
    first one's (a job has an allocation of its own, so the pool's total is not what it is
    judged by)."""
    server = ServerProcess(
        [
            "variant=scaling", "model=simulated", *cache_overrides, f"run_dir={tmp_path}",
            "variant.scaling.launcher=slurm", "variant.scaling.slurm.gres=",
            "variant.scaling.slurm.cpus_per_task=1", "variant.scaling.slurm.mem_gb=1",
            "variant.scaling.slurm.time_min=10", "variant.scaling.health_interval_s=0.5",
            "variant.scaling.max_replicas=2", "variant.scaling.target_ongoing_requests=2",
            "variant.scaling.check_interval_s=0.5", "variant.scaling.gain_settle_s=1",
            "variant.scaling.gain_window_s=3", "variant.max_batch_size=4",
            "model.simulated.generate_fixed_ms=200", "model.simulated.generate_per_query_ms=0",
        ],
        ready_timeout_s=180,
    )  # fmt: skip
    server.start()
    # Each replica serves 20/s, so 60/s outgrows two of them however busy the machine is.
    log = tmp_path / "autoscaler.csv"
    try:
        overload = LoadConfig(target=server.url, timing_mode="poisson", rps=60, duration=180,
                              num_requests=0, timeout=120, stop_grace=120,
                              progress=False)  # fmt: skip

        def judged() -> list[dict]:
            return [r for r in decisions(log) if r["verdict"] in ("gain", "no gain")]

        load_until(overload, lambda: bool(judged()), 180, decided(log, "r1 judged"))
    finally:
        server.stop(timeout_s=90)
    (verdict,) = judged()
    assert verdict["verdict"] == "gain", verdict["reason"]
    assert "r1 serves" in verdict["reason"] and "/s on its own, one replica" in verdict["reason"]
    assert verdict["replicas_after"] == "2"  # kept: it adds its own allocation's worth
