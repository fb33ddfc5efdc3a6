"""Arrival schedules: when each request is sent and what it asks, fixed before the run.

A schedule is computed up front from the seed, so a run can be repeated exactly, saved next
to its results, and replayed later.  Offsets are seconds from the run's start; the first
request is at offset 0; each request has its query and its output length (`max_tokens`).
A closed loop has no schedule, only the same seeded draw of queries and lengths, taken one
request at a time.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag.storage import write_csv

TIMING_MODES = ("ideal", "poisson", "gamma", "trace")  # the open loop's schedules
CLOSED_LOOP = "concurrency"  # the timing mode of the closed loop: users, not a schedule
BUILTIN_QUERIES = Path(__file__).resolve().parent.parent / "data" / "queries.txt"


@dataclass(frozen=True)
class Prompt:
    """A query, and the output length it asks for when it names one (from a JSONL prompts
    file; 0 = the run's own)."""

    text: str
    max_tokens: int = 0


@dataclass(frozen=True)
class OutputLength:
    """Each request's `max_tokens`: `low` for every request (0 = none sent: the server's
    default), or drawn uniformly from [low, high] when `high` is above it."""

    low: int = 0
    high: int = 0

    def __post_init__(self) -> None:
        if self.low < 0 or (self.high and self.high < self.low):
            raise ValueError("max_tokens must be >= 0, and max_tokens_high 0 or >= max_tokens")

    def draw(self, rng: np.random.Generator) -> int:
        if self.high > self.low:
            return int(rng.integers(self.low, self.high + 1))
        return self.low


@dataclass(frozen=True)
class Schedule:
    """Request i is sent at `offsets[i]` seconds, asks `queries[i]` and wants at most
    `max_tokens[i]` tokens back (0 = the server's default)."""

    offsets: np.ndarray
    queries: list[str]
    max_tokens: list[int]

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


@dataclass(frozen=True)
class Trace:
    """A trace's send offsets, sorted and from 0; a saved schedule's queries and output
    lengths in the same order, when it has them."""

    offsets: np.ndarray
    queries: list[str] | None = None
    max_tokens: list[int] | None = None


def read_trace(path: str) -> Trace:
    """Timestamps in seconds from a text file (one per line, `#` comments allowed) or from
    a CSV with a `scheduled_s` column (such as a saved schedule.csv, whose `query` and
    `max_tokens` columns come with them)."""
    if not path:
        raise ValueError("timing_mode=trace needs a trace file")
    queries: list[str] | None = None
    max_tokens: list[int] | None = None
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if "scheduled_s" in first:
            rows = list(csv.DictReader(f))
            values = [float(row["scheduled_s"]) for row in rows]
            if rows and "query" in rows[0]:
                queries = [row["query"] for row in rows]
            if rows and "max_tokens" in rows[0]:
                max_tokens = [int(row["max_tokens"] or 0) for row in rows]
        else:
            lines = (line.split("#", 1)[0].strip() for line in f)
            values = [float(line.split(",")[0]) for line in lines if line]
    if not values:
        raise ValueError(f"trace file {path} holds no timestamps")
    order = np.argsort(np.asarray(values, dtype=float), kind="stable")
    offsets = np.asarray(values, dtype=float)[order]
    return Trace(
        offsets - offsets[0],
        [queries[i] for i in order] if queries is not None else None,
        [max_tokens[i] for i in order] if max_tokens is not None else None,
    )


def load_trace(path: str) -> np.ndarray:
    """The timestamps of `read_trace`."""
    return read_trace(path).offsets


def _prompt(line: str, where: str) -> Prompt:
    """One line of a JSONL prompts file: {"prompt": str, "max_tokens": int (optional)}."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ValueError(f'{where}: want an object with a string "prompt"')
    max_tokens = item.get("max_tokens", 0)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"{where}: max_tokens must be an integer >= 0")
    return Prompt(item["prompt"], max_tokens)


def load_prompts(path: str = "") -> list[Prompt]:
    """Prompts from a text file, one per line (blank lines and `#` lines skipped), or from
    a `.jsonl` file with `prompt` and optionally `max_tokens` on each line; "" = the
    built-in queries, which fit the demo corpus."""
    source = Path(path or BUILTIN_QUERIES)
    lines = source.read_text(encoding="utf-8").splitlines()
    if source.suffix == ".jsonl":
        numbered = enumerate(lines, 1)
        prompts = [_prompt(line, f"{source}:{n}") for n, line in numbered if line.strip()]
    else:
        prompts = [Prompt(q.strip()) for q in lines if q.strip() and not q.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts


def _streams(seed: int) -> list[np.random.SeedSequence]:
    """Independent seeds for the timing, the queries and the output lengths, so that
    changing the query list never changes the timing, nor the lengths the queries."""
    return np.random.SeedSequence(seed).spawn(3)


def request_draw(
    seed: int, prompts: list[Prompt], lengths: OutputLength | None = None
) -> Iterator[tuple[str, int]]:
    """The seeded draw of (query, max_tokens), one per request in order, without end: a
    schedule takes as many as it has offsets, a closed loop one per request it sends."""
    lengths = lengths or OutputLength()
    _, query_seed, length_seed = _streams(seed)
    pick, length = np.random.default_rng(query_seed), np.random.default_rng(length_seed)
    while True:
        prompt = prompts[int(pick.integers(len(prompts)))]
        drawn = lengths.draw(length)
        yield prompt.text, prompt.max_tokens or drawn


def build_schedule(
    timing_mode: str,
    rps: float = 0.0,
    num_requests: int = 0,
    duration: float = 0.0,
    seed: int = 0,
    burstiness: float = 1.0,
    trace: str = "",
    prompts: list[Prompt] | None = None,
    lengths: OutputLength | None = None,
) -> Schedule:
    """Offsets and the seeded draw of queries and output lengths.  A trace that carries
    its queries (a saved schedule.csv) replays them, and their lengths when it has them,
    in its order, instead of a draw."""
    offsets = arrival_offsets(
        timing_mode, rps, num_requests, duration, _streams(seed)[0], burstiness, trace
    )
    n = len(offsets)
    saved = read_trace(trace) if timing_mode == "trace" else None
    if saved is not None and saved.queries is not None:
        max_tokens = saved.max_tokens or [(lengths or OutputLength()).low] * len(saved.queries)
        return Schedule(offsets, saved.queries[:n], max_tokens[:n])
    draw = request_draw(seed, prompts if prompts is not None else load_prompts(), lengths)
    queries, max_tokens = zip(*itertools.islice(draw, n), strict=True) if n else ((), ())
    return Schedule(offsets, list(queries), list(max_tokens))


def write_schedule(schedule: Schedule, path: Path) -> None:
    """Save the schedule; the file replays with timing_mode=trace."""
    rows = (
        {"request_id": i, "scheduled_s": repr(float(offset)), "query": query, "max_tokens": m}
        for i, (offset, query, m) in enumerate(
            zip(schedule.offsets, schedule.queries, schedule.max_tokens, strict=True)
        )
    )
    write_csv(path, rows, ["request_id", "scheduled_s", "query", "max_tokens"])
