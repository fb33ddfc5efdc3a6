"""One sweep point end to end: start the variant, warm it up, send the load, stop it, and
write `requests.csv`, `summary.csv` and `meta.json` into the point's folder.

Whatever goes wrong becomes `failure.json` (the reason and the log's tail) and the sweep
goes on; a point whose summary exists is skipped, so a sweep run again resumes.  The
variant's processes run in their own process group and are stopped on every way out:
success, error, Ctrl-C, or SIGTERM (what SLURM sends a cancelled job).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rag.cluster.process import ServerProcess, http_get
from rag.config import ServerKind, batch_limits
from rag.harness.environment import point_environment
from rag.harness.files import (
    FAILURE,
    SUMMARY,
    file_tail,
    is_finished,
    now,
    write_failure,
)
from rag.harness.search import run_search
from rag.loadgen import ROW_COLUMNS, LoadConfig, run_load_async
from rag.storage import write_csv, write_json

log = logging.getLogger("rag.harness")
SERVER_LOG = "server.log"
Rows = list[dict[str, Any]]


class Cancelled(BaseException):
    """SIGTERM arrived (a cancelled SLURM job): unwind, stopping what was started."""


@dataclass
class Point:
    """One point of a sweep: its config, its folder and the overrides that name it."""

    cfg: DictConfig
    folder: Path
    overrides: list[str]
    started: str = field(default_factory=now)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def external(self) -> bool:
        return self.cfg.variant.kind is ServerKind.external

    def columns(self) -> dict[str, Any]:
        """What identifies the point in every CSV row: the tag, the folder, the main axes,
        and every overridden key with its value."""
        cfg = self.cfg
        variant = cfg.variant
        max_batch_size, max_wait_ms = batch_limits(variant)
        columns: dict[str, Any] = {
            "tag": cfg.tag,
            "point": self.name,
            "variant": variant.name,
            "model": "external" if self.external else cfg.model.name,
            "corpus": "external" if self.external else cfg.corpus.name,
            "offered_rps": cfg.load.rps,
            "timing_mode": cfg.load.timing_mode,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
        }
        for override in self.overrides:
            key = override.split("=", 1)[0].lstrip("+~")
            if key not in columns and OmegaConf.select(cfg, key) is not None:
                value = OmegaConf.select(cfg, key)
                columns[key] = value if not OmegaConf.is_config(value) else override
        return columns

    def load_config(self, target: str) -> LoadConfig:
        fields: dict[str, Any] = OmegaConf.to_container(self.cfg.load, resolve=True)  # type: ignore[assignment]
        return replace(LoadConfig(**fields), target=target, out="")


@contextmanager
def _sigterm_cancels() -> Iterator[None]:
    """Turn SIGTERM into `Cancelled` while the point runs (on the main thread only)."""

    def cancel(signum: int, frame: Any) -> None:
        raise Cancelled(f"signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, cancel)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _server_overrides(point: Point) -> list[str]:
    """The point's overrides as `rag.serve` takes them: the same tree composes the same
    variant, model and corpus."""
    return [*point.overrides, f"run_dir='{point.folder}'"]  # quoted: it holds '=' and ','


@contextmanager
def _variant(point: Point) -> Iterator[str]:
    """Start the point's variant and yield its URL; stop it on the way out."""
    if point.external:
        if not point.cfg.target:
            raise ValueError("variant=external needs target=http://host:port")
        yield point.cfg.target
        return
    harness = point.cfg.harness
    server = ServerProcess(
        _server_overrides(point),
        ready_timeout_s=harness.ready_timeout_s,
        log_path=point.folder / SERVER_LOG,
    )
    started = time.perf_counter()
    stop_timeout_s = harness.stop_timeout_s
    try:
        server.start()
        ready_s = time.perf_counter() - started
        log.info(f"{point.name}: {point.cfg.variant.name} ready in {ready_s:.1f} s")
        yield server.url
    except BaseException:
        stop_timeout_s = 2.0  # cancelled or failed: no long drain
        raise
    finally:
        server.stop(stop_timeout_s)


