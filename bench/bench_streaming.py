"""What streaming costs and where continuous batching pays, as users see tokens: the batched
and continuous servers side by side, on the default models (or `--model PRESET`).

Each round, for each server in alternating order: saturated output tokens/s with `stream`
off and on (a closed loop of 2 x max_batch_size users, the two modes one after the other);
then a poisson schedule at `--load` x the batched server's saturated answers/s (measured
in the same round, streaming off), streamed to both, timed to each answer's first token
from its scheduled send.  Targets, as the median over rounds: tokens/s streamed / not
>= 0.95 for each server; continuous TTFT p50 / batched's <= 0.3.

    ragbench-bench .venv/bin/python bench/bench_streaming.py [--seconds 20] [--rounds 2]
        [--load 0.7] [--model PRESET] [--override OVERRIDE ...] [--check]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import httpx
from bench_overload import CLIENT_NICENESS
from record import BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load

VARIANTS = ("batched", "continuous")


def saturated(url: str, users: int, seconds: float, stream: bool) -> dict[str, float]:
    """A closed loop of `users` for `seconds` through the load generator."""
    load = LoadConfig(target=url, timing_mode="concurrency", concurrency=users,
                      duration=seconds, num_requests=0, stream=stream, timeout=300,
                      progress=False)  # fmt: skip
    summary = run_load(load)[1]
    return {
        "tokens_per_s": summary["output_tokens_per_s"],
        "answers_per_s": summary["throughput_rps"],
        "failed": summary["failed"],
    }


def ttft(url: str, rps: float, seconds: float, seed: int) -> dict[str, float]:
    """A streamed poisson schedule: TTFT and e2e from each request's scheduled send."""
    load = LoadConfig(target=url, timing_mode="poisson", rps=rps, duration=seconds,
                      num_requests=0, seed=seed, timeout=300, progress=False)  # fmt: skip
    summary = run_load(load)[1]
    return {
        "ttft_p50_s": summary["ttft_p50_s"],
        "e2e_p50_s": summary["latency_adj_p50_s"],  # a failed request counts as never
        "failed": summary["failed"],
        "sent": summary["scheduled"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.7, help="x batched capacity")
    parser.add_argument("--model", default="", help="model preset of both servers")
    parser.add_argument("--override", nargs="*", default=[], metavar="OVERRIDE")
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("streaming", vars(args))
    both = [f"model={args.model}"] if args.model else []
    both += args.override
    with (
        ServerProcess(["variant=batched", *both]) as batched,
        ServerProcess(["variant=continuous", *both]) as continuous,
    ):
        urls = {"batched": batched.url, "continuous": continuous.url}
        users = {n: 2 * httpx.get(f"{u}/stats").json()["max_batch_size"] for n, u in urls.items()}
        os.nice(CLIENT_NICENESS)  # this process only: the servers started before
        rounds = []
        for n in range(args.rounds):
            order = VARIANTS if n % 2 == 0 else VARIANTS[::-1]
            modes = (False, True) if n % 2 == 0 else (True, False)
            figures: dict = {}
            for name in order:
                for stream in modes:
                    key = f"{name}_{'on' if stream else 'off'}"
                    figures[key] = saturated(urls[name], users[name], args.seconds, stream)
            rps = args.load * figures["batched_off"]["answers_per_s"]
            for name in order:
                figures[f"{name}_ttft"] = ttft(urls[name], rps, args.seconds, n)
            figures["load_rps"] = rps
            for name in VARIANTS:
                on, off, t = figures[f"{name}_on"], figures[f"{name}_off"], figures[f"{name}_ttft"]
                print(f"# round {n} {name}: {off['tokens_per_s']:.1f} tokens/s off, "
                      f"{on['tokens_per_s']:.1f} on; at {rps:.2f}/s TTFT p50 "
                      f"{t['ttft_p50_s']:.3f} s, e2e p50 {t['e2e_p50_s']:.3f} s, "
                      f"{t['failed']}/{t['sent']} failed", flush=True)  # fmt: skip
            rounds.append(figures)
        runtime = httpx.get(f"{continuous.url}/stats").json()["runtime"]

    for name in VARIANTS:
        ratios = [
            r[f"{name}_on"]["tokens_per_s"] / r[f"{name}_off"]["tokens_per_s"] for r in rounds
        ]
        each = ", ".join(f"{x:.3f}" for x in ratios)
        record.target(f"{name} tokens/s streamed / not", statistics.median(ratios),
                      at_least=0.95, detail=f"rounds {each}")  # fmt: skip
    ttft_ratios = [r["continuous_ttft"]["ttft_p50_s"] / r["batched_ttft"]["ttft_p50_s"]
                   for r in rounds]  # fmt: skip
    record.target("continuous / batched TTFT p50", statistics.median(ttft_ratios), at_most=0.3,
                  detail=f"at {args.load:g} x batched capacity, rounds "
                  + ", ".join(f"{x:.3f}" for x in ttft_ratios))  # fmt: skip
    failed = sum(f["failed"] for r in rounds for k, f in r.items() if isinstance(f, dict))
    record.target("failed requests", failed, at_most=0, fmt=".0f")
    record.note(runtime=runtime, client_niceness=CLIENT_NICENESS)
    record.results["rounds"] = rounds
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
