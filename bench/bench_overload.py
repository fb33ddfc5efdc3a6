"""The batched server under 10x overload (the default models unless `--model` names
another): does admission by deadline keep it useful, and does HTTP work leave the compute
its pace?

Saturated windows (the load generator's closed loop, 2 x max_batch_size users) alternate
with overload windows (an open-loop poisson schedule from the load generator at
`--overload` x the first saturated rate), S O S O S O S, and each overload window's
goodput (answers per second) is divided by the mean of the saturated windows just before
and after it: this machine's speed swings within minutes, so a ratio is only taken between
neighbours.  Every request has the same deadline (`--deadline`, the server's
`variant.request_timeout_s`).

Targets: goodput >= 0.9 x saturated throughput (median of the rounds); p50 time to a
refusal (from the scheduled send, all rounds) <= 50 ms; no answer served past its
deadline.  Rates are counted between burst ends (a batch's answers arrive together), as
`bench_serve.py` counts them, so a window never holds a fraction of a batch.  The clients
run in this process at a lower CPU priority than the server (nice +10), so on a 2-core
machine the server's figures are not charged for the load generator's CPU; any delay that
costs the client shows up in its latencies (measured from the scheduled send), never in
the server's favour.

    python bench/bench_overload.py [--model tiny] [--deadline 10] [--rounds 3] [--check]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime

import httpx
import numpy as np
from bench_serve import burst_ends, saturated_rps
from record import RECORD_DIR, BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load

CLIENT_NICENESS = 10


def rate_between_bursts(times: list[float], start: float, end: float) -> float:
    """Answers per second from the first burst end in [start, end] to the last one."""
    inside = sorted(t for t in times if start <= t <= end)
    ends = burst_ends([*inside, np.inf])
    if len(ends) < 2:
        return float("nan")
    return sum(1 for t in inside if ends[0] < t <= ends[-1]) / (ends[-1] - ends[0])


def overload(url: str, rps: float, args: argparse.Namespace, out: str) -> list[dict]:
    """One open-loop window; the rows of its requests."""
    load = LoadConfig(
        target=url,
        timing_mode="poisson",
        rps=rps,
        duration=args.seconds,
        num_requests=0,
        timeout=args.deadline + 60,  # the client never cuts a request the server holds
        progress=False,
        out=out,
    )
    rows, _ = run_load(load)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=10.0, help="request deadline, s")
    parser.add_argument("--rounds", type=int, default=3, help="overload windows")
    parser.add_argument("--seconds", type=float, default=30.0, help="overload window length")
    parser.add_argument("--saturate-seconds", type=float, default=15.0)
    parser.add_argument("--overload", type=float, default=10.0, help="x saturated throughput")
    parser.add_argument("--model", default="", help="a model preset (default: the config's)")
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("overload", vars(args))
    overrides = ["variant=batched", f"variant.request_timeout_s={args.deadline}"]
    if args.model:
        overrides.append(f"model={args.model}")
    runs = RECORD_DIR / f"overload-{datetime.now():%Y%m%d-%H%M%S}"
    # Goodput counts from when the queue can have filled to the deadline's worth of work.
    settle_s = min(args.deadline, args.seconds / 2)

    rows: list[dict] = []
    rounds: list[dict] = []
    with ServerProcess(overrides) as server:
        runtime = httpx.get(f"{server.url}/stats").json()
        clients = 2 * runtime["max_batch_size"]
        os.nice(CLIENT_NICENESS)  # this thread only: the server started before

        def saturated() -> float:
            return saturated_rps(server.url, clients, 5.0, args.saturate_seconds)[0]

        before = saturated()
        rps = args.overload * before
        print(f"saturated: {before:.2f} answers/s; overload: poisson {rps:.1f}/s", flush=True)
        for n in range(args.rounds):
            window = overload(server.url, rps, args, str(runs / f"{n}.csv"))
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
    record.target("goodput / saturated (median of rounds)", median_ratio, at_least=0.9, fmt=".3f")
    record.target("p50 time to a refusal", refusal_p50 * 1e3, at_most=50, unit=" ms")
    record.target("answers served past their deadline", late, at_most=0, fmt=".0f")
    record.note(runtime=runtime["runtime"], client_niceness=CLIENT_NICENESS, rows=str(runs))
    record.results.update(
        rounds=rounds,
        overload_rps=rps,
        refusal_latency_p50_s=refusal_p50,
        served_latency_max_s=max((r["latency_s"] for r in served_rows), default=None),
        statuses=statuses,
        server_stats=stats,
    )
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
