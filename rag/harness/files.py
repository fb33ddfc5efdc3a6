"""A sweep point's files: which mark it finished, and the failure record that replaces its
results.

A point's files are written atomically (`rag.storage`), so a job cut off mid-write never
leaves a half file that looks complete; `summary.csv` is written last and marks a finished
point.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from rag.storage import write_json

SUMMARY = "summary.csv"
FAILURE = "failure.json"


def now() -> str:
    """Wall-clock time, for labels only."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def is_finished(folder: Path) -> bool:
    return (folder / SUMMARY).is_file()


def write_failure(folder: Path, reason: str, log_tail: str = "", **details: Any) -> None:
    """failure.json: why the point has no results, with the end of the relevant log."""
    record = {"reason": reason, "time": now(), **details, "log_tail": log_tail}
    write_json(folder / FAILURE, record)


def read_failure(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / FAILURE).read_text())
    except (OSError, ValueError):
        return None


def tail(text: str | None, lines: int = 40) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def file_tail(path: Path, lines: int = 40) -> str:
    """The end of a log file ("" when there is none)."""
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return ""
