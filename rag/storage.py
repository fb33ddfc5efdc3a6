"""Every file ragbench writes: published whole or not at all, under one cache root, and
scratch folders that outlive no process.

A reader (a parent polling for a port file, a second server loading a cache, a plot of a
run still going) must see either nothing or the complete file or folder, never half of it,
so everything is written under a temporary name beside its target and renamed into place
(rename is atomic on one file system); the CSV and JSON helpers are the one way results are
written.  A process's scratch files (a port file, an unnamed run's folder) go in a private
per-user runtime folder, in an entry named after the owner's PID: what a process killed
before it could clean up leaves there, the next one removes.  Torch-free: servers,
launchers, the load generator and caches share it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "ragbench"


def cache_dir(configured: str = "") -> Path:
    """The root of ragbench's caches: `configured` (`~` expanded) or the user's cache dir."""
    if configured:
        return Path(configured).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME))


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented JSON (values JSON cannot hold as their string), atomically."""
    write_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Rows as CSV with a header, atomically; missing values and None are empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue())


@contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block ends without error it becomes `target`,
    otherwise it is removed.  If another process published `target` first, its folder is
    kept and this one discarded (both were built from the same inputs)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def scratch_folder(kind: str) -> tempfile.TemporaryDirectory:
    """A new private folder for this process's scratch files, `<kind>-<pid>-<random>` in the
    user's runtime folder; the caller removes it (`cleanup()` or `with`).  Entries whose
    process is gone are removed first: what a SIGKILLed predecessor left."""
    root = runtime_root()
    remove_orphans(root)
    return tempfile.TemporaryDirectory(prefix=f"{kind}-{os.getpid()}-", dir=root)


def runtime_root() -> Path:
    """The user's private runtime folder for ragbench ($XDG_RUNTIME_DIR/ragbench where the
    session has a usable one, else a checked per-user folder in the temp dir): local to
    this machine, so the PIDs in its entries' names are this machine's."""
    with warnings.catch_warnings():  # no XDG_RUNTIME_DIR (a cron job, a SLURM job) is normal
        warnings.simplefilter("ignore", platformdirs.RuntimeDirWarning)
        return platformdirs.user_runtime_path(APP_NAME, ensure_exists=True)


def remove_orphans(root: Path) -> list[Path]:
    """Remove the entries of `root` whose owner (the PID in the name) no longer runs."""
    removed = []
    for entry in root.iterdir():
        pid = owner_pid(entry.name)
        if pid is not None and not process_exists(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def owner_pid(name: str) -> int | None:
    """The PID in a scratch folder's name `<kind>-<pid>-<random>` (None for anything else)."""
    parts = name.split("-")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


def process_exists(pid: int) -> bool:
    """Whether a process with this PID runs (a PID taken over by a newer process counts:
    its folder waits for that one to end)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
