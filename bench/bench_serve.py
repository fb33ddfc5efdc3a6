"""Served throughput, idle latency, memory and warm start of the base and batched servers
on the default models, measured side by side in one run.

1. served: the batched server saturated by concurrent clients, against the offline
   `answer_batch` rate at the same batch size (target >= 0.9 x offline);
2. batched / base saturated throughput (target >= 5x);
3. idle latency (requests far enough apart that none waits for another): batched p50 <=
   base p50 + max_wait + 10 ms;
4. memory: one batched server <= 1.5 GB RSS; warm start to /ready <= 5 s.

Saturated throughput is counted over windows that start and end where a burst of
completions ends (a batch's answers arrive together, so a window holds whole batches),
several consecutive windows per server, reported as min/median/max; the ratios use the
medians.  Every request does fixed work (`model.ignore_eos=true`) so offline and served
compare.

    python bench/bench_serve.py [--batch 20] [--window 20] [--repeats 3] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import statistics
import sys
import time

import aiohttp
import psutil
from bench_pipeline import demo_queries, load_pipeline, offline_throughput
from record import BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load

FIXED_WORK = ["model.ignore_eos=true"]
BURST_GAP_S = 0.1


async def completion_times(url: str, clients: int, seconds: float) -> tuple[list[float], int]:
    """Closed loop: `clients` workers each post, wait, post again, for `seconds`.  The
    instants of the successful completions, and the count of failures."""
    queries = demo_queries(64)
    done: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal failures
        i = n
        while time.perf_counter() < stop_at:
            body = {"query": queries[i % len(queries)], "k": 2}
            async with session.post(f"{url}/rag", json=body) as response:
                await response.read()
                if response.status == 200:
                    done.append(time.perf_counter())
                else:
                    failures += 1
            i += clients

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(n, session) for n in range(clients)))
    return sorted(done), failures


def burst_ends(times: list[float]) -> list[float]:
    """The instants where a burst of completions ends: no other completion follows within
    BURST_GAP_S.  A batch's answers are written together and arrive within milliseconds;
    batches (and, unbatched, single answers) are a good part of a second apart or more."""
    return [a for a, b in itertools.pairwise(times) if b - a > BURST_GAP_S]


def windowed_rates(times: list[float], start: float, window: float, repeats: int) -> list[float]:
    """Completions per second over `repeats` consecutive windows of about `window` seconds
    from `start`, each from one burst end to another: (completions after the first end up to
    the second) / (time between them)."""
    ends = [t for t in burst_ends(times) if t >= start]
    edges = []
    for k in range(repeats + 1):
        later = [t for t in ends if t >= start + k * window]
        if later:
            edges.append(later[0])
    if len(edges) < repeats + 1 or len(set(edges)) < len(edges):
        raise RuntimeError(
            f"{len(ends)} bursts in {len(times)} completions are too few for {repeats}"
            f" windows of {window} s"
        )
    return [sum(1 for t in times if a < t <= b) / (b - a) for a, b in itertools.pairwise(edges)]


def saturate(url: str, clients: int, warmup_s: float, window: float, repeats: int) -> dict:
    """Saturated throughput: min/median/max over the windows after `warmup_s`."""
    started = time.perf_counter()
    times, failures = asyncio.run(
        completion_times(url, clients, warmup_s + window * repeats + window / 2)
    )
    rates = windowed_rates(times, started + warmup_s, window, repeats)
    return {
        "rps": statistics.median(rates),
        "rps_min": min(rates),
        "rps_max": max(rates),
        "windows": rates,
        "completed": len(times),
        "failed": failures,
    }


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def warm_start_seconds(overrides: list[str]) -> float:
    started = time.perf_counter()
    with ServerProcess(overrides):
        return time.perf_counter() - started


def idle_p50(url: str, requests: int, rps: float) -> float:
    config = LoadConfig(
        target=url, timing_mode="ideal", rps=rps, num_requests=requests, progress=False
    )
    _, summary = run_load(config)
    if summary["failed"]:
        raise RuntimeError(f"idle requests failed: {summary}")
    return summary["latency_p50_s"]


def spread(r: dict) -> str:
    return f"median {r['rps']:.2f}, min {r['rps_min']:.2f}, max {r['rps_max']:.2f} req/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20, help="the batched server's max size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=20.0, help="seconds per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per server")
    parser.add_argument("--idle-requests", type=int, default=12)
    parser.add_argument("--idle-rps", type=float, default=0.5, help="far below service rate")
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("serve", vars(args))
    batched = [
        "variant=batched",
        f"variant.max_batch_size={args.batch}",
        f"variant.max_wait_ms={args.max_wait_ms}",
        *FIXED_WORK,
    ]
    base = ["variant=base", *FIXED_WORK]

    pipeline = load_pipeline("auto")
    record.note(dtype=str(pipeline.generator.model.dtype).removeprefix("torch."))
    offline = offline_throughput(pipeline, args.batch, repeats=args.repeats)
    offline_one = offline_throughput(pipeline, 1, repeats=args.repeats)
    del pipeline
    gc.collect()
    print(f"offline answer_batch: batch {args.batch}: {spread(offline)}; batch 1: "
          f"{spread(offline_one)}")  # fmt: skip

    warm = warm_start_seconds(batched)
    with ServerProcess(batched) as server:
        served = saturate(server.url, 2 * args.batch, 5.0, args.window, args.repeats)
        memory = rss_mb(server.process.pid)
        batched_idle = idle_p50(server.url, args.idle_requests, args.idle_rps)
    print(f"batched served with {2 * args.batch} clients: {spread(served)}, "
          f"{served['failed']} failed")  # fmt: skip
    with ServerProcess(base) as server:
        base_served = saturate(server.url, 4, 3.0, args.window, args.repeats)
        base_idle = idle_p50(server.url, args.idle_requests, args.idle_rps)
    print(f"base served with 4 clients: {spread(base_served)}, {base_served['failed']} failed")
    record.results.update(
        offline_batch=offline, offline_one=offline_one, batched_served=served,
        base_served=base_served, warm_start_s=warm, batched_rss_mb=memory,
        batched_idle_p50_s=batched_idle, base_idle_p50_s=base_idle,
    )  # fmt: skip

    record.target(
        f"batched served / offline at batch {args.batch}",
        served["rps"] / offline["rps"],
        at_least=0.9,
        detail=f"windows {served['rps_min'] / offline['rps']:.2f}-"
        f"{served['rps_max'] / offline['rps']:.2f} of the offline median",
    )
    record.target(
        "batched / base saturated throughput",
        served["rps"] / base_served["rps"],
        at_least=5.0,
        unit="x",
        fmt=".1f",
        detail=f"{served['rps']:.2f} vs {base_served['rps']:.2f} req/s",
    )
    bound = (base_idle + args.max_wait_ms / 1e3 + 0.010) * 1e3
    record.target(
        f"idle p50 at {args.idle_rps:g} req/s, batched",
        batched_idle * 1e3,
        at_most=bound,
        unit=" ms",
        fmt=".0f",
        detail=f"base {base_idle * 1e3:.0f} ms + max_wait + 10 ms",
    )
    record.target("batched server RSS after load", memory, at_most=1536, unit=" MB", fmt=".0f")
    record.target("warm start to /ready (batched)", warm, at_most=5.0, unit=" s", fmt=".1f")
    failed = served["failed"] + base_served["failed"]
    record.target("failed requests under saturation", failed, at_most=0, fmt=".0f")
    sys.exit(record.finish(args.check))


if __name__ == "__main__":
    main()
