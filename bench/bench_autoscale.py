"""How fast does the autoscaler answer a step in load, and does it hold still afterwards?

    flock -x /tmp/ragbench-cpu.lock .venv/bin/python bench/bench_autoscale.py [--check]

The scaling variant with its default autoscaler settings (`conf/variant/scaling.yaml`:
checks every second) over `model=simulated` replicas (200 ms + 50 ms per request per
batch), and one poisson load: a base rate one replica carries, then a step to a rate that
needs about three, held for a settling phase and a steady phase.  Two targets:

- reaction: from the step (the first request of the higher rate) to the moment a new
  replica receives its first request (its answer's arrival minus the replica's own time
  for it) <= the check interval + that replica's start time (launch to ready, as
  `/replicas` reports it);
- stability: the replica count changes at most once during the steady phase (read from
  `autoscaler.csv`, whose last row is the end of the load).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from bench_replicas import scaling_server
from record import BenchRecord, add_check_option

from rag.config import compose
from rag.loadgen import LoadConfig, run_load
from rag.loadgen.schedule import arrival_offsets


def write_trace(path: Path, phases: list[tuple[float, float]], seed: int) -> float:
    """Poisson arrivals for each (rate, seconds) phase, one after the other; returns when
    the second phase (the step) begins."""
    offsets, start = [], 0.0
    for n, (rate, seconds) in enumerate(phases):
        offsets.append(start + arrival_offsets("poisson", rate, duration=seconds, seed=seed + n))
        start += seconds
    path.write_text("\n".join(f"{t:.6f}" for t in np.concatenate(offsets)) + "\n")
    return phases[0][1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-rps", type=float, default=4.0)
    parser.add_argument("--step-rps", type=float, default=30.0)
    parser.add_argument("--base-s", type=float, default=20.0)
    parser.add_argument("--settle-s", type=float, default=60.0)
    parser.add_argument("--steady-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("autoscale", vars(args))
    scaling = compose(["variant=scaling"]).variant.scaling
    extra = ["variant.scaling.max_replicas=6"]  # the steady state must not be pinned at max
    record.note(autoscaler={**dict(scaling), "max_replicas": 6})
    with tempfile.TemporaryDirectory(prefix="ragbench-autoscale-") as folder:
        trace = Path(folder) / "trace.txt"
        phases = [(args.base_rps, args.base_s), (args.step_rps, args.settle_s + args.steady_s)]
        step_s = write_trace(trace, phases, args.seed)
        server = scaling_server(1, f"{folder}/run", extra)
        try:
            config = LoadConfig(target=server.url, timing_mode="trace", trace=str(trace),
                                num_requests=0, timeout=120, progress=False)  # fmt: skip
            rows, summary = run_load(config)
            replicas = {r["id"]: r for r in httpx.get(f"{server.url}/replicas").json()}
            decisions = list(csv.DictReader((Path(folder) / "run" / "autoscaler.csv").open()))
        finally:
            server.stop()

    ok = [r for r in rows if r["status"] == 200]
    before = {r["server_replica"] for r in ok if r["scheduled_s"] < step_s}
    first_served: dict[str, float] = {}
    for r in ok:
        if r["server_replica"] not in before:
            received = r["done_s"] - r["server_total_ms"] / 1e3
            first_served[r["server_replica"]] = min(
                received, first_served.get(r["server_replica"], received)
            )
    first = min(first_served, key=first_served.get)
    reaction = first_served[first] - step_s
    budget = scaling.check_interval_s + replicas[first]["start_s"]
    last = float(decisions[-1]["elapsed_s"])
    steady = [d for d in decisions if float(d["elapsed_s"]) >= last - args.steady_s]
    counts = [int(d["replicas_after"]) for d in steady]
    changes = sum(a != b for a, b in itertools.pairwise(counts))
    record.results.update(
        reaction_s=reaction,
        first_new_replica=first,
        start_s=replicas[first]["start_s"],
        steady_replicas=sorted(set(counts)),
        steady_changes=changes,
        replica_counts=[int(d["replicas_after"]) for d in decisions],
        replicas=list(replicas.values()),
        summary={k: summary[k] for k in ("ok_fraction", "failed", "latency_p99_s")},
    )
    record.target(
        "reaction to the step, seconds over check interval + start time",
        reaction - budget,
        at_most=0.0,
        unit=" s",
        detail=f"{reaction:.2f} s vs {scaling.check_interval_s:g} + "
        f"{replicas[first]['start_s']:.2f} s ({first})",
    )
    record.target("replica-count changes in the steady phase", changes, at_most=1, fmt=".0f",
                  detail=f"{args.steady_s:g} s at {args.step_rps:g} requests/s, "
                  f"{sorted(set(counts))} replicas")  # fmt: skip
    record.target("failed requests", summary["failed"], at_most=0, fmt=".0f")
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
