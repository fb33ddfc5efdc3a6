"""One load run: build the schedule, send it open-loop, summarise, write the files.

HTTP only: nothing here imports model code, so a client process stays light.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

import numpy as np

from rag.loadgen.config import LoadConfig
from rag.loadgen.files import environment, output_paths, write_csv, write_json
from rag.loadgen.schedule import build_schedule, load_queries, write_schedule
from rag.loadgen.sender import ROW_COLUMNS, Sender
from rag.loadgen.stats import summarise


async def _show_progress(sender: Sender) -> None:
    """A live status line for a person watching a terminal."""
    n = len(sender.rows)
    while True:
        await asyncio.sleep(0.5)
        p50 = f"{np.median(sender.recent) * 1e3:.1f} ms" if sender.recent else "-"
        sys.stderr.write(
            f"\rsent {sender.dispatched}/{n}  completed {sender.completed}"
            f"  failed {sender.failed}  p50 {p50}   "
        )
        sys.stderr.flush()


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed columns, then whatever some rows add (backend, server_*, tag), sorted."""
    extra = set().union(*rows) - set(ROW_COLUMNS) if rows else set()
    return [*ROW_COLUMNS, *sorted(extra)]


def _check(config: LoadConfig) -> None:
    if config.timeout <= 0:
        raise ValueError("timeout must be > 0")
    if config.max_in_flight < 0:
        raise ValueError("max_in_flight must be >= 0")
    if config.stop_grace < 0:
        raise ValueError("stop_grace must be >= 0")


async def run_load_async(
    config: LoadConfig, stop: asyncio.Event | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`run_load` for callers already inside an event loop; setting `stop` ends the run
    early the way Ctrl-C does."""
    _check(config)
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
    paths = output_paths(config.out) if config.out else None
    if paths:
        paths["requests"].parent.mkdir(parents=True, exist_ok=True)
        write_schedule(schedule, paths["schedule"])
    meta = environment(asdict(config), len(schedule), schedule.rate)
    if paths:
        write_json(meta, paths["meta"])

    sender = Sender(
        schedule,
        config.target,
        path=config.path,
        k=config.k,
        assign=config.assign,
        timeout=config.timeout,
        max_in_flight=config.max_in_flight,
        stop_grace=config.stop_grace,
    )
    stop = stop or asyncio.Event()
    show = config.progress and sys.stderr.isatty()
    progress = asyncio.ensure_future(_show_progress(sender)) if show else None
    try:
        interrupted = await sender.run(stop)
    finally:
        if progress:
            progress.cancel()
            sys.stderr.write("\n")
    rows = sender.rows
    if config.tag:
        for row in rows:
            row["tag"] = config.tag
    target_rps = config.rps if config.timing_mode != "trace" else schedule.rate
    summary = {
        "tag": config.tag,
        "start_time": meta["start_time"],
        "target": config.target,
        "assign": config.assign,
        "timing_mode": config.timing_mode,
        "burstiness": config.burstiness,
        "seed": config.seed,
        "k": config.k,
        "max_in_flight": config.max_in_flight,
        "timeout_s": config.timeout,
        **summarise(rows, schedule.rate, target_rps, interrupted),
    }
    if paths:
        write_csv(rows, _columns(rows), paths["requests"])
        write_csv([summary], list(summary), paths["summary"])
    return rows, summary


def run_load(config: LoadConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one load test: (one dict per scheduled request, a flat summary).  On the main
    thread, SIGINT and SIGTERM stop sending and still return (and write) every row."""
    return asyncio.run(_run_with_signals(config))


async def _run_with_signals(config: LoadConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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
