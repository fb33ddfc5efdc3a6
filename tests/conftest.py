"""Shared fixtures: hermetic cache folders and real server processes on loopback."""

from __future__ import annotations

import os

# Tests never reach beyond 127.0.0.1: a hub id must fail at once, not after retries.  Set
# before anything imports huggingface_hub (it reads these once) and inherited by servers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Under pytest-xdist more processes compute than there are cores: a torch op split over
# every core then waits at its barriers for threads that another process has preempted,
# spinning meanwhile.  One compute thread per process (workers and the servers they start)
# unless the caller chose; tests of the thread settings set theirs explicitly.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from xdist.scheduler import LoadFileScheduling

from rag.cluster.process import ServerProcess


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model and embedding cache for the whole session, never the user's own, shared
    by the xdist workers (the cache is built once under a file lock, published whole)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "ragbench-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("ragbench-cache")


@pytest.fixture(scope="session")
def cache_overrides(cache_dir: Path) -> list[str]:
    return [f"model.cache_dir={cache_dir}", f"corpus.cache_dir={cache_dir}"]


@pytest.fixture
def start_server(
    cache_overrides: list[str], tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """Start `python -m rag.serve` with overrides (tiny models unless told otherwise);
    every server started is stopped when the test ends."""
    servers: list[ServerProcess] = []

    def start(*overrides: str, model: str = "tiny", ready_timeout_s: float = 120) -> ServerProcess:
        server = ServerProcess(
            [f"model={model}", *cache_overrides, *overrides],
            ready_timeout_s=ready_timeout_s,
            log_path=tmp_path / f"server-{len(servers)}.log",
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# Shared servers a worker keeps running at most: each holds its models and its engine's
# memory (about half a GB); the three one-server variants fit.
SHARED_SERVERS_KEPT = 3


@pytest.fixture(scope="session")
def shared_server(
    cache_overrides: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerProcess]]:
    """A running server of the variant and overrides (tiny models), started on first use
    and shared by every test of this worker that asks for the same.  Only for tests
    that read from a server: one that changes its state, counts its stats from zero or
    stops it starts its own (`start_server`).  The least recently used is stopped when one
    more is asked for than are kept."""
    servers: OrderedDict[tuple[str, ...], ServerProcess] = OrderedDict()
    folder = tmp_path_factory.mktemp("shared-servers")

    def get(*overrides: str, variant: str = "batched") -> ServerProcess:
        key = (f"variant={variant}", *overrides)
        if key not in servers:
            if len(servers) == SHARED_SERVERS_KEPT:
                servers.popitem(last=False)[1].stop()
            log_path = folder / f"server-{len(list(folder.iterdir()))}.log"
            servers[key] = ServerProcess(
                ["model=tiny", *cache_overrides, *key], log_path=log_path
            ).start()
        servers.move_to_end(key)
        return servers[key]

    yield get
    for server in servers.values():
        server.stop()


@pytest.fixture
def default_server(shared_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The default configuration's server (tiny models), shared: for tests that only read."""
    return shared_server()


def slurm_cluster_up() -> bool:
    """A SLURM controller answers here (slurm/local-cluster.sh up starts one)."""
    if not shutil.which("scontrol"):
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout


def cuda_visible() -> bool:
    import torch  # here only: most test modules never need it

    return torch.cuda.is_available()


# The files that use the one SLURM cluster: one worker runs them all, one after another
# (`SlurmFilesTogether`), so no worker sits idle waiting for another's turn on the cluster.
SLURM_FILES = ["test_slurm.py", "test_scaling_slurm.py", "test_slurm_state.py"]

# The test files that take longest, longest first (`pytest --durations=0` summed per file).
# `make test` hands whole files to its workers in collection order: starting these first
# leaves the short files to fill in at the end, so the workers finish together.
LONGEST_FILES = [
    *SLURM_FILES,
    "test_scaling.py",
    "test_sweep.py",
    "test_serve.py",
    "test_streaming.py",
    "test_hardening.py",
    "test_gpu_check.py",
    "test_pipeline.py",
    "test_continuous.py",
    "test_models.py",
    "test_scaling_streams.py",
    "test_loadgen_serve.py",
    "test_openai_api.py",
    "test_engine.py",
    "test_edges.py",
]


def longest_files_first(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    longest_files_first(items)
    marked = [item for item in items if item.get_closest_marker("slurm")]
    if marked and not slurm_cluster_up():
        skip = pytest.mark.skip(
            reason="no SLURM cluster up: run the suite inside `flock /tmp/ragbench-slurm.lock"
            " bash -c 'slurm/local-cluster.sh up; make test; slurm/local-cluster.sh down'`"
            " (as root), as .ci/run does"
        )
        for item in marked:
            item.add_marker(skip)
    on_gpu = [item for item in items if item.get_closest_marker("cuda")]
    if on_gpu and not cuda_visible():
        skip = pytest.mark.skip(reason="no CUDA GPU visible: bench/gpu_check.sh runs these on one")
        for item in on_gpu:
            item.add_marker(skip)


class SlurmFilesTogether(LoadFileScheduling):
    """`--dist loadfile`, except that the SLURM files make one scope: on separate workers
    their tests would take turns on the cluster, each worker waiting idle for the other."""

    def _split_scope(self, nodeid: str) -> str:
        file = super()._split_scope(nodeid)
        return "slurm" if Path(file).name in SLURM_FILES else file


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadFileScheduling | None:
    return SlurmFilesTogether(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.fixture(autouse=True)
def one_slurm_test_at_a_time(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under a pytest-xdist mode other than `make test`'s, SLURM tests may run on several
    workers at once; they share one one-node cluster of two CPUs, so they take turns
    rather than wait behind each other's jobs."""
    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    with FileLock(tmp_path_factory.getbasetemp().parent / "slurm-tests.lock"):
        yield
