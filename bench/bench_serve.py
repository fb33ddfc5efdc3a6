"""Served throughput, idle latency, memory and warm start of the base and batched servers
on the default models, measured side by side in one run.

1. served: the batched server saturated by concurrent clients, against the offline
   `answer_batch` rate at the same batch size (target >= 0.9 x offline);
2. batched / base saturated throughput (target >= 5x);
3. idle latency (requests far enough apart that none waits for another): batched p50 <=
   base p50 + max_wait + 10 ms;
4. memory: one batched server <= 1.5 GB RSS; warm start to /ready <= 5 s.

Both servers run at once; each round times offline batches at the batch size and at
batch 1 (in this process), then one saturated window of the batched server and one of the
base server, so each ratio is taken within one round (this machine's speed can swing 2x
within minutes).  Saturation is the load generator's closed loop (`timing_mode=
concurrency`: each client sends its next request when its answer arrives), run long enough
for the window.  A window starts and ends where a burst of completions ends (a batch's
answers arrive together, so it holds whole batches).  Figures are min/median/max over the
rounds; a ratio's figure is the median of its per-round ratios.  Idle latency: one request
at a time, alternating between the servers.  Every request does fixed work
(`model.ignore_eos=true`) so offline and served compare.

    python bench/bench_serve.py [--batch 20] [--window 12] [--rounds 5] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time

import aiohttp
import psutil
from bench_pipeline import demo_queries, load_pipeline
from record import BenchRecord, add_check_option

from rag.cluster.process import ServerProcess
from rag.loadgen import LoadConfig, run_load
from rag.service.pipeline import RAGPipeline

FIXED_WORK = ["model.ignore_eos=true"]
BURST_GAP_S = 0.1
MARGIN_BATCHES = 4  # batches of margin in a closed loop's run around its window
ATTEMPTS = 3  # closed-loop runs, each twice as long, before a window is given up


def completion_times(url: str, clients: int, seconds: float) -> tuple[list[float], int]:
    """The load generator's closed loop: `clients` users for `seconds`.  The instants
    (seconds from its start) of the successful completions, and the count of failures."""
    config = LoadConfig(
        target=url,
        timing_mode="concurrency",
        concurrency=clients,
        num_requests=0,
        duration=seconds,
        timeout=600.0,
        progress=False,
    )
    rows, summary = run_load(config)
    return sorted(r["done_s"] for r in rows if r["error"] is None), summary["failed"]


def burst_ends(times: list[float], gap_s: float = BURST_GAP_S) -> list[float]:
    """The instants where a burst of completions ends: no other completion follows within
    `gap_s`.  A batch's answers are written together and arrive within milliseconds; on a
    CPU, batches (and, unbatched, single answers) are a good part of a second apart or more
    (on a GPU, a tenth of a second or less: give a smaller gap)."""
    return [a for a, b in itertools.pairwise(times) if b - a > gap_s]


def offline_rps(pipeline: RAGPipeline, batch: int, seconds: float, round_: int) -> float:
    """`answer_batch` requests per second over whole batches (one at least) for at least
    `seconds`, each round on its own stretch of the built-in queries."""
    done = 0
    started = time.perf_counter()
    while not done or time.perf_counter() - started < seconds:
        queries = demo_queries(batch, start=(round_ * 100 + done // batch) * batch)
        pipeline.answer_batch(queries, [2] * batch)
        done += batch
    return done / (time.perf_counter() - started)


def window(
    times: list[float], start: float, seconds: float, gap_s: float = BURST_GAP_S
) -> tuple[float, float] | None:
    """The first burst end after `start` and the first burst end `seconds` later, or None
    while the completions hold no such pair."""
    ends = [t for t in burst_ends(times, gap_s) if t >= start]
    later = [t for t in ends if ends and t >= ends[0] + seconds]
    return (ends[0], later[0]) if later else None


def saturated_rps(
    url: str,
    clients: int,
    warmup_s: float,
    seconds: float,
    gap_s: float = BURST_GAP_S,
    batch_s: float | None = None,
) -> tuple[float, int]:
    """Saturated throughput from one burst end after `warmup_s` to the first burst end
    `seconds` later (completions after the one, up to the other, over the time between:
    batches end in bursts, so a window cut anywhere else counts part of one); and the
    failures.  The closed loop runs MARGIN_BATCHES batches (of `batch_s` each, when
    known; else half the window) longer than the window needs, and twice as long again
    while a slower machine leaves it without the window."""
    margin_s = MARGIN_BATCHES * batch_s if batch_s is not None else seconds / 2
    run_s = warmup_s + seconds + margin_s
    for _ in range(ATTEMPTS):
        times, failures = completion_times(url, clients, run_s)
        bounds = window(times, warmup_s, seconds, gap_s)
        if bounds is not None:
            a, b = bounds
            return sum(1 for t in times if a < t <= b) / (b - a), failures
        run_s *= 2
    raise RuntimeError(
        f"no {seconds:g} s window between burst ends in {len(times)} answers of a"
        f" {run_s / 2:g} s run ({failures} failures, {len(burst_ends(times, gap_s))} burst ends)"
    )


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def warm_start_seconds(overrides: list[str]) -> float:
    started = time.perf_counter()
    with ServerProcess(overrides):
        return time.perf_counter() - started


async def idle_latencies(urls: list[str], requests: int, gap_s: float) -> list[list[float]]:
    """Seconds per request when each arrives alone: one request at a time, `gap_s` apart,
    alternating between the servers, so they see the same moments of the machine and none
    ever waits behind another (however slow the machine is just then)."""
    latencies: list[list[float]] = [[] for _ in urls]
    queries = demo_queries(requests)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for query in queries:
            for url, seconds in zip(urls, latencies, strict=True):
                await asyncio.sleep(gap_s)
                started = time.perf_counter()
                async with session.post(f"{url}/rag", json={"query": query, "k": 2}) as reply:
                    await reply.read()
                    if reply.status != 200:
                        raise RuntimeError(f"idle request failed: {reply.status}")
                seconds.append(time.perf_counter() - started)
    return latencies


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def show(name: str, values: list[float]) -> None:
    v = spread(values)
    print(f"{name}: median {v['median']:.2f}, min {v['min']:.2f}, max {v['max']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20, help="the batched server's max size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=12.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle-requests", type=int, default=20, help="per server")
    parser.add_argument("--idle-gap", type=float, default=0.3, help="seconds between requests")
    add_check_option(parser)
    args = parser.parse_args()
    record = BenchRecord("serve", vars(args))
    batched_overrides = [
        "variant=batched",
        f"variant.max_batch_size={args.batch}",
        f"variant.max_wait_ms={args.max_wait_ms}",
        *FIXED_WORK,
    ]
    warm = warm_start_seconds(batched_overrides)

    pipeline = load_pipeline("auto")
    record.note(dtype=str(pipeline.generator.model.dtype).removeprefix("torch."))
    for batch in (args.batch, 1):  # warm-up
        offline_rps(pipeline, batch, 0, 0)
    figures: dict[str, list[float]] = {k: [] for k in ("offline", "offline_one", "batched", "base")}
    failed = 0
    with (
        ServerProcess(batched_overrides) as batched,
        ServerProcess(["variant=base", *FIXED_WORK]) as base,
    ):
        for run in range(1, args.rounds + 1):
            figures["offline"].append(offline_rps(pipeline, args.batch, args.window / 2, run))
            figures["offline_one"].append(offline_rps(pipeline, 1, args.window / 8, run))
            batch_s = args.batch / figures["offline"][-1]
            rps, failures = saturated_rps(
                batched.url, 2 * args.batch, 5.0, args.window, batch_s=batch_s
            )
            figures["batched"].append(rps)
            one_s = 1 / figures["offline_one"][-1]
            rps, more_failures = saturated_rps(base.url, 4, 3.0, args.window, batch_s=one_s)
            figures["base"].append(rps)
            failed += failures + more_failures
            print(f"round {run}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in figures.items())
                  + " req/s", flush=True)  # fmt: skip
        memory = rss_mb(batched.process.pid)
        batched_idle, base_idle = asyncio.run(
            idle_latencies([batched.url, base.url], args.idle_requests, args.idle_gap)
        )
    for name, values in figures.items():
        show(f"{name} req/s", values)
    record.results.update(
        {f"{k}_rps": spread(v) | {"rounds": v} for k, v in figures.items()},
        warm_start_s=warm, batched_rss_mb=memory,
        batched_idle=batched_idle, base_idle=base_idle,
    )  # fmt: skip

    def per_round(a: str, b: str) -> dict[str, float]:
        return spread([x / y for x, y in zip(figures[a], figures[b], strict=True)])

    served = per_round("batched", "offline")
    record.target(
        f"batched served / offline at batch {args.batch}, median of rounds",
        served["median"],
        at_least=0.9,
        detail=f"rounds {served['min']:.2f}-{served['max']:.2f}",
    )
    gain = per_round("batched", "base")
    record.target(
        "batched / base saturated throughput, median of rounds",
        gain["median"],
        at_least=5.0,
        unit="x",
        fmt=".1f",
        detail=f"rounds {gain['min']:.1f}-{gain['max']:.1f}",
    )
    batched_p50 = statistics.median(batched_idle) * 1e3
    base_p50 = statistics.median(base_idle) * 1e3
    record.target(
        "idle p50 (one request at a time), batched",
        batched_p50,
        at_most=base_p50 + args.max_wait_ms + 10,
        unit=" ms",
        fmt=".0f",
        detail=f"base {base_p50:.0f} ms + max_wait + 10 ms",
    )
    record.target("batched server RSS after load", memory, at_most=1536, unit=" MB", fmt=".0f")
    record.target("warm start to /ready (batched)", warm, at_most=5.0, unit=" s", fmt=".1f")
    record.target("failed requests under saturation", failed, at_most=0, fmt=".0f")
    sys.exit(record.finish(args.check))


if __name__ == "__main__":
    main()
