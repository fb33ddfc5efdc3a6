"""Running the sweep from tests: in a folder of the test's own, on tiny models."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["base", "batched", "scaling"]
SMALL = ["model=tiny", "timing_mode=poisson", "num_requests=12", "duration=0",
         "harness.warmup_requests=2"]  # fmt: skip


def sweep(cwd: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python experiments/sweep.py -m ...` in `cwd` (outputs/ lands there).  Past the
    timeout it is interrupted as Ctrl-C would, so it still stops what it started."""
    command = [sys.executable, str(REPO / "experiments" / "sweep.py"), "-m", *overrides]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        raise AssertionError(f"sweep still running after {timeout:g} s:\n{err[-3000:]}") from None
    result = subprocess.CompletedProcess(command, process.returncode, out, err)
    assert result.returncode == 0, out[-3000:] + err[-3000:]
    return result


def leftovers(path: Path) -> list[int]:
    """PIDs of processes still running with `path` in their command line."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(path) in arg for arg in proc.info["cmdline"] or []):
            pids.append(proc.info["pid"])
    return pids


def points(root: Path, tag: str) -> list[Path]:
    return sorted(p for p in (root / "outputs" / tag).iterdir() if p.is_dir() and p.name[0] != ".")
