"""Where a served request's time goes: our continuous server against vLLM's OpenAI server
on bench_peer's served schedule at one rate (poisson, seeded, 32 tokens, streamed), one
server after the other, each warmed by a few requests first.

Ours, per request, from what the server already reports in each answer (its `timings`,
TTFT, all on the machine's one monotonic clock) and the client's row: the client's send
lag; the hops (client -> HTTP process -> core process and the answer's way back: the
client's latency less the send lag and the core's total); the wait for a step (arrival in
the HTTP process to the start of the step it joined); that first step (its preparing and
its prefill pass); the decode steps after it.  Per step, from /stats's `step_parts`:
preparing newcomers (embedding, retrieval, prompts, tokenizing), mixed passes, decode-only
passes, token events.  vLLM's, from its /metrics histograms over the run (queue, prefill,
decode, time to first token, inter-token latency, end to end).  Both: the client's TTFT
and latency, and each process's processor seconds during the run.

No targets (bench_peer's served comparison holds them); a record under outputs/bench/.

    ragbench-bench .venv/bin/python bench/served_parts.py [--rate 8] [--requests 240]
        [--peer /work/venvs/vllm/bin/python] [--override OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_peer import (
    DEFAULT_PEER,
    NEW_TOKENS,
    SERVED_REQUESTS,
    WARM_UP_REQUESTS,
    PeerServer,
    has_peer,
    model_folder,
    query_prompts,
    served_load,
)
from record import BenchRecord, processor_times

# vLLM's per-request histograms worth setting beside ours (v1's names).
PEER_HISTOGRAMS = (
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
)
# Processor seconds other processes (or the virtual machine's host, stolen) may take during a
# run before its figures say more about them than about the server (the machine's own
# background takes a fraction of this).
NEIGHBOURS_S = 2.0
# Words of a command line that name its process's role.
PROCESS_ROLES = (
    ("rag.serve", "http"),
    ("resource_tracker", "tracker"),
    ("multiprocessing", "core"),
    ("vllm", "vllm"),
)


def processor_seconds(pid: int) -> float:
    """User and system processor time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    """A server process by its role: the HTTP process, the core, or its command's name."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    role = next((r for w, r in PROCESS_ROLES if w in command), command.split(" ")[0])
    return f"{role} ({pid})"


def process_tree(pid: int) -> list[int]:
    """A process and its descendants."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += process_tree(int(child))
    return found


