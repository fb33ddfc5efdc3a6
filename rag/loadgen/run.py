"""One load run in four steps a sweep can also call one by one: `plan` (check the settings,
build the schedule, record the environment), `send` (the open loop, or the closed loop of
`timing_mode=concurrency`; one row per request), `summarise_run` and `write_run`.
`run_load` does all four.

HTTP only: nothing here imports model code, so a client process stays light.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rag.loadgen.closed_loop import ClosedLoopSender
from rag.loadgen.config import LoadConfig
from rag.loadgen.files import environment, output_paths
from rag.loadgen.schedule import (
    CLOSED_LOOP,
    TIMING_MODES,
    Schedule,
    build_schedule,
    load_queries,
    query_draw,
    write_schedule,
)
from rag.loadgen.sender import ROW_COLUMNS, Sender
from rag.loadgen.stats import summarise
from rag.storage import write_csv, write_json

Rows = list[dict[str, Any]]
log = logging.getLogger("rag.loadgen")
PROGRESS_LOG_S = 10.0  # between progress lines when nobody watches a terminal


@dataclass(frozen=True)
class Plan:
    """What is fixed before the first request: the settings, the schedule (a closed loop
    has none: its queries are drawn as its users send), and the environment at the start
    (it becomes meta.json)."""

    config: LoadConfig
    schedule: Schedule | None
    meta: dict[str, Any]

    @property
    def closed_loop(self) -> bool:
        return self.schedule is None


def _check(config: LoadConfig) -> None:
    modes = (*TIMING_MODES, CLOSED_LOOP)
    if config.timing_mode not in modes:
        raise ValueError(f"timing_mode must be one of {modes}, not {config.timing_mode!r}")
    if (config.timing_mode == CLOSED_LOOP) != (config.concurrency > 0):
        raise ValueError("timing_mode=concurrency goes with concurrency >= 1, and only it")
    if config.timing_mode == CLOSED_LOOP and config.max_in_flight:
        raise ValueError("a closed loop's concurrency is its cap: leave max_in_flight at 0")
    if config.timing_mode == CLOSED_LOOP and config.num_requests <= 0 and config.duration <= 0:
        raise ValueError("give num_requests or duration (or both)")
    if config.timeout <= 0:
        raise ValueError("timeout must be > 0")
    if config.max_in_flight < 0:
        raise ValueError("max_in_flight must be >= 0")
    if config.stop_grace < 0:
        raise ValueError("stop_grace must be >= 0")


def plan(config: LoadConfig) -> Plan:
    """Check the settings and build the schedule (ValueError or OSError when they are bad)."""
    _check(config)
    if config.timing_mode == CLOSED_LOOP:
        load_queries(config.queries)  # a bad query file fails here, not in the run
        return Plan(config, None, environment(asdict(config), config.num_requests, math.nan))
    schedule = build_schedule(
        config.timing_mode,
        config.rps,
        config.num_requests,
        config.duration,
        config.seed,
        config.burstiness,
        config.trace,
        load_queries(config.queries),
    )
    return Plan(config, schedule, environment(asdict(config), len(schedule), schedule.rate))


def _progress_line(sender: Sender) -> str:
    p50 = f"{np.median(sender.recent) * 1e3:.1f} ms" if sender.recent else "-"
    planned = f"/{sender.planned}" if sender.planned else ""
    return (
        f"sent {sender.launched}{planned}  ok {sender.succeeded}  failed {sender.failed}  p50 {p50}"
    )


def _sender(run: Plan) -> Sender:
    config = run.config
    options: dict[str, Any] = dict(
        path=config.path,
        k=config.k,
        assign=config.assign,
        timeout=config.timeout,
        stop_grace=config.stop_grace,
    )
    if run.schedule is None:
        return ClosedLoopSender(
            query_draw(config.seed, load_queries(config.queries)),
            config.target,
            concurrency=config.concurrency,
            num_requests=config.num_requests,
            duration=config.duration,
            **options,
        )
    return Sender(run.schedule, config.target, max_in_flight=config.max_in_flight, **options)


async def _show_progress(sender: Sender, on_terminal: bool) -> None:
    """Where the run is: a live line for a person at a terminal; elsewhere (a sweep's log,
    a SLURM job's output) a logged line every PROGRESS_LOG_S, so nobody reads CSVs to know."""
    while True:
        await asyncio.sleep(0.5 if on_terminal else PROGRESS_LOG_S)
        if on_terminal:
            sys.stderr.write(f"\r{_progress_line(sender)}   ")
            sys.stderr.flush()
        else:
            log.info(_progress_line(sender))


async def send(run: Plan, stop: asyncio.Event | None = None) -> tuple[Rows, bool]:
    """Send the schedule open-loop, or run the closed loop's users: (one row per scheduled
    or sent request, whether `stop` ended the run early, as Ctrl-C does)."""
    config = run.config
    sender = _sender(run)
    on_terminal = sys.stderr.isatty()
    show = asyncio.ensure_future(_show_progress(sender, on_terminal)) if config.progress else None
    try:
        interrupted = await sender.run(stop or asyncio.Event())
    finally:
        if show:
            show.cancel()
            if on_terminal:
                sys.stderr.write("\n")
    if config.tag:
        for row in sender.rows:
            row["tag"] = config.tag
    return sender.rows, interrupted


def summarise_run(run: Plan, rows: Rows, interrupted: bool) -> dict[str, Any]:
    """The run's settings and statistics as one flat row (summary.csv).  A closed loop
    has no target or schedule rate (NaN), and its latency runs from each send."""
    config = run.config
    if run.schedule is None:
        schedule_rps = target_rps = math.nan
    else:
        schedule_rps = run.schedule.rate
        target_rps = config.rps if config.timing_mode != "trace" else schedule_rps
    return {
        "tag": config.tag,
        "start_time": run.meta["start_time"],
        "target": config.target,
        "assign": config.assign,
        "loop": "closed" if run.closed_loop else "open",
        "timing_mode": config.timing_mode,
        "concurrency": config.concurrency,
        "burstiness": config.burstiness,
        "seed": config.seed,
        "k": config.k,
        "max_in_flight": config.max_in_flight,
        "timeout_s": config.timeout,
        **summarise(rows, schedule_rps, target_rps, interrupted),
    }


def _columns(rows: Rows) -> list[str]:
    """The fixed columns, then whatever some rows add (backend, server_*, tag), sorted."""
    extra = set().union(*rows) - set(ROW_COLUMNS) if rows else set()
    return [*ROW_COLUMNS, *sorted(extra)]


def write_run(run: Plan, out: str, rows: Rows, summary: dict[str, Any]) -> None:
    """requests.csv at `out`, and summary.csv, schedule.csv (an open loop's) and
    meta.json beside it."""
    paths = output_paths(out)
    if run.schedule is not None:
        write_schedule(run.schedule, paths["schedule"])
    write_json(paths["meta"], run.meta)
    write_csv(paths["requests"], rows, _columns(rows))
    write_csv(paths["summary"], [summary], list(summary))


async def run_load_async(
    config: LoadConfig, stop: asyncio.Event | None = None
) -> tuple[Rows, dict[str, Any]]:
    """`run_load` for callers already inside an event loop (on whatever loop that is);
    setting `stop` ends the run early the way Ctrl-C does."""
    run = plan(config)
    rows, interrupted = await send(run, stop)
    summary = summarise_run(run, rows, interrupted)
    if config.out:
        write_run(run, config.out, rows, summary)
    return rows, summary


def run_load(config: LoadConfig) -> tuple[Rows, dict[str, Any]]:
    """Run one load test: (one dict per scheduled request, a flat summary).  On the main
    thread, SIGINT and SIGTERM stop sending and still return (and write) every row."""
    return asyncio.run(_run_with_signals(config))


async def _run_with_signals(config: LoadConfig) -> tuple[Rows, dict[str, Any]]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
    try:
        return await run_load_async(config, stop)
    finally:
        if on_main:
            for sig in signals:
                loop.remove_signal_handler(sig)
