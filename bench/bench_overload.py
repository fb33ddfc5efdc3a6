"""The batched server under 10x overload, on the default models: does admission by deadline
keep it useful?

1. saturated throughput: closed loop, 2 x max_batch_size clients;
2. overload: an open-loop poisson schedule at 10x that rate from the load generator, each
   request with a `--deadline` (the server's `variant.request_timeout_s`).

Targets: goodput (answers per second while overloaded) >= 0.9 x saturated throughput;
p50 time to a refusal (from the scheduled send) <= 50 ms; no answer served past its
deadline.  Rates are counted between batch completions (a burst of answers is one batch),
so a window never holds a fraction of a batch.

    python bench/bench_overload.py [--deadline 20] [--seconds 60] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def judge(name: str, figure: float, bound: float, at_least: bool, unit: str = "") -> dict:
    met = bool(figure >= bound if at_least else figure <= bound)
    criterion = f"{'>=' if at_least else '<='} {bound:g}{unit}"
    print(f"{name}: {figure:.3g}{unit}  [target {criterion}]  {'met' if met else 'MISSED'}")
    return {"name": name, "figure": figure, "criterion": criterion, "met": met}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=20.0, help="request deadline, s")
    parser.add_argument("--seconds", type=float, default=60.0, help="overload schedule length")
    parser.add_argument("--saturate-seconds", type=float, default=30.0)
    parser.add_argument("--overload", type=float, default=10.0, help="x saturated throughput")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    overrides = ["variant=batched", f"variant.request_timeout_s={args.deadline}"]
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"

    with ServerProcess(overrides) as server:
        runtime = httpx.get(f"{server.url}/stats").json()
        batch = runtime["max_batch_size"]
        saturated = asyncio.run(saturate(server.url, 2 * batch, args.saturate_seconds, 5.0))
        rps = args.overload * saturated
        print(f"saturated: {saturated:.2f} answers/s; overload schedule: poisson {rps:.1f}/s")
        load = LoadConfig(
            target=server.url,
            timing_mode="poisson",
            rps=rps,
            duration=args.seconds,
            num_requests=0,
            timeout=args.deadline + 60,  # the client never cuts a request the server holds
            progress=False,
            out=str(RECORDS / f"overload-{stamp}" / "requests.csv"),
        )
        rows, summary = run_load(load)
        stats = httpx.get(f"{server.url}/stats").json()

    served = [r for r in rows if r["status"] == 200 and r["error"] is None]
    refused = [r for r in rows if r["status"] is not None and r["status"] != 200]
    unanswered = [r for r in rows if r["status"] is None]
    goodput = rate_between_bursts([r["done_s"] for r in served], 0.1 * args.seconds, args.seconds)
    refusal_p50 = float(np.median([r["latency_s"] for r in refused])) if refused else np.nan
    late = sum(1 for r in served if r["server_total_ms"] > args.deadline * 1e3)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    print(f"requests: {len(rows)}; by status {statuses}; unanswered {len(unanswered)}")

    targets = [
        judge("goodput / saturated", goodput / saturated, 0.9, at_least=True),
        judge("p50 time to a refusal", refusal_p50 * 1e3, 50, at_least=False, unit=" ms"),
        judge("answers served past their deadline", late, 0, at_least=False),
    ]
    record = {
        "bench": "overload",
        "settings": vars(args),
        "targets": targets,
        "results": {
            "saturated_rps": saturated,
            "overload_rps": rps,
            "goodput_rps": goodput,
            "refusal_latency_p50_s": refusal_p50,
            "served_latency_max_s": max((r["latency_s"] for r in served), default=None),
            "statuses": statuses,
            "unanswered": len(unanswered),
            "server_stats": stats,
            "load_summary": summary,
        },
        "environment": {
            **environment(vars(args), len(rows), rps),
            "cpu_model": _cpu_model(),
            "runtime": runtime["runtime"],
        },
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"overload-{stamp}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"record: {path}")
    missed = [t["name"] for t in targets if not t["met"]]
    return 1 if args.check and missed else 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
