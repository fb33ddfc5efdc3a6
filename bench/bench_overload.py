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

The overload is only the server's if the client delivered it: per window the record keeps
how many scheduled requests were sent, how many on time (within the load generator's
5 ms), and the client's send lag.  A window whose client fell behind (a request not sent,
or more than a tenth of the sends late by over 100 ms: a small fraction of the deadline)
is said so and left out of the goodput figure.  The rate the client carries bounds what
can be measured, so every answer does fixed work (`model.ignore_eos=true`) of
`--tokens` new tokens: the default models' 32 (capacity ~9 answers/s, 10x ~90/s); with
`--model tiny`, 64 (capacity 70-95/s, 10x 700-950/s, which one client process on these
2-core machines carries; at its default 8 tokens the tiny model's 10x is over 2,000/s,
which it does not).

    python bench/bench_overload.py [--model tiny] [--tokens N] [--deadline 10] [--rounds 3]
        [--check]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime
from typing import Any

import httpx
import numpy as np
from bench_serve import burst_ends, saturated_rps
from record import RECORD_DIR, BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load
from rag.loadgen.stats import LATE_S as STRICT_LATE_S

CLIENT_NICENESS = 10
DEFAULT_TOKENS = {"tiny": 64}  # else the model's own max_new_tokens
LATE_S = 0.1  # a send later than this after its scheduled moment ...
MAX_LATE_FRACTION = 0.1  # ... for more than this fraction of sends: the client fell behind


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


def client_pace(rows: list[dict], rps: float) -> dict[str, Any]:
    """How well the client kept the window's schedule: requests sent, sent on time (within
    the load generator's own 5 ms, and within LATE_S), its send lag, and whether it kept up
    (every request sent, at most MAX_LATE_FRACTION of them later than LATE_S)."""
    lags = np.array([r["send_lag_s"] for r in rows if r["sent_s"] is not None])
    late = float(np.mean(lags > LATE_S)) if len(lags) else 1.0
    sent = len(lags)
    return {
        "offered_rps": rps,
        "scheduled": len(rows),
        "sent": sent,
        "sent_within_5ms": int(np.sum(lags <= STRICT_LATE_S)),
        f"sent_within_{LATE_S * 1e3:.0f}ms": int(np.sum(lags <= LATE_S)),
        "send_lag_p50_s": float(np.median(lags)) if sent else None,
        "send_lag_p99_s": float(np.percentile(lags, 99)) if sent else None,
        "send_lag_max_s": float(lags.max()) if sent else None,
        "client_kept_up": sent == len(rows) and late <= MAX_LATE_FRACTION,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline", type=float, default=10.0, help="request deadline, s")
    parser.add_argument("--rounds", type=int, default=3, help="overload windows")
    parser.add_argument("--seconds", type=float, default=30.0, help="overload window length")
    parser.add_argument("--saturate-seconds", type=float, default=15.0)
    parser.add_argument("--overload", type=float, default=10.0, help="x saturated throughput")
    parser.add_argument("--model", default="", help="a model preset (default: the config's)")
    parser.add_argument(
        "--tokens", type=int, default=0, help="new tokens per answer (0: the model's default)"
    )
    add_check_option(parser)
    args = parser.parse_args()
    args.tokens = args.tokens or DEFAULT_TOKENS.get(args.model, 0)
    record = BenchRecord("overload", vars(args))
    overrides = [
        "variant=batched",
        f"variant.request_timeout_s={args.deadline}",
        "model.ignore_eos=true",  # fixed work: saturated and overloaded windows compare
    ]
    if args.model:
        overrides.append(f"model={args.model}")
    if args.tokens:
        overrides.append(f"model.max_new_tokens={args.tokens}")
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
            pace = client_pace(window, rps)
            kept = "" if pace["client_kept_up"] else " (the client fell behind: not counted)"
            lag = pace["send_lag_p99_s"] or 0.0
            print(f"round {n}: goodput {goodput:.2f}/s between saturated {before:.2f} and "
                  f"{after:.2f}: {ratio:.3f}; sent {pace['sent']} of {pace['scheduled']}, "
                  f"send lag p99 {lag:.3f} s{kept}", flush=True)  # fmt: skip
            rounds.append({"saturated_before": before, "goodput": goodput,
                           "saturated_after": after, "ratio": ratio, **pace})  # fmt: skip
            rows += window
            before = after
        stats = httpx.get(f"{server.url}/stats").json()

    served_rows = [r for r in rows if r["status"] == 200 and r["error"] is None]
    refused = [r for r in rows if r["status"] is not None and r["status"] != 200]
    refusal_p50 = float(np.median([r["latency_s"] for r in refused])) if refused else np.nan
    refusal_service_p50 = (
        float(np.median([r["service_latency_s"] for r in refused])) if refused else np.nan
    )
    late = sum(1 for r in served_rows if r["server_total_ms"] > args.deadline * 1e3)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    print(f"requests: {len(rows)}; by status {statuses}")

    counted = [r["ratio"] for r in rounds if r["client_kept_up"]]
    median_ratio = statistics.median(counted) if counted else np.nan
    record.target(
        "goodput / saturated (median of rounds)",
        median_ratio,
        at_least=0.9,
        fmt=".3f",
        detail=f"{len(counted)} of {len(rounds)} windows delivered by the client",
    )
    record.target("p50 time to a refusal", refusal_p50 * 1e3, at_most=50, unit=" ms")
    record.target("answers served past their deadline", late, at_most=0, fmt=".0f")
    record.note(runtime=runtime["runtime"], client_niceness=CLIENT_NICENESS, rows=str(runs))
    record.results.update(
        rounds=rounds,
        overload_rps=rps,
        tokens_per_answer=statistics.median(r["output_tokens"] for r in served_rows)
        if served_rows
        else None,
        refusal_latency_p50_s=refusal_p50,
        refusal_service_latency_p50_s=refusal_service_p50,
        served_latency_max_s=max((r["latency_s"] for r in served_rows), default=None),
        statuses=statuses,
        server_stats=stats,
    )
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
