"""The sweep on a real SLURM cluster (slurm/local-cluster.sh up): bench.sbatch runs a
sweep in one allocation, the SLURM launcher runs points as an array job on the (fake)
A6000 gres, with its default resources fitted to the node, a cancelled point or one that
can never start becomes failure.json while the sweep finishes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from sweep_helpers import REPO, SMALL, leftovers, points, sweep

from rag.cluster.slurm_state import read_partition
from rag.harness.report import aggregate

pytestmark = pytest.mark.slurm
SLURM_LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
                  "hydra.launcher.poll_s=1", "hydra.launcher.wait_timeout_min=5"]  # fmt: skip
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sacct(job_id: str, field: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", field],
                         capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    return out.split("\n")[0].strip()


def job_state(job_id: str) -> str:
    return sacct(job_id, "State").split(" ")[0]


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every_s)
    raise AssertionError(f"{what} not within {timeout_s:g} s")


def test_bench_sbatch_runs_a_sweep_in_one_allocation(tmp_path: Path, cache_overrides: list[str]):
    outputs = tmp_path / "outputs"
    job = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "slurm/bench.sbatch",
         "variant=base,batched", "tag=sb", f"hydra.sweep.dir={outputs}/sb", *SMALL,
         *cache_overrides],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "RAGBENCH_PYTHON": sys.executable},
    ).stdout.strip()  # fmt: skip
    state = wait_until(lambda: job_state(job) in TERMINAL and job_state(job), 180, "the job")
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    folders = points(tmp_path, "sb")
    assert len(folders) == 2
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["slurm_job_id"] == job
        assert meta["cuda_visible_devices"] == "0"  # the allocation's (fake) A6000
    table = aggregate(outputs, tmp_path / "results", ["sb"])
    assert (table["outcome"] == "ok").all() and len(table) == 2
    assert (tmp_path / "results" / "report.html").exists()


def test_slurm_launcher_runs_points_as_an_array(tmp_path: Path, cache_overrides: list[str]):
    result = sweep(tmp_path, *SLURM_LAUNCHER, "variant=base,batched", "tag=arr", *SMALL,
                   *cache_overrides, timeout=300)  # fmt: skip
    assert "2/2 points finished (0 failed)" in result.stdout + result.stderr
    ids = []
    for folder in points(tmp_path, "arr"):
        assert pd.read_csv(folder / "summary.csv").iloc[0]["ok"] == 12
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["cuda_visible_devices"] == "0"  # gres gpu:a6000:1 by default
        ids.append(meta["slurm_job_id"])
    array_ids = {i.split("_")[0] for i in ids}
    assert len(array_ids) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1"], ids
    # The jobs' processes are SLURM's, not the sweep's children: they may still be exiting
    # when the sweep has read their results, and must be gone soon after.
    wait_until(lambda: not leftovers(tmp_path), 30, "every process of the sweep gone")


def test_a_cancelled_point_becomes_failure_json_and_the_sweep_finishes(
    tmp_path: Path, cache_overrides: list[str]
):
    overrides = [*SLURM_LAUNCHER, "hydra.launcher.gres=null", "variant=base", "rps=2",
                 "duration=4,600", "model=tiny", "tag=cx", *cache_overrides]  # fmt: skip
    sweep_run = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "sweep.py"), "-m", *overrides],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        long_point = wait_until(
            lambda: next((p for p in (tmp_path / "outputs" / "cx").glob("*duration-600*")
                          if (p / "server.log").exists()), None),
            120, "the long point's server",
        )  # fmt: skip
        time.sleep(2)  # well into its run
        squeue = ["squeue", "-h", "-t", "RUNNING", "-o", "%i"]
        queue = subprocess.run(squeue, capture_output=True, text=True, timeout=30).stdout.split()
        running = [job for job in queue if job.endswith("_1")]  # the array's second point
        assert running, queue
        subprocess.run(["scancel", running[0]], check=True, timeout=30)
        output, _ = sweep_run.communicate(timeout=90)
    finally:
        if sweep_run.poll() is None:
            sweep_run.kill()
            sweep_run.wait()
            subprocess.run(["scancel", "--name=ragbench-cx"], timeout=30)
    assert sweep_run.returncode == 0, output[-3000:]
    failure = json.loads((long_point / "failure.json").read_text())
    assert "SIGTERM" in failure["reason"] or "CANCELLED" in failure["reason"], failure
    assert not (long_point / "summary.csv").exists()
    (short_point,) = [p for p in points(tmp_path, "cx") if p != long_point]
    assert (short_point / "summary.csv").exists()
    wait_until(lambda: not leftovers(tmp_path), 30, "every process of the sweep gone")


def test_the_launchers_defaults_fit_the_one_node_cluster(
    tmp_path: Path, cache_overrides: list[str]
):
    """The example of slurm/README.md as written: no resources named, so each job asks
    for the defaults lowered to what the node has; the second job waits for the node's
    one GPU, and the progress line says so."""
    partition = read_partition(None)
    assert partition is not None
    result = sweep(tmp_path, "hydra/launcher=slurm", "variant=base", "rps=2,3", "model=tiny",
                   "num_requests=8", *cache_overrides, timeout=600)  # fmt: skip
    output = result.stdout + result.stderr
    assert "2/2 points finished (0 failed)" in output, output[-3000:]
    assert re.search(r"1 pending \((Resources|Priority)\)", output), output[-3000:]
    if partition.max_cpus < 4:
        assert f"cpus_per_task: 4 by default, but partition {partition.name} has" in output
    for folder in points(tmp_path, "default"):
        assert pd.read_csv(folder / "summary.csv").iloc[0]["ok"] == 8
        job = json.loads((folder / "meta.json").read_text())["slurm_job_id"]
        assert sacct(job, "ReqCPUS") == str(min(4, partition.max_cpus))


def test_a_job_that_can_never_start_becomes_failure_json_at_once(
    tmp_path: Path, cache_overrides: list[str]
):
    partition = read_partition(None)
    assert partition is not None
    cpus = max(64, partition.max_cpus + 1)
    started = time.monotonic()
    result = sweep(tmp_path, "hydra/launcher=slurm", f"hydra.launcher.cpus_per_task={cpus}",
                   "variant=base", "rps=2,3", "model=tiny", "num_requests=8", "tag=never",
                   *cache_overrides, timeout=120)  # fmt: skip
    assert time.monotonic() - started < 30
    assert "2/2 points finished (2 failed)" in result.stdout + result.stderr
    for folder in points(tmp_path, "never"):
        failure = json.loads((folder / "failure.json").read_text())
        assert "cannot start: PartitionConfig; cancelled" in failure["reason"], failure
        assert f"asked for {cpus} CPUs" in failure["reason"]
        assert (
            f"partition {partition.name} has 1 node(s) of {partition.max_cpus} CPUs"
            in (failure["reason"])
        )
        assert failure["asked"]["cpus_per_task"] == cpus
        array = failure["slurm_job_id"].split("_")[0]  # cancelled before it was split
        wait_until(lambda a=array: job_state(a) == "CANCELLED", 30, f"array {array} cancelled")


def test_a_request_sbatch_refuses_fails_every_point(tmp_path: Path, cache_overrides: list[str]):
    result = sweep(tmp_path, "hydra/launcher=slurm", "hydra.launcher.mem_gb=100000",
                   "variant=base", "rps=2,3", "model=tiny", "tag=refused", *cache_overrides,
                   timeout=120)  # fmt: skip
    assert "sbatch refused the jobs" in result.stdout + result.stderr
    folders = points(tmp_path, "refused")
    assert len(folders) == 2
    for folder in folders:
        failure = json.loads((folder / "failure.json").read_text())
        assert failure["reason"].startswith("sbatch refused the jobs: sbatch: error:"), failure
        assert "asked for" in failure["reason"] and failure["slurm_job_id"] is None