def client_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(pid: int, run: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """`run()`'s result, and the processor seconds each process of the server's tree (by
    its role), this client, the rest of the machine and the virtual machine's host (stolen)
    spent during it: a neighbour's work, here or on the host, makes the run's figures
    worthless."""
    pids = process_tree(pid)
    before = {p: processor_seconds(p) for p in pids}
    client, machine = client_seconds(), processor_times()
    result = run()
    after = processor_times()
    spent = {process_name(p): processor_seconds(p) - before[p] for p in pids}
    spent["client"] = client_seconds() - client
    spent["others"] = after["busy"] - machine["busy"] - sum(spent.values())
    spent["stolen"] = after["stolen"] - machine["stolen"]
    return result, spent


def parts(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "p50": statistics.median(values)}


def ours_by_request(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each part of an answered request's time (milliseconds): its mean and median."""
    ok = [r for r in rows if r["status"] == 200]
    columns: dict[str, list[float]] = {}
    for row in ok:
        sent_to_done = (row["latency_s"] - row["send_lag_s"]) * 1e3
        queue, total = row["server_queue_ms"], row["server_total_ms"]
        first_step = row["server_ttft_ms"] - queue
        for name, value in {
            "latency": row["latency_s"] * 1e3,
            "ttft (client)": row["ttft_s"] * 1e3,
            "send lag": row["send_lag_s"] * 1e3,
            "hops (client -> core, answer -> client)": sent_to_done - total,
            "wait for a step": queue,
            "first step (prepare + prefill pass)": first_step,
            "of which embed + retrieve (its batch)": row["server_embed_ms"]
            + row["server_retrieve_ms"],
            "decode steps after the first": row["server_generate_ms"] - first_step,
            "core, after the last step": total - queue - row["server_generate_ms"],
            "itl mean (client)": row["itl_mean_s"] * 1e3,
        }.items():
            columns.setdefault(name, []).append(value)
    return {name: parts(values) for name, values in columns.items()}


def step_parts(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The continuous loop's parts over the run: totals and per step."""
    delta = {k: after[k] - before[k] for k in after}
    steps = delta["mixed_steps"] + delta["decode_steps"]
    per = {
        "prepare_ms_per_mixed_step": delta["prepare_s"] * 1e3 / max(delta["mixed_steps"], 1),
        "mixed_ms_per_step": delta["mixed_s"] * 1e3 / max(delta["mixed_steps"], 1),
        "decode_ms_per_step": delta["decode_s"] * 1e3 / max(delta["decode_steps"], 1),
        "events_ms_per_step": delta["events_s"] * 1e3 / max(steps, 1),
        "prompt_tokens_per_mixed_step": delta["prefill_tokens"] / max(delta["mixed_steps"], 1),
    }
    return {**delta, **per}


def ours(rate: float, requests: int, overrides: list[str]) -> dict[str, Any]:
    import httpx

    from rag.cluster.process import ServerProcess
    from rag.loadgen import run_load

    server_overrides = ["variant=continuous", "model.ignore_eos=true", *overrides]
    with ServerProcess(server_overrides) as server:
        assert server.process is not None
        run_load(served_load(server.url, 4, WARM_UP_REQUESTS))
        stats = lambda: httpx.get(f"{server.url}/stats", timeout=10).json()  # noqa: E731
        before = stats()["step_parts"]
        (rows, summary), cpu = measured(
            server.process.pid, lambda: run_load(served_load(server.url, rate, requests))
        )
        after = stats()
    return {
        "summary": _headline(summary),
        "by_request_ms": ours_by_request(rows),
        "steps": step_parts(before, after["step_parts"]),
        "processor_s": cpu,
        "runtime": after["runtime"],
    }


def histograms(url: str) -> dict[str, dict[str, Any]]:
    """vLLM's per-request histograms now: count, sum and cumulative buckets."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        name = family.name if family.name.endswith("_seconds") else f"{family.name}_seconds"
        if name not in PEER_HISTOGRAMS:
            continue
        entry = found.setdefault(name, {"count": 0.0, "sum": 0.0, "buckets": {}})
        for sample in family.samples:
            if sample.name.endswith("_count"):
                entry["count"] += sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] += sample.value
            elif sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                entry["buckets"][bound] = entry["buckets"].get(bound, 0.0) + sample.value
    return found


def histogram_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Over the run, in milliseconds: the mean, and the bucket the median falls in (vLLM's
    buckets are too coarse to interpolate within: its queue time's first is 0-300 ms)."""
    count = after["count"] - before["count"]
    if not count:
        return {"count": 0}
    low, median = 0.0, [math.nan, math.nan]
    for bound in sorted(after["buckets"]):
        if after["buckets"][bound] - before["buckets"].get(bound, 0.0) >= count / 2:
            median = [low * 1e3, bound * 1e3]
            break
        low = bound
    mean = (after["sum"] - before["sum"]) / count
    return {"count": count, "mean": mean * 1e3, "p50_bucket": median}


def peer(python: str, rate: float, requests: int, logs: Path) -> dict[str, Any]:
    from peer_client import run_completions

    from rag.loadgen.schedule import load_prompts

    prompts = query_prompts([p.text for p in load_prompts()])
    with PeerServer(python, model_folder(), logs / "vllm-server.log") as server:
        send = lambda rate, count: run_completions(  # noqa: E731
            served_load(server.url, rate, count), prompts, "peer", NEW_TOKENS
        )
        send(4, WARM_UP_REQUESTS)
        before = histograms(server.url)
        (rows, summary), cpu = measured(server.process.pid, lambda: send(rate, requests))
        after = histograms(server.url)
    ok = [r for r in rows if r["status"] == 200]
    client = {
        "latency": parts([r["latency_s"] * 1e3 for r in ok]),
        "ttft (client)": parts([r["ttft_s"] * 1e3 for r in ok]),
        "send lag": parts([r["send_lag_s"] * 1e3 for r in ok]),
        "itl mean (client)": parts([r["itl_mean_s"] * 1e3 for r in ok]),
    }
    empty = {"count": 0.0, "sum": 0.0, "buckets": {}}
    figures = {name: histogram_figures(before.get(name, empty), after[name]) for name in after}
    return {"summary": _headline(summary), "by_request_ms": client, "histograms_ms": figures,
            "processor_s": cpu}  # fmt: skip


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("scheduled", "ok", "throughput_rps", "latency_adj_p50_s", "latency_adj_p99_s")
    return {k: summary[k] for k in keys}


def show(name: str, result: dict[str, Any]) -> None:
    s = result["summary"]
    print(f"{name}: {s['throughput_rps']:.2f}/s, p50 {s['latency_adj_p50_s']:.3f} s, "
          f"p99 {s['latency_adj_p99_s']:.3f} s, {s['ok']}/{s['scheduled']} ok")  # fmt: skip
    for part, figure in result["by_request_ms"].items():
        print(f"  {part}: mean {figure['mean']:.1f} ms, p50 {figure['p50']:.1f} ms")
    for part, figure in result.get("histograms_ms", {}).items():
        if figure["count"]:
            low, high = figure["p50_bucket"]
            print(f"  {part}: mean {figure['mean']:.1f} ms, p50 in ({low:g}, {high:g}] ms")
    for part, value in result.get("steps", {}).items():
        print(f"  step {part}: {value:.2f}")
    print("  processor s: " + ", ".join(f"{k} {v:.1f}" for k, v in result["processor_s"].items()))
    for kind in ("others", "stolen"):
        if (seconds := result["processor_s"][kind]) > NEIGHBOURS_S:
            print(f"  NOT COMPARABLE: {kind} took {seconds:.1f} processor s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--requests", type=int, default=SERVED_REQUESTS)
    parser.add_argument("--peer", default=DEFAULT_PEER, help="the peer's python")
    parser.add_argument("--override", action="append", default=[], help="our server's config")
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    args = parser.parse_args()
    record = BenchRecord("served_parts", vars(args))
    record.results["ours"] = ours(args.rate, args.requests, args.override)
    show("ours, continuous", record.results["ours"])
    if not args.no_peer and has_peer(args.peer):
        with tempfile.TemporaryDirectory() as logs:
            record.results["vllm"] = peer(args.peer, args.rate, args.requests, Path(logs))
        show("vLLM", record.results["vllm"])
    return record.finish()


if __name__ == "__main__":
    raise SystemExit(main())
