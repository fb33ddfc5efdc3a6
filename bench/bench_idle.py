"""Idle connections against the RAG server and the balancer: can a crowd of connections that
never send a request lock out real clients, or make a server's memory grow without bound?

    ragbench-bench .venv/bin/python bench/bench_idle.py [--check]

Each door is started for real with the simulated model (the batched server; the scaling
variant with one replica), with its default connection cap (as many as the open-files
limit allows, with headroom).  A holder process opens N connections to it, sends nothing,
and reopens each one the server closes, at once.  Meanwhile the load generator sends a
steady schedule of ordinary requests, and the door's resident memory is read.  Each door
is measured quiet, with 3,000 idle connections held, then with 10,000, in one run.

Targets, per door: with 3,000 held, >= 99 % of requests answered 200 and p50 within 2x of
quiet; with 10,000, >= 95 % still answered 200 and memory bounded: at most 16 KiB of
resident memory per connection held beyond quiet.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import subprocess
import sys
from pathlib import Path

import psutil
from record import BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load
from rag.web import raise_open_files_limit

DOORS = {
    "server": ["variant=batched", "model=simulated"],
    "balancer": ["variant=scaling", "model=simulated", "variant.scaling.max_replicas=1"],
}
CROWDS = (3000, 10_000)  # the targets are set for these


def hold(port: int, count: int) -> None:
    """Keep `count` connections open to 127.0.0.1:`port`, sending nothing; reopen each one
    the server closes.  Prints `held` once all are open, then runs until killed."""
    raise_open_files_limit()
    selector = selectors.DefaultSelector()

    def connect() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)

    for _ in range(count):
        connect()
    print("held", flush=True)
    while True:
        for key, _ in selector.select(timeout=1.0):
            sock = key.fileobj
            try:
                alive = sock.recv(1) != b""  # type: ignore[union-attr]
            except OSError:
                alive = False
            if not alive:
                selector.unregister(sock)
                sock.close()  # type: ignore[union-attr]
                connect()


def start_holder(port: int, count: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, __file__, "--hold", str(port), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "held":
        raise RuntimeError(f"the holder could not open {count} connections")
    return process


def measure(url: str, pid: int, rate: float, seconds: float) -> dict[str, float]:
    config = LoadConfig(target=url, timing_mode="ideal", rps=rate,
                        num_requests=int(rate * seconds), timeout=30.0, progress=False)  # fmt: skip
    rows, summary = run_load(config)
    return {
        "p50_ms": summary["latency_p50_s"] * 1e3,
        "p99_ms": summary["latency_p99_s"] * 1e3,
        "ok_fraction": sum(r["status"] == 200 for r in rows) / len(rows),
        "rss_mib": psutil.Process(pid).memory_info().rss / 2**20,
    }


def door_figures(
    name: str, crowds: list[int], rate: float, seconds: float, log_dir: Path
) -> dict[str, dict]:
    """Quiet, then each crowd held, against one door started here."""
    figures: dict[str, dict] = {}
    with ServerProcess(DOORS[name], log_path=log_dir / f"{name}.log") as door:
        assert door.process is not None
        measure(door.url, door.process.pid, rate, 1.0)  # warm up, not judged
        figures["quiet"] = measure(door.url, door.process.pid, rate, seconds)
        print(f"# {name} quiet: {figures['quiet']}", flush=True)
        for crowd in crowds:
            holder = start_holder(door.port, crowd)
            try:
                figures[str(crowd)] = measure(door.url, door.process.pid, rate, seconds)
            finally:
                holder.kill()
                holder.wait()
            print(f"# {name} {crowd} idle: {figures[str(crowd)]}", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=5.0, help="ordinary requests/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--crowds", type=int, nargs=2, default=CROWDS, help="idle connections")
    add_check_option(parser)
    args = parser.parse_args()
    if args.hold:
        hold(*args.hold)
        return 0
    raise_open_files_limit()
    record = BenchRecord("idle", {k: v for k, v in vars(args).items() if k != "hold"})
    log_dir = Path(__file__).resolve().parent.parent / "outputs" / "bench" / "idle-logs"
    for name in DOORS:
        figures = door_figures(name, args.crowds, args.rate, args.seconds, log_dir)
        record.results[name] = figures
        some_n, many_n = args.crowds
        quiet, some, many = figures["quiet"], figures[str(some_n)], figures[str(many_n)]
        record.target(f"{name}, {some_n:,} idle: answered 200", some["ok_fraction"] * 100,
                      at_least=99.0, unit=" %", fmt=".1f")  # fmt: skip
        slower = some["p50_ms"] / quiet["p50_ms"]
        record.target(f"{name}, {some_n:,} idle: p50 / quiet p50", slower, at_most=2.0,
                      detail=f"{some['p50_ms']:.1f} vs {quiet['p50_ms']:.1f} ms")  # fmt: skip
        record.target(f"{name}, {many_n:,} idle: answered 200", many["ok_fraction"] * 100,
                      at_least=95.0, unit=" %", fmt=".1f",
                      detail=f"p50 {many['p50_ms']:.1f} ms")  # fmt: skip
        per_connection = (many["rss_mib"] - quiet["rss_mib"]) * 1024 / many_n
        record.target(f"{name}, {many_n:,} idle: memory per connection", per_connection,
                      at_most=16.0, unit=" KiB", fmt=".1f",
                      detail=f"{quiet['rss_mib']:.0f} -> {many['rss_mib']:.0f} MiB")  # fmt: skip
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
