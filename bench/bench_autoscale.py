"""How fast does the autoscaler answer a step in load, does it hold still afterwards, and
does it still scale replicas that add capacity to what the load needs?

    ragbench-bench .venv/bin/python bench/bench_autoscale.py [--check]

The scaling variant with its default autoscaler settings (`conf/variant/scaling.yaml`:
checks every second, what each scale-up bought judged after it) over `model=simulated`
replicas (200 ms + 50 ms per request per batch: each adds a replica's capacity), two
poisson loads one after the other:

- a step: a base rate one replica carries, then a rate that needs about three, held for
  a settling phase and a steady phase (`max_replicas` 6, so the steady state is not
  pinned at the maximum).  Targets: the reaction, from the step (the first request of the
  higher rate) to the moment a new replica receives its first request (its answer's
  arrival minus the replica's own time for it) <= the check interval + that replica's
  start time (launch to ready, as `/replicas` reports it); the replica count changes at
  most once during the steady phase (read from `autoscaler.csv`); no failed request;
- four times one replica: one replica's saturated rate is measured first (a burst, as
  bench_replicas.py does), then the load steps from 1x to 4x that rate (`max_replicas`
  4).  Targets: the pool reaches 4 replicas, serves >= 0.9 x 4 x one replica's rate over
  the last `--quad-measure-s` seconds, and reacts to the step within the same budget.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_replicas import saturated_throughput, scaling_server
from record import BenchRecord, add_check_option

from rag.config import ScalingConfig, compose
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


def run_trace(
    phases: list[tuple[float, float]], seed: int, extra: list[str], folder: Path
) -> dict[str, Any]:
    """The scaling variant (one replica at first) under poisson `phases`: the load's rows
    and summary, the replicas and the autoscaler's decisions, when the step came."""
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / "trace.txt"
    step_s = write_trace(trace, phases, seed)
    server = scaling_server(1, str(folder / "run"), extra)
    try:
        config = LoadConfig(target=server.url, timing_mode="trace", trace=str(trace),
                            num_requests=0, timeout=120, progress=False)  # fmt: skip
        rows, summary = run_load(config)
        replicas = {r["id"]: r for r in httpx.get(f"{server.url}/replicas").json()}
        decisions = list(csv.DictReader((folder / "run" / "autoscaler.csv").open()))
    finally:
        server.stop()
    return {"rows": rows, "summary": summary, "replicas": replicas, "decisions": decisions,
            "step_s": step_s}  # fmt: skip


def reaction(run: dict[str, Any], scaling: ScalingConfig) -> tuple[float, float, str] | None:
    """Seconds from the step to a new replica's first request, the budget for it (check
    interval + that replica's start time) and the replica; None if none came after it."""
    ok = [r for r in run["rows"] if r["status"] == 200]
    before = {r["server_replica"] for r in ok if r["scheduled_s"] < run["step_s"]}
    first_served: dict[str, float] = {}
    for r in ok:
        if r["server_replica"] not in before:
            received = r["done_s"] - r["server_total_ms"] / 1e3
            first_served[r["server_replica"]] = min(
                received, first_served.get(r["server_replica"], received)
            )
    if not first_served:
        return None
    first = min(first_served, key=first_served.get)
    budget = scaling.check_interval_s + run["replicas"][first]["start_s"]
    return first_served[first] - run["step_s"], budget, first


def judge_reaction(record: BenchRecord, name: str, run: dict, scaling: ScalingConfig) -> None:
    found = reaction(run, scaling)
    if found is None:
        record.target(name, 1.0, at_most=0.0, unit=" s", detail="no new replica after the step")
        return
    seconds, budget, first = found
    record.target(name, seconds - budget, at_most=0.0, unit=" s",
                  detail=f"{seconds:.2f} s vs {budget:.2f} s ({first})")  # fmt: skip


