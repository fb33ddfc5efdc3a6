"""Where a load run's results go, and the environment record that travels with them
(the files themselves are written atomically by `rag.storage`).

A figure is only comparable with the machine, software and settings that produced it, so
every run writes meta.json next to its CSVs.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("aiohttp", "yarl", "numpy")


def output_paths(out: str) -> dict[str, Path]:
    """The files of one run, beside the per-request CSV: `summary.csv`, `schedule.csv` and
    `meta.json` when it is called requests.csv (the sweep's layout), else prefixed with
    its stem, so that two runs in one folder do not overwrite each other."""
    requests = Path(out)
    prefix = "" if requests.stem == "requests" else requests.stem + "."
    folder = requests.parent
    return {
        "requests": requests,
        "summary": folder / f"{prefix}summary.csv",
        "schedule": folder / f"{prefix}schedule.csv",
        "meta": folder / f"{prefix}meta.json",
    }


def _git(*args: str) -> str:
    """Output of a git command in this package's checkout, "" when there is none."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("" where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """Machine, software, checkout and load right now: what a figure depends on."""
    commit = _git("rev-parse", "HEAD")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in packages},
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
        "git_dirty": bool(commit and _git("status", "--porcelain", "--untracked-files=no")),
        "argv": sys.argv,
    }


def environment(config: dict[str, Any], num_requests: int, schedule_rps: float) -> dict[str, Any]:
    """Machine, software, load and settings at the start of a run."""
    env = machine()
    return {
        "start_time": env.pop("date"),
        **env,
        "config": config,
        "schedule": {"requests": num_requests, "rate": schedule_rps},
    }
