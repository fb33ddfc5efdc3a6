"""The load generator's entry points: `run_load(config)` and the command line.

    python -m rag.loadgen --target http://127.0.0.1:8000 --timing_mode poisson --rps 5 \
        --num_requests 200 --out outputs/try/requests.csv

Builds the schedule from the seed, sends it open-loop (rag.sender), summarises
(rag.loadstats) and writes requests.csv, summary.csv, schedule.csv and meta.json.  HTTP
only: nothing here imports model code, so a client process stays light.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from rag.loadfiles import environment, output_paths, write_csv, write_json
from rag.loadstats import summarise
from rag.schedule import build_schedule, load_queries, write_schedule
from rag.sender import ROW_COLUMNS, Sender


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class LoadConfig:
    """One load run.  Plain defaults, so the sweep can compose it from the config tree."""

    target: str = _option("http://127.0.0.1:8000", "service base URL (or the full POST URL)")
    path: str = _option("/rag", "endpoint path appended to a base URL")
    assign: bool = _option(False, "two-step target: GET <target>/assign -> {backend}, then POST")
    timing_mode: str = _option("poisson", "ideal | poisson | gamma | trace")
    rps: float = _option(10.0, "target requests per second (ideal, poisson, gamma)")
    num_requests: int = _option(100, "requests in the schedule (0 = as many as fit duration)")
    duration: float = _option(0.0, "seconds of schedule (0 = no limit)")
    burstiness: float = _option(1.0, "gamma shape: 1 = poisson, <1 burstier, >1 more regular")
    trace: str = _option("", "timestamps file for timing_mode=trace (or a saved schedule.csv)")
    seed: int = _option(0, "seed for the schedule and the query draw")
    timeout: float = _option(60.0, "seconds per request from its send, then it fails; no retry")
    queries: str = _option("", "query file, one per line ('' = built-in list for the demo corpus)")
    k: int = _option(2, "documents to retrieve, sent with every query")
    max_in_flight: int = _option(0, "cap on concurrent requests (0 = none); waiting is latency")
    stop_grace: float = _option(5.0, "seconds to wait for in-flight requests after Ctrl-C")
    out: str = _option("", "per-request CSV path; summary/schedule/meta files go beside it")
    tag: str = _option("", "run label added to every row and the summary")
    progress: bool = _option(True, "live progress line on stderr when it is a terminal")


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


def format_summary(s: dict[str, Any]) -> str:
    """A few lines a person can read at a glance."""

    def ms(key: str) -> str:
        return f"{s[key] * 1e3:.1f}"

    failed = ", ".join(
        f"{k.removeprefix('failed_')} {v}" for k, v in s.items() if k.startswith("failed_") and v
    )
    pct = "  ".join(f"p{p} {ms(f'latency_p{p}_s')}" for p in (50, 90, 95, 99))
    adj = "  ".join(f"p{p} {ms(f'latency_adj_p{p}_s')}" for p in (50, 90, 95, 99))
    valid = "yes" if s["valid"] else f"NO ({s['invalid_reason']})"
    return "\n".join(
        [
            f"requests   scheduled {s['scheduled']}  sent {s['sent']}  ok {s['ok']}"
            f"  failed {s['failed']}" + (f" ({failed})" if failed else ""),
            f"rate /s    target {s['target_rps']:.1f}  schedule {s['schedule_rps']:.1f}"
            f"  achieved send {s['achieved_send_rps']:.1f}"
            f"  throughput {s['throughput_rps']:.1f}",
            f"latency ms mean {ms('latency_mean_s')}  {pct}  max {ms('latency_max_s')}"
            f"  (from schedule, ok only, percentiles numpy {s['percentile_method']})",
            f"adjusted   {adj}  (failures as +inf)",
            f"service ms p50 {ms('service_latency_p50_s')}  p99 {ms('service_latency_p99_s')}",
            f"send lag   p50 {ms('send_lag_p50_s')}  p99 {ms('send_lag_p99_s')}"
            f"  max {ms('send_lag_max_s')} ms  late >5 ms {s['late_fraction']:.2%}",
            f"valid      {valid}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """Options named after LoadConfig's fields (`--timing_mode`, `--num_requests`, ...)."""
    parser = argparse.ArgumentParser(
        prog="python -m rag.loadgen",
        description="Open-loop load generator: sends a seeded schedule to the RAG service,"
        " writes one CSV row per request and prints a summary.",
    )
    for f in fields(LoadConfig):
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(
                f"--{f.name}",
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
        else:
            parser.add_argument(
                f"--{f.name}", type=type(f.default), default=f.default, help=help_text
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = LoadConfig(**vars(parser.parse_args(argv)))
    try:
        _, summary = run_load(config)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(format_summary(summary))
    if config.out:
        print(f"wrote      {config.out} and its summary, schedule and meta files")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
