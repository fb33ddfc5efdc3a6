"""Arrival schedules: when each request is sent and what it asks, fixed before the run.

A schedule is computed up front from the seed, so a run can be repeated exactly, saved next
to its results, and replayed later.  Offsets are seconds from the run's start; the first
request is at offset 0.  A closed loop has no schedule, only the same seeded draw of
queries, taken one request at a time.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag.storage import write_csv

TIMING_MODES = ("ideal", "poisson", "gamma", "trace")  # the open loop's schedules
CLOSED_LOOP = "concurrency"  # the timing mode of the closed loop: users, not a schedule
BUILTIN_QUERIES = Path(__file__).resolve().parent.parent / "data" / "queries.txt"


@dataclass(frozen=True)
class Schedule:
    """Request i is sent at `offsets[i]` seconds and asks `queries[i]`."""

    offsets: np.ndarray
    queries: list[str]

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def rate(self) -> float:
        """The schedule's own send rate, (n - 1) / span; a finite random schedule's rate
        differs from its target by chance, and achieved rates are judged against this."""
        if len(self.offsets) < 2 or self.offsets[-1] <= self.offsets[0]:
            return float("nan")
        return (len(self.offsets) - 1) / float(self.offsets[-1] - self.offsets[0])


def arrival_offsets(
    timing_mode: str,
    rps: float = 0.0,
    num_requests: int = 0,
    duration: float = 0.0,
    seed: int | np.random.SeedSequence = 0,
    burstiness: float = 1.0,
    trace: str = "",
) -> np.ndarray:
    """Send offsets in seconds, sorted, first at 0.

    At most `num_requests` (when > 0) and only offsets below `duration` (when > 0); a
    generated schedule needs at least one of the two.  `gamma` follows vLLM's convention:
    gaps have mean 1/rps and shape `burstiness`, so burstiness 1 is poisson, below 1 is
    burstier (coefficient of variation 1/sqrt(burstiness)) and above 1 is more regular.
    """
    if timing_mode not in TIMING_MODES:
        raise ValueError(f"timing_mode must be one of {TIMING_MODES}, not {timing_mode!r}")
    if timing_mode == "trace":
        offsets = load_trace(trace)
    else:
        if rps <= 0:
            raise ValueError(f"rps must be > 0 for timing_mode={timing_mode}")
        if num_requests <= 0 and duration <= 0:
            raise ValueError("give num_requests or duration (or both)")
        n = num_requests if num_requests > 0 else int(np.ceil(duration * rps)) + 1
        offsets = _generated(timing_mode, rps, n, duration, seed, burstiness)
    if num_requests > 0:
        offsets = offsets[:num_requests]
    if duration > 0:
        offsets = offsets[offsets < duration]
    return offsets


def _generated(
    mode: str,
    rps: float,
    n: int,
    duration: float,
    seed: int | np.random.SeedSequence,
    burstiness: float,
) -> np.ndarray:
    if mode == "ideal":
        return np.arange(n, dtype=float) / rps
    if mode == "gamma" and burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    rng = np.random.default_rng(seed)
    offsets = np.zeros(1)
    # A random schedule bounded only by duration may need more than the expected count.
    while len(offsets) < n or (duration > 0 and offsets[-1] < duration):
        size = max(n - len(offsets), 16)
        if mode == "poisson":
            gaps = rng.exponential(1.0 / rps, size)
        else:
            gaps = rng.gamma(burstiness, 1.0 / (rps * burstiness), size)
        offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(gaps)])
        if duration <= 0:
            break
    return offsets


def read_trace(path: str) -> tuple[np.ndarray, list[str] | None]:
    """Timestamps in seconds from a text file (one per line, `#` comments allowed) or from
    a CSV with a `scheduled_s` column (such as a saved schedule.csv), sorted and shifted to
    start at 0; with the CSV's `query` column in the same order, when it has one."""
    if not path:
        raise ValueError("timing_mode=trace needs a trace file")
    queries: list[str] | None = None
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if "scheduled_s" in first:
            rows = list(csv.DictReader(f))
            values = [float(row["scheduled_s"]) for row in rows]
            if rows and "query" in rows[0]:
                queries = [row["query"] for row in rows]
        else:
            lines = (line.split("#", 1)[0].strip() for line in f)
            values = [float(line.split(",")[0]) for line in lines if line]
    if not values:
        raise ValueError(f"trace file {path} holds no timestamps")
    order = np.argsort(np.asarray(values, dtype=float), kind="stable")
    offsets = np.asarray(values, dtype=float)[order]
    if queries is not None:
        queries = [queries[i] for i in order]
    return offsets - offsets[0], queries


def load_trace(path: str) -> np.ndarray:
    """The timestamps of `read_trace`."""
    return read_trace(path)[0]


def load_queries(path: str = "") -> list[str]:
    """Queries, one per line (blank lines and `#` lines skipped); "" = the built-in list,
    which fits the demo corpus."""
    text = Path(path or BUILTIN_QUERIES).read_text(encoding="utf-8")
    queries = [q.strip() for q in text.splitlines() if q.strip() and not q.startswith("#")]
    if not queries:
        raise ValueError(f"no queries in {path or BUILTIN_QUERIES}")
    return queries


def _streams(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent seeds for the timing and the queries, so that changing the query list
    never changes the timing."""
    timing, queries = np.random.SeedSequence(seed).spawn(2)
    return timing, queries


def query_draw(seed: int, queries: list[str]) -> Iterator[str]:
    """The seeded draw of queries, one per request in order, without end: a schedule takes
    as many as it has offsets, a closed loop one per request it sends."""
    rng = np.random.default_rng(_streams(seed)[1])
    while True:
        yield queries[int(rng.integers(len(queries)))]


def build_schedule(
    timing_mode: str,
    rps: float = 0.0,
    num_requests: int = 0,
    duration: float = 0.0,
    seed: int = 0,
    burstiness: float = 1.0,
    trace: str = "",
    queries: list[str] | None = None,
) -> Schedule:
    """Offsets and the seeded draw of queries.  A trace that carries its queries (a saved
    schedule.csv) replays them, in its order, instead of a draw."""
    offsets = arrival_offsets(
        timing_mode, rps, num_requests, duration, _streams(seed)[0], burstiness, trace
    )
    saved = read_trace(trace)[1] if timing_mode == "trace" else None
    if saved is not None:
        return Schedule(offsets=offsets, queries=saved[: len(offsets)])
    draw = query_draw(seed, queries if queries is not None else load_queries())
    return Schedule(offsets=offsets, queries=list(itertools.islice(draw, len(offsets))))


def write_schedule(schedule: Schedule, path: Path) -> None:
    """Save the schedule; the file replays with timing_mode=trace."""
    rows = (
        {"request_id": i, "scheduled_s": repr(float(offset)), "query": query}
        for i, (offset, query) in enumerate(zip(schedule.offsets, schedule.queries, strict=True))
    )
    write_csv(path, rows, ["request_id", "scheduled_s", "query"])
