"""Running the sweep from tests: in a folder of the test's own, on tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from rag.config import CONF_DIR

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [
    v for v in ("base", "batched", "scaling") if (CONF_DIR / "variant" / f"{v}.yaml").exists()
]
SMALL = ["model=tiny", "timing_mode=poisson", "num_requests=12", "duration=0",
         "harness.warmup_requests=2"]  # fmt: skip


def sweep(cwd: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python experiments/sweep.py -m ...` in `cwd` (outputs/ lands there)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "sweep.py"), "-m", *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
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
