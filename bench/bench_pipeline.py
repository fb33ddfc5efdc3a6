"""Offline ceiling: `answer_batch` throughput on the default models, by batch size and dtype,
and how much of the machine's matmul peak it reaches.

Every request does fixed work (`ignore_eos`: exactly max_new_tokens generated), so the
figures compare across batch sizes and dtypes.  The FLOPs of a request are counted by
torch's FlopCounterMode over one real batch of each size (embedder and generator, padding
included), and the matmul peak is measured in this process, before and after the batches
(the higher counts).  Targets, per dtype: the best batch does >= 3x the requests per second
of batch 1, and reaches >= 30 % of the matmul peak.

    python bench/bench_pipeline.py [--batches 1 4 8 16 32] [--dtypes float32 bfloat16] [--check]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from typing import Any

import torch
from record import BenchRecord, add_check_option, matmul_peak_gflops
from torch.utils.flop_counter import FlopCounterMode

from rag.config import compose
from rag.service.pipeline import RAGPipeline

QUERIES_FILE = "rag/data/queries.txt"
MIN_BATCHING_GAIN = 3.0
MIN_OF_PEAK = 0.30


def load_pipeline(dtype: str, extra: list[str] | None = None) -> RAGPipeline:
    overrides = [f"model.dtype={dtype}", "model.ignore_eos=true", *(extra or [])]
    return RAGPipeline.from_config(compose(overrides))


def demo_queries(n: int, start: int = 0) -> list[str]:
    """`n` of the load generator's built-in queries, cycling from position `start`."""
    with open(QUERIES_FILE) as handle:
        base = [line.strip() for line in handle if line.strip()]
    return [base[(start + i) % len(base)] for i in range(n)]


def time_batch(pipeline: RAGPipeline, batch: int, run: int) -> float:
    """Requests per second of one `answer_batch` call on the `run`-th `batch` queries of the
    built-in list (so runs see a mix, as a server under load does)."""
    queries = demo_queries(batch, start=run * batch)
    started = time.perf_counter()
    pipeline.answer_batch(queries, [2] * batch)
    return batch / (time.perf_counter() - started)


def offline_throughput(pipeline: RAGPipeline, batch: int, repeats: int = 2) -> dict[str, Any]:
    """Requests per second of `answer_batch` at one batch size (min/median/max of
    `repeats` runs, after one warm-up run), with the tokens and FLOPs per request, counted
    afterwards over the warm-up's batch (counting slows a run, so it is not a timed one)."""
    pipeline.answer_batch(demo_queries(batch), [2] * batch)
    rates = [time_batch(pipeline, batch, run) for run in range(1, repeats + 1)]
    with FlopCounterMode(display=False) as flops:
        answers = pipeline.answer_batch(demo_queries(batch), [2] * batch)
    return {
        "batch": batch,
        "rps": statistics.median(rates),
        "rps_min": min(rates),
        "rps_max": max(rates),
        "gflop_per_request": flops.get_total_flops() / batch / 1e9,
        "prompt_tokens": statistics.mean(a.prompt_tokens for a in answers),
        "new_tokens": statistics.mean(a.new_tokens for a in answers),
    }


def measure_dtype(dtype: str, batches: list[int], repeats: int) -> dict[str, Any]:
    """One dtype: the peak before, every batch size, the peak after."""
    pipeline = load_pipeline(dtype)
    generator = pipeline.generator.model
    params = sum(p.numel() for p in generator.parameters())
    peak_before = matmul_peak_gflops(dtype)
    rows = []
    for batch in batches:
        r = offline_throughput(pipeline, batch, repeats)
        r["formula_gflop_per_request"] = 2 * params * (r["prompt_tokens"] + r["new_tokens"]) / 1e9
        rows.append(r)
    peak = max(peak_before, matmul_peak_gflops(dtype))
    for r in rows:
        r["gflops"] = r["rps"] * r["gflop_per_request"]
        r["of_peak"] = r["gflops"] / peak
        print(
            f"{dtype:9} {r['batch']:5} {r['rps']:7.2f} {r['rps_min']:6.2f}-{r['rps_max']:<6.2f}"
            f" {r['prompt_tokens']:6.0f} {r['new_tokens']:4.0f} {r['gflop_per_request']:7.1f}"
            f" {r['formula_gflop_per_request']:7.1f} {r['gflops']:7.1f} {r['of_peak']:7.1%}",
            flush=True,
        )
    print(f"  {dtype}: matmul peak {peak_before:.0f} GFLOP/s before, {peak:.0f} best; "
          f"generator {params / 1e6:.0f} M parameters")  # fmt: skip
    return {"dtype": dtype, "parameters": params, "peak_gflops_before": peak_before,
            "peak_gflops": peak, "batches": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    add_check_option(parser)
    args = parser.parse_args()

    record = BenchRecord("pipeline", vars(args))
    record.note(dtypes=args.dtypes, torch_threads=torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("dtype     batch   req/s  min-max    prompt new GFLOP/req (2 x params x tokens)"
          " GFLOP/s of peak")  # fmt: skip
    for dtype in args.dtypes:
        result = measure_dtype(dtype, args.batches, args.repeats)
        record.results[dtype] = result
        rows = result["batches"]
        best = max(rows, key=lambda r: r["rps"])
        one = next((r for r in rows if r["batch"] == 1), None)
        if one is not None and best is not one:
            record.target(
                f"{dtype}: best batch ({best['batch']}) / batch 1 req/s",
                best["rps"] / one["rps"],
                at_least=MIN_BATCHING_GAIN,
                unit="x",
                detail=f"{best['rps']:.2f} vs {one['rps']:.2f} req/s",
            )
        record.target(
            f"{dtype}: batch {best['batch']} share of the matmul peak",
            best["of_peak"] * 100,
            at_least=MIN_OF_PEAK * 100,
            unit=" %",
            fmt=".0f",
            detail=f"{best['gflops']:.0f} of {result['peak_gflops']:.0f} GFLOP/s, "
            f"{best['gflop_per_request']:.1f} GFLOP/request counted",
        )
    record.results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.exit(record.finish(args.check))


if __name__ == "__main__":
    main()
