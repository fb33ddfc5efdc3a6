"""Scratch folders outlive no process: each sits in the user's runtime folder under its
owner's PID, and what a SIGKILLed balancer or sweep left there is removed by the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from cluster_helpers import alive, replicas, wait_for
from sweep_helpers import REPO

from rag.storage import owner_pid, runtime_root, scratch_folder


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runtime folder of the test's own, for this process and every one it starts."""
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    assert runtime_root() == folder / "ragbench"  # platformdirs accepted it
    return folder / "ragbench"


def entries(root: Path, kind: str) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith(f"{kind}-"))


def test_a_scratch_folder_removes_those_whose_process_is_gone(runtime: Path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        orphan = runtime / f"server-{gone.pid}-x1"
        kept = runtime / f"server-{living.pid}-x2"
        unrelated = runtime / "notes"
        for folder in (orphan, kept, unrelated):
            folder.mkdir()
            (folder / "port").write_text("8000\n")
        with scratch_folder("server") as mine:
            assert owner_pid(Path(mine).name) == os.getpid()
            assert not orphan.exists()
            assert kept.is_dir() and unrelated.is_dir()
        assert not Path(mine).exists()
    finally:
        living.kill()
        living.wait()


def test_a_sigkilled_balancer_leaves_its_run_folder_to_the_next_start(start_server, runtime: Path):
    """Started without run_dir, the scaling variant keeps its run in a scratch folder."""
    first = start_server("variant=scaling", model="simulated")
    assert first.process is not None
    (left,) = entries(runtime, "scaling")
    assert owner_pid(left.name) == first.process.pid
    assert (left / "autoscaler.csv").is_file()
    replica_pids = [r["pid"] for r in replicas(first.url)]
    first.process.kill()  # SIGKILL: no chance to clean up
    first.process.wait()
    assert left.is_dir()
    wait_for(lambda: not any(alive(pid) for pid in replica_pids), 30, "its replicas stopped")

    second = start_server("variant=scaling", model="simulated")
    assert second.process is not None
    assert not left.exists()
    (current,) = entries(runtime, "scaling")
    assert owner_pid(current.name) == second.process.pid
    second.stop()
    assert entries(runtime, "scaling") == []


def test_a_sigkilled_sweep_leaves_its_server_folder_to_the_next_start(
    start_server, runtime: Path, tmp_path: Path, cache_overrides: list[str]
):
    sweep = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "sweep.py"), "-m", "variant=base",
         "model=tiny", "rps=1", "duration=600", "tag=killed", *cache_overrides],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: any(owner_pid(p.name) == sweep.pid for p in entries(runtime, "server")),
                 120, "the sweep's server started")  # fmt: skip
        (left,) = entries(runtime, "server")
        servers = psutil.Process(sweep.pid).children(recursive=True)
        wait_for(lambda: (left / "port").is_file(), 120, "the server listening")
    finally:
        sweep.kill()  # SIGKILL: no chance to clean up
        sweep.wait()
    assert left.is_dir()
    wait_for(lambda: not any(alive(s.pid) for s in servers), 60, "the server stopped itself")

    start_server()
    assert not left.exists()
