"""Collect every point of one or more sweeps into one tidy table: one row per point.

A finished point contributes its summary.csv row, plus what only its other files hold
(mean time per server stage and mean batch size from requests.csv, replicas from
autoscaler.csv, the machine from meta.json).  A failed point contributes a row that says
why, so it is seen rather than silently missing.  Points whose overrides differ only in
`seed` are repeats of one setting: each keeps its row, with the setting and how many
repeats it has, and the plots draw their median and spread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from rag.harness.files import FAILURE, SUMMARY, read_failure

STAGES = ("queue", "embed", "retrieve", "generate")
ENVIRONMENT = ("hostname", "cpu_model", "gpus", "git_commit", "git_dirty", "slurm_job_id")


def point_folders(root: Path, tags: list[str] | None = None) -> list[Path]:
    """Folders under root/<tag>/ that hold a point's summary or failure, sorted."""
    folders = {
        path.parent
        for name in (SUMMARY, FAILURE)
        for path in root.glob(f"*/*/{name}")
        if not tags or path.parent.parent.name in tags
    }
    return sorted(folders)


def _mean(frame: pd.DataFrame, column: str) -> float:
    if column not in frame or frame[column].isna().all():
        return math.nan
    return float(frame[column].mean())


def request_figures(folder: Path) -> dict[str, Any]:
    """Per-stage mean time and mean batch size over the successful requests."""
    path = folder / "requests.csv"
    if not path.exists():
        return {}
    frame = pd.read_csv(path, low_memory=False)
    ok = frame[frame["error"].isna()] if "error" in frame else frame
    figures = {f"stage_{stage}_ms": _mean(ok, f"server_{stage}_ms") for stage in STAGES}
    figures["batch_size_mean"] = _mean(ok, "server_batch_size")
    return figures


def replica_figures(folder: Path) -> dict[str, Any]:
    """Most and mean replicas over a scaling run, and where the autoscaler found that a
    scale-up added nothing (from its decisions)."""
    path = folder / "autoscaler.csv"
    if not path.exists():
        return {}
    frame = pd.read_csv(path, keep_default_na=False)
    if frame.empty or "replicas_after" not in frame:
        return {}
    figures: dict[str, Any] = {
        "replicas_max": int(frame["replicas_after"].max()),
        "replicas_mean": float(frame["replicas_after"].mean()),
    }
    if "verdict" in frame:
        found = frame[frame["verdict"] == "no gain"]
        figures["no_gain"] = " | ".join(
            f"at {row.elapsed_s:.0f} s: {_no_gain_text(row.reason)}" for row in found.itertuples()
        )
    return figures


def _no_gain_text(reason: str) -> str:
    """The verdict's own words from a decision's reason ("...; no gain: <words>")."""
    return reason.rsplit("no gain: ", 1)[-1]


def environment_figures(folder: Path) -> dict[str, Any]:
    """The machine, and the setting: the point's overrides but its seed (repeats share it)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    env = {key: meta.get(key, "") for key in ENVIRONMENT}
    env["gpus"] = ", ".join(env["gpus"] or [])
    overrides = meta.get("overrides") or []
    env["setting"] = " ".join(sorted(o for o in overrides if o.split("=")[0] != "seed"))
    return env


def count_repeats(frame: pd.DataFrame) -> pd.DataFrame:
    """Each finished point's number of repeats: the finished points of its tag with the
    same setting."""
    if "setting" not in frame:
        return frame
    ok = frame["outcome"] == "ok"
    groups = frame[ok].groupby(["tag", "setting"], dropna=False)["point"].transform("size")
    return frame.assign(repeats=groups.reindex(frame.index))


def _finished_row(folder: Path, root: Path) -> dict[str, Any]:
    row = pd.read_csv(folder / SUMMARY).iloc[0].to_dict()
    row.update(outcome="ok", folder=str(folder.relative_to(root)))
    row.update(request_figures(folder), **replica_figures(folder), **environment_figures(folder))
    return row


def _failed_row(folder: Path, root: Path) -> dict[str, Any]:
    failure = read_failure(folder) or {}
    return {
        "tag": folder.parent.name,
        "point": folder.name,
        "outcome": "failed",
        "failure_reason": failure.get("reason", "unreadable failure.json"),
        "folder": str(folder.relative_to(root)),
    }


def collect(root: Path, tags: list[str] | None = None) -> pd.DataFrame:
    """One row per point under root (only the given tags, if any), failures included."""
    rows = [
        _finished_row(f, root) if (f / SUMMARY).exists() else _failed_row(f, root)
        for f in point_folders(root, tags)
    ]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = ["tag", "point", "outcome", "variant", "model", "timing_mode", "offered_rps"]
    first = [c for c in order if c in frame]
    frame = count_repeats(frame[first + [c for c in frame.columns if c not in first]])
    sort = [c for c in ("tag", "variant", "timing_mode", "offered_rps", "point") if c in frame]
    return frame.sort_values(sort, kind="stable").reset_index(drop=True)