def _load(config: LoadConfig) -> tuple[Rows, dict[str, Any]]:
    return asyncio.run(run_load_async(config))


def _warm_up(point: Point, url: str) -> None:
    """A few requests one at a time, so the measured run starts on a warm server; none
    succeeding fails the point early, with the first error."""
    n = point.cfg.harness.warmup_requests
    if n <= 0:
        return
    config = replace(
        point.load_config(url), timing_mode="ideal", rps=1000.0, concurrency=0, num_requests=n,
        duration=0.0, max_in_flight=1, progress=False, tag="",
    )  # fmt: skip
    rows, summary = _load(config)
    if summary["ok"] == 0:
        error = f"{rows[0]['error']}: {rows[0]['error_detail']}"
        raise RuntimeError(f"warm-up: no request succeeded ({error})")


def _measure(point: Point, url: str) -> tuple[Rows, dict[str, Any], dict[str, Any]]:
    """The measured run (or the search of the highest rate that meets the target)."""
    config = point.load_config(url)
    if point.cfg.search is not None:
        return run_search(point.cfg.search, point.cfg.slo, config, _load, point.folder)
    size = f"{config.num_requests} requests" if config.num_requests else f"{config.duration:g} s"
    log.info(f"{point.name}: {config.timing_mode} load at {config.rps:g}/s, {size}")
    rows, summary = _load(config)
    return rows, summary, {}


def _stats(url: str) -> dict[str, Any]:
    """The server's own view (/stats: batch-size histogram, service rate), when it has one."""
    status, body = http_get(f"{url}/stats", timeout_s=5.0)
    return body if status == 200 else {}


def _write(point: Point, rows: Rows, summary: dict[str, Any], meta: dict[str, Any]) -> None:
    columns = point.columns()
    request_rows = [{**columns, **row} for row in rows]
    extra = sorted(set().union(*rows) - set(ROW_COLUMNS) - set(columns)) if rows else []
    write_csv(point.folder / "requests.csv", request_rows, [*columns, *ROW_COLUMNS, *extra])
    write_json(point.folder / "meta.json", meta)
    row = {**columns, **summary}
    write_csv(point.folder / SUMMARY, [row], list(row))  # last: marks the point done


def _describe(summary: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        value = summary.get(key, math.nan)
        return f"{value * 1e3:.0f} ms" if math.isfinite(value) else "-"

    behind = summary["schedule_kept_reason"]
    kept = "" if summary["schedule_kept"] else f"; CLIENT FELL BEHIND: {behind}"
    return (
        f"{summary['ok']}/{summary['scheduled']} ok, throughput {summary['throughput_rps']:.2f}/s,"
        f" p50 {ms('latency_p50_s')}, p99 {ms('latency_p99_s')}{kept}"
    )


def run_point(cfg: DictConfig, folder: Path, overrides: list[str]) -> dict[str, Any]:
    """Run one point into `folder`; {"status": "ok" | "skipped" | "failed", ...}.  Never
    raises for a failed point (the sweep goes on); Ctrl-C is re-raised after clean-up."""
    point = Point(cfg, folder, list(overrides))
    if is_finished(folder):
        log.info(f"{point.name}: already finished, skipped")
        return {"status": "skipped", "folder": str(folder)}
    (folder / FAILURE).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        with _sigterm_cancels(), _variant(point) as url:
            _warm_up(point, url)
            rows, summary, extra = _measure(point, url)
            server_stats = {} if point.external else _stats(url)
        meta = point_environment(point.cfg, point.overrides, point.started)
        meta.update(extra, server_stats=server_stats, server_controlled=not point.external)
        meta.update(target=url, duration_s=time.perf_counter() - started)
        _write(point, rows, summary, meta)
    except (Exception, Cancelled, KeyboardInterrupt) as exc:
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        write_failure(folder, reason, file_tail(folder / SERVER_LOG), overrides=overrides)
        log.error(f"{point.name}: FAILED, {reason} (see {folder / FAILURE})")
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"status": "failed", "reason": reason, "folder": str(folder)}
    log.info(f"{point.name}: {_describe(summary)}")
    return {"status": "ok", "folder": str(folder), "summary": summary}
