"""Does the load generator keep its schedule, on a quiet machine and on a shared one?

    flock -x /tmp/ragbench-cpu.lock .venv/bin/python bench/bench_loadgen.py [--check]

A trivial HTTP endpoint runs in its own process and streams each answer as `POST /rag` does
with `"stream": true`: a docs event, `--tokens` token events written one by one, and a done
event, so the client reads and times every event as in a real run.  The load generator
sends it an ideal and a poisson schedule (default 2,000 requests/s, 10,000 requests) on
asyncio's event loop (its own) and on uvloop (for comparison), with the machine quiet,
while a busy-loop process that this script starts keeps one core busy (a client sharing a
small machine with the service or another job), and while two such processes keep both
cores busy.  The order is interleaved, and the whole set is repeated.

Criterion, for quiet and one core busy, per schedule, on asyncio's loop and the median of
the repeats (the worst is shown beside it): p99 send lag <= 2 ms, achieved send rate within
1 % of the schedule's own rate, and no failed request.  With both cores busy the figures
are recorded, not judged (no client keeps a schedule on a machine with no core to spare).
Each run records the machine's load beside its figures: the load average and the cores
busy over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil
import uvloop
from record import BenchRecord, add_check_option

from rag.loadgen import LoadConfig, run_load_async

MAX_LAG_P99_S = 0.002
MAX_RATE_ERROR = 0.01
DOCS = b'event: docs\ndata: {"query": "q", "docs": []}\n\n'
TOKEN = b'event: token\ndata: {"text": "w ", "tokens": %d}\n\n'
DONE = (
    b'event: done\ndata: {"result": "r", "timings": {"total_ms": 0.1}, "batch_size": 1,'
    b' "usage": {"prompt_tokens": 8, "completion_tokens": %d}}\n\n'
)
LOOPS = {"asyncio": None, "uvloop": uvloop.new_event_loop}  # the first is the client's own
BUSY_CORES = {"quiet": 0, "one core busy": 1, "both cores busy": 2}
JUDGED = ("quiet", "one core busy")


def serve(tokens: int) -> None:
    """The trivial endpoint: reads the request, streams a fixed tiny answer of `tokens`
    token events, each its own write."""
    from aiohttp import web

    async def rag(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(DOCS)
        for i in range(tokens):
            await response.write(TOKEN % (i + 1))
        await response.write(DONE % tokens)
        await response.write_eof()
        return response

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/rag", rag)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        print(runner.addresses[0][1], flush=True)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.run_forever()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_on(loop: str, config: LoadConfig) -> dict[str, Any]:
    """One load run on the named event loop; its summary."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(run_load_async(config))[1]


