"""Do replicas add throughput?  The scaling variant with N = 1, 2, 4 fixed replicas of the
simulated model, saturated, side by side in one run.

    ragbench-bench .venv/bin/python bench/bench_replicas.py [--check]

`model=simulated` replicas sleep for a cost model's time (default 200 ms + 50 ms per
request per batch, batches up to 20) instead of computing, so on two cores this measures
the balancer and the replicas' serving path, not the CPU: real-model replicas on one small
machine share its cores and cannot add throughput.  Each N gets a burst of 150 x N
requests sent at once; throughput is counted between two completion instants (the 10th
and 90th percentile completion), so batch-sized bursts of completions do not bias it.
Target: throughput(N) >= 0.9 x N x throughput(1).  The figures are about the scaling
machinery with a simulated model, never about a model's speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import httpx
from record import BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load


def scaling_server(replicas: int, run_dir: str, extra: list[str]) -> ServerProcess:
    """The scaling variant with a fixed pool of `replicas` simulated replicas, started."""
    server = ServerProcess(
        [
            "variant=scaling", "model=simulated", f"run_dir={run_dir}",
            f"variant.scaling.min_replicas={replicas}", f"variant.scaling.max_replicas={replicas}",
            *extra,
        ],
        ready_timeout_s=120,
    )  # fmt: skip
    server.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [r["state"] for r in httpx.get(f"{server.url}/replicas").json()]
        if states.count("ready") == replicas:
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{replicas} replicas not ready within 120 s")


def saturated_throughput(url: str, requests: int) -> dict[str, float]:
    """Requests/s between the 10th and 90th percentile completion of a burst."""
    config = LoadConfig(
        target=url, timing_mode="ideal", rps=5000, num_requests=requests, timeout=300,
        progress=False,
    )  # fmt: skip
    rows, summary = run_load(config)
    done = sorted(r["done_s"] for r in rows if r["status"] == 200)
    first, last = done[len(done) // 10], done[(len(done) * 9) // 10]
    counted = sum(1 for t in done if first < t <= last)
    return {
        "rps": counted / (last - first),
        "ok": len(done),
        "failed": summary["failed"],
        "replicas_seen": len({r.get("server_replica") for r in rows if r["status"] == 200}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,4", help="pool sizes, the first is the unit")
    parser.add_argument("--per-replica", type=int, default=150, help="requests per replica")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (model.simulated.*)")
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("replicas", vars(args))
    sizes = [int(n) for n in args.replicas.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ragbench-replicas-") as folder:
        for n in sizes:
            server = scaling_server(n, f"{folder}/n{n}", args.overrides)
            try:
                saturated_throughput(server.url, 20 * n)  # warm connections, not judged
                results[n] = saturated_throughput(server.url, args.per_replica * n)
            finally:
                server.stop()
            print(f"# {n} replicas: {results[n]['rps']:.2f} requests/s ({results[n]})", flush=True)
    record.results["by_replicas"] = results
    unit = results[sizes[0]]["rps"] / sizes[0]
    for n in sizes[1:]:
        record.target(
            f"throughput with {n} replicas / ({n} x one)",
            results[n]["rps"] / (n * unit),
            at_least=0.9,
            detail=f"{results[n]['rps']:.1f} vs {unit:.1f} requests/s, model=simulated",
        )
    record.target("failed requests", sum(r["failed"] for r in results.values()), at_most=0,
                  fmt=".0f")  # fmt: skip
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
