"""Served throughput, idle latency, memory and warm start of the base and batched servers
on the default models, measured side by side in one run.

1. served: the batched server saturated by concurrent clients, against the offline
   `answer_batch` rate at the same batch size (target >= 0.9 x offline);
2. batched / base saturated throughput (target >= 5x);
3. idle latency at 0.2 req/s: batched p50 <= base p50 + max_wait + 10 ms;
4. memory: one batched server <= 1.5 GB RSS; warm start to /ready <= 5 s.

Every request does fixed work (`model.ignore_eos=true`) so offline and served compare.

    python bench/bench_serve.py [--batch 20] [--seconds 30] [--idle-requests 12]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import aiohttp
import psutil
from bench_pipeline import demo_queries, load_pipeline, offline_throughput

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load

FIXED_WORK = ["model.ignore_eos=true"]


async def saturate(url: str, clients: int, seconds: float, warmup_s: float) -> dict[str, float]:
    """Closed loop: `clients` workers each post, wait, post again.  Throughput counts the
    completions after `warmup_s` (so the first, partial batches do not count)."""
    queries = demo_queries(64)
    done: list[float] = []
    failures = 0
    start = time.perf_counter()
    stop_at = start + warmup_s + seconds

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
    window = [t for t in done if t >= start + warmup_s]
    span = max(window) - (start + warmup_s) if window else float("nan")
    return {
        "rps": len(window) / span if window else 0.0,
        "completed": len(done),
        "failed": failures,
    }


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def warm_start_seconds(overrides: list[str]) -> float:
    started = time.perf_counter()
    with ServerProcess(overrides):
        return time.perf_counter() - started


def idle_p50(url: str, requests: int) -> float:
    config = LoadConfig(
        target=url, timing_mode="ideal", rps=0.2, num_requests=requests, progress=False
    )
    _, summary = run_load(config)
    assert summary["failed"] == 0, summary
    return summary["latency_p50_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=20, help="the batched server's max size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--idle-requests", type=int, default=12)
    args = parser.parse_args()
    batched = [
        "variant=batched",
        f"variant.max_batch_size={args.batch}",
        f"variant.max_wait_ms={args.max_wait_ms}",
        *FIXED_WORK,
    ]
    base = ["variant=base", *FIXED_WORK]

    pipeline = load_pipeline("auto")
    offline = offline_throughput(pipeline, args.batch, repeats=3)
    offline_one = offline_throughput(pipeline, 1)
    del pipeline
    gc.collect()
    print(f"offline answer_batch: batch {args.batch}: {offline['rps']:.2f} req/s; "
          f"batch 1: {offline_one['rps']:.2f} req/s")  # fmt: skip

    warm = warm_start_seconds(batched)
    print(f"warm start to /ready (batched): {warm:.1f} s  [target <= 5 s]")

    with ServerProcess(batched) as server:
        served = asyncio.run(saturate(server.url, 2 * args.batch, args.seconds, 5.0))
        memory = rss_mb(server.process.pid)
        batched_idle = idle_p50(server.url, args.idle_requests)
    print(
        f"batched served: {served['rps']:.2f} req/s with {2 * args.batch} clients "
        f"({served['failed']} failed) = {served['rps'] / offline['rps']:.2f} x offline "
        f"[target >= 0.9]"
    )
    print(f"batched server RSS after load: {memory:.0f} MB  [target <= 1536 MB]")

    with ServerProcess(base) as server:
        base_served = asyncio.run(saturate(server.url, 4, args.seconds, 3.0))
        base_idle = idle_p50(server.url, args.idle_requests)
    print(
        f"base served: {base_served['rps']:.2f} req/s ({base_served['failed']} failed) "
        f"= {base_served['rps'] / offline_one['rps']:.2f} x offline batch 1"
    )
    print(f"batched / base saturated: {served['rps'] / base_served['rps']:.1f} x  [target >= 5]")
    bound = base_idle + args.max_wait_ms / 1e3 + 0.010
    print(
        f"idle p50 at 0.2 req/s: batched {batched_idle * 1e3:.0f} ms, base "
        f"{base_idle * 1e3:.0f} ms; bound base + max_wait + 10 ms = {bound * 1e3:.0f} ms "
        f"[{'met' if batched_idle <= bound else 'MISSED'}]"
    )


if __name__ == "__main__":
    main()
