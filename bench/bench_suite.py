"""How long does `make test` take?  `make test` itself (pytest-xdist, a file per worker,
the longest files first), timed from its start to its end, with the slowest tests listed.
The SLURM tests run when a cluster is up (`slurm/local-cluster.sh up`, as in CI).

    ragbench-bench .venv/bin/python bench/bench_suite.py [--workers N] [--busy] [--check]

Targets: the whole suite in at most 7 minutes, with no test failed.  `--busy` keeps one
core spinning in another process for the run (the suite must pass on a shared machine;
its time is then not the target's figure).  The record keeps the CPU time the suite used
(its processes and the servers they started): CPU seconds over wall seconds says how much
of the two cores the workers keep busy, the measure behind the worker count.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from record import BenchRecord, add_check_option

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 7 * 60
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?)")


def make_test(workers: int | None) -> subprocess.CompletedProcess:
    """`make test` (with `workers` in place of the Makefile's count), the slowest 15 listed."""
    command = ["make", "-s", "test", *([f"TEST_WORKERS={workers}"] if workers else [])]
    env = {**os.environ, "PYTEST_ADDOPTS": "--durations=15 -p no:cacheprovider"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, help="instead of the Makefile's count")
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("suite", vars(args))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        cpu_before, started = children_cpu_s(), time.perf_counter()
        run = make_test(args.workers)
        wall_s, cpu_s = time.perf_counter() - started, children_cpu_s() - cpu_before
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    print(run.stdout[-6000:], run.stderr[-2000:], sep="\n")
    last_line = run.stdout.splitlines()[-1] if run.stdout else ""
    counts = {kind.rstrip("s"): int(n) for n, kind in SUMMARY.findall(last_line)}
    cores_busy = cpu_s / wall_s
    record.results = {
        "wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1), "cores_busy": round(cores_busy, 2),
        "counts": counts, "exit_status": run.returncode, "tail": run.stdout[-6000:],
    }  # fmt: skip
    if not args.busy:
        workers = args.workers or "the Makefile's"
        detail = f"{workers} workers, {cores_busy:.2f} cores busy"
        record.target(
            "suite wall time", wall_s, at_most=TARGET_S, unit=" s", fmt=".0f", detail=detail
        )
    failed = counts.get("failed", 0) + counts.get("error", 0)
    if run.returncode != 0:  # a run stopped short (a crash, a collection error) failed too
        failed = max(failed, 1)
    record.target("tests failed", failed, at_most=0, fmt="d", detail=f"{counts}")
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
