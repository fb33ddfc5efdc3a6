"""Every file ragbench writes, published whole or not at all, under one cache root.

A reader (a parent polling for a port file, a second server loading a cache, a plot of a
run still going) must see either nothing or the complete file or folder, never half of it,
so everything is written under a temporary name beside its target and renamed into place
(rename is atomic on one file system); the CSV and JSON helpers are the one way results are
written.  Torch-free: servers, launchers, the load generator and caches share it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
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
