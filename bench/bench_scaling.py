"""Does the scaling variant serve at least what the batched server serves, on this machine
and the default models?

    ragbench-bench .venv/bin/python bench/bench_scaling.py [--rates 5,10] [--seconds 60] [--check]

At each offered rate, one poisson schedule (the same seed, so the same arrival times and
queries) is sent for `--seconds` to the batched server and then to the scaling variant
(balancer, autoscaler and replicas of that batched server, its default settings), each
started fresh and warmed up with a few requests, as a sweep point is.  Targets at each rate:
scaling's served rate (successful answers per second) >= 0.95 x batched's and its p50
latency (from each request's scheduled send) <= 1.2 x batched's.  On a machine whose cores
one server already uses, extra replicas can only divide them, so this measures what
replication costs while the autoscaler finds that out; the record keeps the autoscaler's
decisions (autoscaler.csv) that say what it tried and why it took replicas back.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

from record import BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load

WARMUP_REQUESTS = 4  # as a sweep point (harness.warmup_requests)
KEPT = ("throughput_rps", "latency_p50_s", "latency_p99_s", "ok", "scheduled", "failed",
        "schedule_kept")  # fmt: skip


def measure(variant: str, rps: float, seconds: float, seed: int, run_dir: Path) -> dict:
    """Start the variant, warm it up, send the schedule, stop it: the load's summary."""
    with ServerProcess([f"variant={variant}", f"run_dir={run_dir}"], ready_timeout_s=600) as s:
        warm = LoadConfig(target=s.url, timing_mode="ideal", rps=1000, max_in_flight=1,
                          num_requests=WARMUP_REQUESTS, progress=False)  # fmt: skip
        run_load(warm)
        load = LoadConfig(target=s.url, timing_mode="poisson", rps=rps, duration=seconds,
                          num_requests=0, seed=seed, timeout=120, progress=False)  # fmt: skip
        summary = run_load(load)[1]
    print(f"# {variant} at {rps:g}/s: {summary['throughput_rps']:.2f}/s served, p50 "
          f"{summary['latency_p50_s']:.2f} s, {summary['ok']}/{summary['scheduled']} ok",
          flush=True)  # fmt: skip
    return {key: summary[key] for key in KEPT}


def decisions(run_dir: Path) -> dict:
    """What the autoscaler did: the most replicas, and every check with a verdict or a
    change of the pool."""
    rows = list(csv.DictReader((run_dir / "autoscaler.csv").open()))
    events = [r for r in rows if r["verdict"] or r["replicas_before"] != r["replicas_after"]]
    keep = ("elapsed_s", "replicas_before", "replicas_after", "verdict", "reason")
    return {
        "replicas_max": max(int(r["replicas_after"]) for r in rows),
        "events": [{key: r[key] for key in keep} for r in events],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5,10", help="offered requests/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=60.0, help="schedule length per run")
    parser.add_argument("--seed", type=int, default=0)
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("scaling", vars(args))
    by_rate = {}
    with tempfile.TemporaryDirectory(prefix="ragbench-scaling-") as folder:
        for rps in (float(r) for r in args.rates.split(",")):
            runs = {
                variant: measure(
                    variant, rps, args.seconds, args.seed, Path(folder) / f"{variant}-{rps:g}"
                )
                for variant in ("batched", "scaling")
            }
            runs["autoscaler"] = decisions(Path(folder) / f"scaling-{rps:g}")
            by_rate[f"{rps:g}"] = runs
    record.results["by_rate"] = by_rate
    for rate, runs in by_rate.items():
        batched, scaling = runs["batched"], runs["scaling"]
        record.target(
            f"scaling / batched served rate at {rate}/s",
            scaling["throughput_rps"] / batched["throughput_rps"],
            at_least=0.95,
            detail=f"{scaling['throughput_rps']:.2f} vs {batched['throughput_rps']:.2f}/s, "
            f"up to {runs['autoscaler']['replicas_max']} replicas",
        )
        record.target(
            f"scaling / batched p50 latency at {rate}/s",
            scaling["latency_p50_s"] / batched["latency_p50_s"],
            at_most=1.2,
            detail=f"{scaling['latency_p50_s']:.2f} vs {batched['latency_p50_s']:.2f} s",
        )
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