def served_rate(rows: list[dict], start_s: float, end_s: float) -> float:
    """Answers per second between the first and the last answer arriving in the window."""
    done = sorted(
        r["done_s"] for r in rows if r["status"] == 200 and start_s <= r["done_s"] <= end_s
    )
    return (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else 0.0


def step(
    args: argparse.Namespace, record: BenchRecord, scaling: ScalingConfig, folder: Path
) -> None:
    phases = [(args.base_rps, args.base_s), (args.step_rps, args.settle_s + args.steady_s)]
    run = run_trace(phases, args.seed, ["variant.scaling.max_replicas=6"], folder)
    decisions = run["decisions"]
    last = float(decisions[-1]["elapsed_s"])
    steady = [d for d in decisions if float(d["elapsed_s"]) >= last - args.steady_s]
    counts = [int(d["replicas_after"]) for d in steady]
    changes = sum(a != b for a, b in itertools.pairwise(counts))
    found = reaction(run, scaling)
    record.results["step"] = {
        "reaction": found,
        "steady_replicas": sorted(set(counts)),
        "steady_changes": changes,
        "replica_counts": [int(d["replicas_after"]) for d in decisions],
        "verdicts": [d["reason"] for d in decisions if d["verdict"]],
        "replicas": list(run["replicas"].values()),
        "summary": {k: run["summary"][k] for k in ("ok_fraction", "failed", "latency_p99_s")},
    }
    judge_reaction(record, "reaction to the step, seconds over check interval + start time",
                   run, scaling)  # fmt: skip
    record.target("replica-count changes in the steady phase", changes, at_most=1, fmt=".0f",
                  detail=f"{args.steady_s:g} s at {args.step_rps:g} requests/s, "
                  f"{sorted(set(counts))} replicas")  # fmt: skip
    record.target("failed requests (step)", run["summary"]["failed"], at_most=0, fmt=".0f")


def quadruple(
    args: argparse.Namespace, record: BenchRecord, scaling: ScalingConfig, folder: Path
) -> None:
    server = scaling_server(1, str(folder / "one"), [])
    try:
        saturated_throughput(server.url, 20)  # warm connections, not judged
        one = saturated_throughput(server.url, args.per_replica)["rps"]
    finally:
        server.stop()
    print(f"# one replica: {one:.2f} requests/s", flush=True)
    phases = [(one, args.base_s), (4 * one, args.quad_settle_s + args.quad_measure_s)]
    run = run_trace(phases, args.seed, ["variant.scaling.max_replicas=4"], folder / "quad")
    end_s = run["step_s"] + args.quad_settle_s + args.quad_measure_s
    served = served_rate(run["rows"], end_s - args.quad_measure_s, end_s)
    decisions = run["decisions"]
    reached = max(int(d["replicas_after"]) for d in decisions)
    # On the autoscaler's clock: the step is the first check that saw twice one's rate.
    stepped = next(float(d["elapsed_s"]) for d in decisions if float(d["rps"]) >= 2 * one)
    four = [float(d["elapsed_s"]) for d in decisions
            if float(d["elapsed_s"]) >= stepped and int(d["ready"]) == 4]  # fmt: skip
    record.results["quadruple"] = {
        "one_replica_rps": one,
        "served_rps": served,
        "reaction": reaction(run, scaling),
        "replica_counts": [int(d["replicas_after"]) for d in decisions],
        "four_ready_after_step_s": four[0] - stepped if four else None,
        "verdicts": [d["reason"] for d in decisions if d["verdict"]],
        "summary": {k: run["summary"][k] for k in ("ok_fraction", "failed", "latency_p99_s")},
    }
    record.target("replicas reached after a step to 4 x one replica's rate", reached,
                  at_least=4, fmt=".0f")  # fmt: skip
    record.target(f"served / (4 x one replica) over the last {args.quad_measure_s:g} s",
                  served / (4 * one), at_least=0.9,
                  detail=f"{served:.1f} vs 4 x {one:.1f} requests/s")  # fmt: skip
    judge_reaction(record, "reaction to the 4 x step, seconds over check interval + start time",
                   run, scaling)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-rps", type=float, default=4.0)
    parser.add_argument("--step-rps", type=float, default=30.0)
    parser.add_argument("--base-s", type=float, default=20.0)
    parser.add_argument("--settle-s", type=float, default=60.0)
    parser.add_argument("--steady-s", type=float, default=120.0)
    parser.add_argument("--per-replica", type=int, default=150, help="burst measuring one")
    parser.add_argument("--quad-settle-s", type=float, default=60.0)
    parser.add_argument("--quad-measure-s", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("autoscale", vars(args))
    scaling = compose(["variant=scaling"]).variant.scaling
    record.note(autoscaler=dict(scaling))
    with tempfile.TemporaryDirectory(prefix="ragbench-autoscale-") as folder:
        step(args, record, scaling, Path(folder) / "step")
        quadruple(args, record, scaling, Path(folder) / "quadruple")
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
