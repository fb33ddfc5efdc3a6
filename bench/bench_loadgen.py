"""How fast can the load generator keep its schedule on this machine?

    flock /tmp/ragbench-bench.lock .venv/bin/python bench/bench_loadgen.py

Runs a trivial HTTP endpoint in a separate process (so the client's CPU is measurable on
its own), then the load generator on an ideal schedule at 200, 1000, 2000 and 4000
requests/s for a few seconds each, and searches upward for the highest rate that still
holds.  A rate holds when the achieved send rate is within 1% of the schedule's and the
p99 send lag is at most 2 ms.  Prints one line per run and the highest rate that held.

CPU columns are process CPU time / wall time (100% = one core).  The client's includes its
yield-spin in the last 1.5 ms before each send, so from about 700 requests/s up, where
sends are closer together than that, it reads about 100% whatever the real work is.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import psutil

from rag.loadgen import LoadConfig, run_load

MAX_LAG_S = 0.002
MIN_RATE_RATIO = 0.99
ANSWER = b'{"query": "q", "result": "r", "timings": {"total_ms": 0.1}, "batch_size": 1}'


def serve() -> None:
    """The trivial endpoint: reads the request, answers a fixed tiny JSON."""
    from aiohttp import web

    async def rag(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/rag", rag)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        print(runner.addresses[0][1], flush=True)

    import asyncio

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.run_forever()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, server: psutil.Process, rate: float, seconds: float) -> dict:
    """One run at `rate`; the client's and the server's CPU use over it."""
    config = LoadConfig(
        target=url,
        timing_mode="ideal",
        rps=rate,
        num_requests=int(rate * seconds),
        timeout=10.0,
        progress=False,
    )
    server_before = sum(server.cpu_times()[:2])
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    _, s = run_load(config)
    wall = time.perf_counter() - wall_before
    client_cpu = (cpu_seconds() - cpu_before) / wall
    server_cpu = (sum(server.cpu_times()[:2]) - server_before) / wall
    ratio = s["achieved_send_rps"] / s["schedule_rps"]
    holds = ratio >= MIN_RATE_RATIO and s["send_lag_p99_s"] <= MAX_LAG_S and s["failed"] == 0
    print(
        f"{rate:8.0f} {s['schedule_rps']:9.1f} {s['achieved_send_rps']:9.1f} {ratio:7.4f}"
        f" {s['send_lag_p50_s'] * 1e3:8.3f} {s['send_lag_p99_s'] * 1e3:8.3f}"
        f" {s['send_lag_max_s'] * 1e3:8.2f} {s['late_fraction']:7.2%}"
        f" {s['latency_p50_s'] * 1e3:8.2f} {s['latency_p99_s'] * 1e3:8.2f}"
        f" {s['failed']:6d} {client_cpu:7.0%} {server_cpu:7.0%}  {'yes' if holds else 'no'}",
        flush=True,
    )
    return {"rate": rate, "holds": holds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--rates", default="200,1000,2000,4000", help="fixed rates to run")
    parser.add_argument("--search", type=int, default=6, help="extra runs to find the limit")
    args = parser.parse_args()
    if args.serve:
        serve()
        return

    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{proc.stdout.readline().strip()}"
        server = psutil.Process(proc.pid)
        print(
            f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f};"
            f" {args.seconds:g} s per rate; holds = achieved >= {MIN_RATE_RATIO:.0%} of"
            f" schedule and p99 lag <= {MAX_LAG_S * 1e3:g} ms and no failures"
        )
        print(
            "    rate  schedule  achieved   ratio  lag p50  lag p99  lag max  late>5"
            "   lat p50  lat p99 failed  client  server  holds"
        )
        measure(url, server, 200, 1.0)  # warm-up, not judged
        print("# measured")
        results = [measure(url, server, float(r), args.seconds) for r in args.rates.split(",")]
        best = max((r["rate"] for r in results if r["holds"]), default=0.0)
        low, high = best, None
        for _ in range(args.search if best else 0):  # grow by 25% until a rate fails, then bisect
            rate = low * 1.25 if high is None else (low + high) / 2
            if measure(url, server, round(rate), args.seconds)["holds"]:
                low = round(rate)
            else:
                high = round(rate)
            if high is not None and high - low <= max(100, 0.03 * low):
                break
        print(f"# highest rate that held: {low:.0f} requests/s (first failing: {high})")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
