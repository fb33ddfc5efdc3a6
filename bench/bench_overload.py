"""The batched server under 10x overload, on the default models: does admission by deadline
keep it useful?

Saturated windows (closed loop, 2 x max_batch_size clients) alternate with overload
windows (an open-loop poisson schedule from the load generator at `--overload` x the first
saturated rate), S O S O S O S, and each overload window's goodput (answers per second) is
divided by the mean of the saturated windows just before and after it: this machine's
speed swings within minutes, so a ratio is only taken between neighbours.  Every request
has the same deadline (`--deadline`, the server's `variant.request_timeout_s`).

Targets: goodput >= 0.9 x saturated throughput (median of the rounds); p50 time to a
refusal (from the scheduled send, all rounds) <= 50 ms; no answer served past its
deadline.  Rates are counted between batch completions (a burst of answers is one batch),
so a window never holds a fraction of a batch.  The clients run in this process at a lower
CPU priority than the server (nice +10), so on a 2-core machine the server's figures are
not charged for the load generator's CPU; any delay that costs the client shows up in its
latencies (measured from the scheduled send), never in the server's favour.

    python bench/bench_overload.py [--deadline 10] [--rounds 3] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load
from rag.loadgen.files import environment
from rag.loadgen.schedule import load_queries

RECORDS = Path(__file__).resolve().parent.parent / "outputs" / "bench"
BURST_GAP_S = 0.05  # answers closer than this came from one batch
CLIENT_NICENESS = 10


def rate_between_bursts(times: list[float], start: float, end: float) -> float:
    """Answers per second from the end of the first burst of completions in [start, end] to
    the end of the last one, counting the bursts after the first: whole batches only."""
    inside = sorted(t for t in times if start <= t <= end)
    gaps = np.diff(inside, append=np.inf)
    ends = [t for t, gap in zip(inside, gaps, strict=True) if gap > BURST_GAP_S]
    if len(ends) < 2:
        return float("nan")
    counted = sum(1 for t in inside if ends[0] < t <= ends[-1])
    return counted / (ends[-1] - ends[0])


async def saturate(url: str, clients: int, seconds: float, warmup_s: float) -> float:
    """Closed loop: each client posts, waits for the answer, posts again."""
    queries = load_queries("")
    done: list[float] = []
    start = time.perf_counter()
    stop_at = start + warmup_s + seconds

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        i = n
        while time.perf_counter() < stop_at:
            body = {"query": queries[i % len(queries)], "k": 2}
            async with session.post(f"{url}/rag", json=body) as response:
                await response.read()
                if response.status == 200:
                    done.append(time.perf_counter())
            i += clients

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        await asyncio.gather(*(client(n, session) for n in range(clients)))
    return rate_between_bursts(done, start + warmup_s, stop_at)


def overload(url: str, rps: float, args: argparse.Namespace, out: Path) -> list[dict]:
    """One open-loop window; the rows of its requests."""
    load = LoadConfig(
        target=url,
        timing_mode="poisson",
        rps=rps,
        duration=args.seconds,
        num_requests=0,
        timeout=args.deadline + 60,  # the client never cuts a request the server holds
        progress=False,
        out=str(out),
    )
    rows, _ = run_load(load)
    return rows


def judge(name: str, figure: float, bound: float, at_least: bool, unit: str = "") -> dict:
    met = bool(figure >= bound if at_least else figure <= bound)
    criterion = f"{'>=' if at_least else '<='} {bound:g}{unit}"
    print(f"{name}: {figure:.3g}{unit}  [target {criterion}]  {'met' if met else 'MISSED'}")
    return {"name": name, "figure": figure, "criterion": criterion, "met": met}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=10.0, help="request deadline, s")
    parser.add_argument("--rounds", type=int, default=3, help="overload windows")
    parser.add_argument("--seconds", type=float, default=30.0, help="overload window length")
    parser.add_argument("--saturate-seconds", type=float, default=15.0)
    parser.add_argument("--overload", type=float, default=10.0, help="x saturated throughput")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    overrides = ["variant=batched", f"variant.request_timeout_s={args.deadline}"]
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    # Goodput counts from when the queue can have filled to the deadline's worth of work.
    settle_s = min(args.deadline, args.seconds / 2)

    rows: list[dict] = []
    rounds: list[dict] = []
    with ServerProcess(overrides) as server:
        runtime = httpx.get(f"{server.url}/stats").json()
        clients = 2 * runtime["max_batch_size"]
        os.nice(CLIENT_NICENESS)  # this thread only: the server started before

        def saturated() -> float:
            return asyncio.run(saturate(server.url, clients, args.saturate_seconds, 5.0))

        before = saturated()
        rps = args.overload * before
        print(f"saturated: {before:.2f} answers/s; overload: poisson {rps:.1f}/s", flush=True)
        for n in range(args.rounds):
            window = overload(server.url, rps, args, RECORDS / f"overload-{stamp}" / f"{n}.csv")
            after = saturated()
            served = [r["done_s"] for r in window if r["status"] == 200 and r["error"] is None]
            goodput = rate_between_bursts(served, settle_s, args.seconds)
            ratio = goodput / ((before + after) / 2)
            print(f"round {n}: goodput {goodput:.2f}/s between saturated {before:.2f} and "
                  f"{after:.2f}: {ratio:.3f}", flush=True)  # fmt: skip
            rounds.append({"saturated_before": before, "goodput": goodput,
                           "saturated_after": after, "ratio": ratio})  # fmt: skip
            rows += window
            before = after
        stats = httpx.get(f"{server.url}/stats").json()

    served_rows = [r for r in rows if r["status"] == 200 and r["error"] is None]
    refused = [r for r in rows if r["status"] is not None and r["status"] != 200]
    refusal_p50 = float(np.median([r["latency_s"] for r in refused])) if refused else np.nan
    late = sum(1 for r in served_rows if r["server_total_ms"] > args.deadline * 1e3)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    print(f"requests: {len(rows)}; by status {statuses}")

    median_ratio = statistics.median(r["ratio"] for r in rounds)
    targets = [
        judge("goodput / saturated (median of rounds)", median_ratio, 0.9, at_least=True),
        judge("p50 time to a refusal", refusal_p50 * 1e3, 50, at_least=False, unit=" ms"),
        judge("answers served past their deadline", late, 0, at_least=False),
    ]
    record = {
        "bench": "overload",
        "settings": vars(args),
        "targets": targets,
        "results": {
            "rounds": rounds,
            "overload_rps": rps,
            "refusal_latency_p50_s": refusal_p50,
            "served_latency_max_s": max((r["latency_s"] for r in served_rows), default=None),
            "statuses": statuses,
            "server_stats": stats,
        },
        "environment": {
            **environment(vars(args), len(rows), rps),
            "cpu_model": _cpu_model(),
            "runtime": runtime["runtime"],
            "client_niceness": CLIENT_NICENESS,
        },
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"overload-{stamp}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"record: {path.relative_to(RECORDS.parent.parent)}")
    missed = [t["name"] for t in targets if not t["met"]]
    return 1 if args.check and missed else 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
