"""Offline ceiling: `answer_batch` throughput on the default models, by batch size and dtype.

Every request does fixed work (`ignore_eos`: exactly max_new_tokens generated), so the
figures compare across batch sizes and dtypes.  The physical limit is the machine's
measured matmul peak divided by the FLOPs one request costs (2 x parameters x tokens).

    python bench/bench_pipeline.py [--batches 1 4 8 16 32 64] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from rag.config import compose
from rag.service.pipeline import RAGPipeline

QUERIES_FILE = "rag/data/queries.txt"


def load_pipeline(dtype: str, extra: list[str] | None = None) -> RAGPipeline:
    overrides = [f"model.dtype={dtype}", "model.ignore_eos=true", *(extra or [])]
    return RAGPipeline.from_config(compose(overrides))


def demo_queries(n: int, start: int = 0) -> list[str]:
    """`n` of the load generator's built-in queries, cycling from position `start`."""
    with open(QUERIES_FILE) as handle:
        base = [line.strip() for line in handle if line.strip()]
    return [base[(start + i) % len(base)] for i in range(n)]


def offline_throughput(pipeline: RAGPipeline, batch: int, repeats: int = 2) -> dict[str, float]:
    """Requests per second of `answer_batch` at one batch size (median of `repeats` runs,
    after one warm-up run), with the tokens per request it processed.  Each run takes the
    next `batch` queries of the built-in list, as a server under load sees a mix."""
    ks = [2] * batch
    pipeline.answer_batch(demo_queries(batch), ks)
    seconds = []
    for run in range(1, repeats + 1):
        queries = demo_queries(batch, start=run * batch)
        started = time.perf_counter()
        answers = pipeline.answer_batch(queries, ks)
        seconds.append(time.perf_counter() - started)
    elapsed = statistics.median(seconds)
    return {
        "batch": batch,
        "rps": batch / elapsed,
        "seconds": elapsed,
        "prompt_tokens": statistics.mean(a.prompt_tokens for a in answers),
        "new_tokens": statistics.mean(a.new_tokens for a in answers),
    }


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("dtype     batch   req/s   s/batch  prompt_tok  new_tok  GFLOP/s  of peak")
    for dtype in args.dtypes:
        pipeline = load_pipeline(dtype)
        model = pipeline.generator.model
        params = sum(p.numel() for p in model.parameters())
        peak = matmul_peak_gflops(getattr(torch, dtype))
        for batch in args.batches:
            r = offline_throughput(pipeline, batch, args.repeats)
            gflop_per_request = 2 * params * (r["prompt_tokens"] + r["new_tokens"]) / 1e9
            achieved = r["rps"] * gflop_per_request
            print(
                f"{dtype:9} {batch:5} {r['rps']:7.2f} {r['seconds']:9.2f} "
                f"{r['prompt_tokens']:11.0f} {r['new_tokens']:8.0f} {achieved:8.1f} "
                f"{achieved / peak:7.1%}"
            )
        print(
            f"  {dtype}: matmul peak {peak:.0f} GFLOP/s; one request = "
            f"{gflop_per_request:.1f} GFLOP -> physical limit {peak / gflop_per_request:.1f} "
            f"req/s ({params / 1e6:.0f} M parameters)"
        )
        del pipeline, model
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
