"""The continuous variant against the batched one on the same open-loop load, on the default
models with answers of natural length (EOS ends them, no `ignore_eos`), or on another
model preset (`--model a6000-shaped` on a GPU: random weights, every answer 32 tokens).

The batched server's capacity is measured first (the load generator's closed loop, 2 x
max_batch_size users); then each round sends one poisson schedule at `--load` x that
capacity to each server, the two one after the other in alternating order, the same seed
for both (the same arrival times and queries).  Latency is from each request's scheduled
send, a failed request counting as infinitely late.  Targets, as the median of per-round
ratios continuous / batched: p50 <= 0.5, p99 <= 0.7, throughput >= 1.0.  Both servers run
the engine (the default), so the difference is the batching alone.

    python bench/bench_continuous.py [--seconds 40] [--rounds 2] [--load 0.7 | --rps R]
        [--model PRESET] [--override OVERRIDE ...] [--continuous OVERRIDE ...]
        [--burst-gap 0.1] [--check]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime

import httpx
from bench_overload import CLIENT_NICENESS
from bench_serve import BURST_GAP_S, saturated_rps
from record import RECORD_DIR, BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load

VARIANTS = ("batched", "continuous")
TARGETS = {  # figure: (continuous / batched bound, at most?)
    "latency_adj_p50_s": (0.5, True),
    "latency_adj_p99_s": (0.7, True),
    "throughput_rps": (1.0, False),
}


def open_loop(url: str, rps: float, seconds: float, seed: int, out: str) -> dict:
    load = LoadConfig(
        target=url,
        timing_mode="poisson",
        rps=rps,
        duration=seconds,
        num_requests=0,
        seed=seed,
        timeout=120,
        progress=False,
        out=out,
    )
    return run_load(load)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="schedule length per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.7, help="x batched capacity")
    parser.add_argument(
        "--rps", type=float, default=0.0,
        help="a fixed offered load instead (runs of different capacity stay comparable)",
    )  # fmt: skip
    parser.add_argument("--saturate-seconds", type=float, default=15.0)
    parser.add_argument("--model", default="", help="model preset of both servers")
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="OVERRIDE",
        help="config overrides for both servers (e.g. model.max_new_tokens=64)",
    )  # fmt: skip
    parser.add_argument(
        "--continuous", nargs="*", default=[], metavar="OVERRIDE",
        help="config overrides for the continuous server only (e.g. model.max_prefill_tokens=256)",
    )  # fmt: skip
    parser.add_argument(
        "--burst-gap", type=float, default=BURST_GAP_S,
        help="seconds between two batches' answers while measuring capacity (less on a GPU)",
    )  # fmt: skip
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("continuous", vars(args))
    runs = RECORD_DIR / f"continuous-{datetime.now():%Y%m%d-%H%M%S}"

    both = [f"model={args.model}"] if args.model else []
    both += args.override
    with (
        ServerProcess(["variant=batched", *both]) as batched,
        ServerProcess(["variant=continuous", *both, *args.continuous]) as continuous,
    ):
        urls = {"batched": batched.url, "continuous": continuous.url}
        clients = 2 * httpx.get(f"{batched.url}/stats").json()["max_batch_size"]
        os.nice(CLIENT_NICENESS)  # this process only: the servers started before
        gap = args.burst_gap
        capacity, _ = saturated_rps(batched.url, clients, 5.0, args.saturate_seconds, gap)
        rps = args.rps or args.load * capacity
        print(f"batched capacity {capacity:.2f} answers/s; load poisson {rps:.2f}/s", flush=True)
        rounds: list[dict] = []
        for n in range(args.rounds):
            order = VARIANTS if n % 2 == 0 else VARIANTS[::-1]
            summaries = {
                name: open_loop(urls[name], rps, args.seconds, n, str(runs / f"{n}-{name}.csv"))
                for name in order
            }
            ratios = {
                key: summaries["continuous"][key] / summaries["batched"][key] for key in TARGETS
            }
            for name in VARIANTS:
                s = summaries[name]
                print(f"round {n} {name}: p50 {s['latency_adj_p50_s']:.2f} s, p99 "
                      f"{s['latency_adj_p99_s']:.2f} s, {s['throughput_rps']:.2f}/s, "
                      f"{s['ok']}/{s['scheduled']} ok", flush=True)  # fmt: skip
            rounds.append({"summaries": summaries, "ratios": ratios})
        stats = {name: httpx.get(f"{url}/stats").json() for name, url in urls.items()}

    for key, (bound, at_most) in TARGETS.items():
        figure = statistics.median(r["ratios"][key] for r in rounds)
        each = ", ".join(f"{r['ratios'][key]:.2f}" for r in rounds)
        name = f"continuous / batched {key.removesuffix('_s').replace('latency_adj_', '')}"
        if at_most:
            record.target(name, figure, at_most=bound, detail=f"rounds {each}")
        else:
            record.target(name, figure, at_least=bound, detail=f"rounds {each}")
    record.note(runtime=stats["continuous"]["runtime"], client_niceness=CLIENT_NICENESS)
    record.results.update(
        batched_capacity_rps=capacity,
        load_rps=rps,
        rounds=rounds,
        running_batch_per_step=stats["continuous"]["batch_size_counts"],
        batched_batch_sizes=stats["batched"]["batch_size_counts"],
        rows=str(runs),
    )
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