def measure(url: str, server: psutil.Process, loop: str, mode: str, rate: float, n: int) -> dict:
    """One run; its send accuracy, the client's and server's CPU (cores), and the load."""
    config = LoadConfig(target=url, timing_mode=mode, rps=rate, num_requests=n, timeout=10.0,
                        progress=False)  # fmt: skip
    load_before = os.getloadavg()[0]
    psutil.cpu_percent()  # starts the machine-wide count
    server_before = sum(server.cpu_times()[:2])
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    s = run_on(loop, config)
    wall = time.perf_counter() - wall_before
    return {
        "loop": loop,
        "timing_mode": mode,
        "rps": rate,
        "num_requests": n,
        "schedule_rps": s["schedule_rps"],
        "achieved_send_rps": s["achieved_send_rps"],
        "rate_error": abs(s["achieved_send_rps"] / s["schedule_rps"] - 1),
        "send_lag_p50_ms": s["send_lag_p50_s"] * 1e3,
        "send_lag_p99_ms": s["send_lag_p99_s"] * 1e3,
        "send_lag_max_ms": s["send_lag_max_s"] * 1e3,
        "late_fraction": s["late_fraction"],
        "failed": s["failed"],
        "output_tokens": s["output_tokens_total"],  # every token event read and counted
        "ttft_p50_ms": s["ttft_p50_s"] * 1e3,
        "client_cores": (cpu_seconds() - cpu_before) / wall,
        "server_cores": (sum(server.cpu_times()[:2]) - server_before) / wall,
        "machine_busy_cores": psutil.cpu_percent() / 100 * (os.cpu_count() or 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def show(run: dict[str, Any]) -> None:
    print(
        f"{run['machine']:15} {run['timing_mode']:8} {run['loop']:8}"
        f" {run['schedule_rps']:8.1f} {run['rate_error']:8.4%} {run['send_lag_p50_ms']:7.3f}"
        f" {run['send_lag_p99_ms']:7.3f} {run['send_lag_max_ms']:7.2f} {run['failed']:6d}"
        f" {run['client_cores']:6.2f} {run['server_cores']:6.2f}"
        f" {run['machine_busy_cores']:6.2f} {run['load_average_before']:5.2f}",
        flush=True,
    )


def busy_cores(n: int) -> list[subprocess.Popen]:
    """`n` other processes, each keeping one core busy until stopped."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5 if busy else 0)
    return busy


def judge(record: BenchRecord, runs: list[dict[str, Any]], rate: float, n: int) -> None:
    """The targets, on the client's own loop and the median of its repeats (one disturbed
    repeat does not decide); the worst repeat and uvloop's median beside it."""
    own, other = list(LOOPS)
    for machine in JUDGED:
        for mode in ("ideal", "poisson"):
            these = [r for r in runs if r["machine"] == machine and r["timing_mode"] == mode]
            mine = [r for r in these if r["loop"] == own]
            lag = [r["send_lag_p99_ms"] for r in mine]
            theirs = [r["send_lag_p99_ms"] for r in these if r["loop"] == other]
            label = f"{mode} {rate:.0f}/s x {n} streamed, {machine}"
            record.target(
                f"{label}: p99 send lag, median of {len(mine)}",
                statistics.median(lag),
                at_most=MAX_LAG_P99_S * 1e3,
                unit=" ms",
                detail=f"worst {max(lag):.2f} ms; {other}: median {statistics.median(theirs):.2f}"
                f" ms, worst {max(theirs):.2f} ms",
            )
            error = [r["rate_error"] * 100 for r in mine]
            record.target(
                f"{label}: achieved vs schedule rate, median of {len(mine)}",
                statistics.median(error),
                at_most=MAX_RATE_ERROR * 100,
                unit=" %",
                fmt=".3f",
                detail=f"worst {max(error):.3f} %",
            )
    judged = [r for r in runs if r["machine"] in JUDGED]
    record.target("failed requests, judged runs", sum(r["failed"] for r in judged), at_most=0,
                  fmt=".0f")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=2000.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=10000, help="requests per run")
    parser.add_argument("--repeats", type=int, default=3, help="times the whole set is run")
    parser.add_argument("--tokens", type=int, default=4, help="token events per answer")
    add_check_option(parser)
    args = parser.parse_args()
    if args.serve:
        serve(args.tokens)
        return

    record = BenchRecord("loadgen", vars(args))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--tokens", str(args.tokens)],
        stdout=subprocess.PIPE,
        text=True,
    )
    runs: list[dict[str, Any]] = []
    try:
        url = f"http://127.0.0.1:{proc.stdout.readline().strip()}"
        server = psutil.Process(proc.pid)
        for loop in LOOPS:  # warm-up, not judged
            measure(url, server, loop, "ideal", 500.0, 500)
        print(
            "# cores: client/server CPU time per second; busy: machine-wide; load: 1-min avg\n"
            "machine         mode     loop     schedule rate err lag p50 lag p99 lag max failed"
            " client server   busy  load"
        )
        for _ in range(args.repeats):
            for machine, cores in BUSY_CORES.items():
                busy = busy_cores(cores)
                try:
                    for mode in ("ideal", "poisson"):
                        for loop in LOOPS:
                            run = measure(url, server, loop, mode, args.rate, args.requests)
                            run["machine"] = machine
                            runs.append(run)
                            show(run)
                finally:
                    for process in busy:
                        process.kill()
                        process.wait()
    finally:
        proc.terminate()
        proc.wait(10)
    record.results["runs"] = runs
    judge(record, runs, args.rate, args.requests)
    sys.exit(record.finish(args.check))


if __name__ == "__main__":
    main()
