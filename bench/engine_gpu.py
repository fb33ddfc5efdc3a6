"""The engine on the device a model preset names (`bench_engine.py --suite gpu --model
a6000-shaped`), where an absolute time holds:

1. a decode step at batch 1 against its weight-traffic floor, the weights' bytes over the
   device's measured copy bandwidth (target <= 1.5x); beside it the same step without CUDA
   graphs (the dynamic step, launched op by op);
2. saturated output tokens/s of the engine against transformers' `generate` on the same
   batch of RAG prompts, 32 tokens each (`ignore_eos`), best of two runs after a warm-up
   (target >= 2x); beside it the FLOP rate against the device's matmul peak (FLOPs counted
   by FlopCounterMode on the dynamic path: a graph's replay is not seen by torch's
   dispatcher), batch-1 latency of both, and peak device memory.

On the CPU the same code runs with the CPU's ceilings (matmul peak, stream bandwidth): the
dry run of `bench/gpu_check.sh` uses it on tiny models.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from bench_engine import rag_prompts, seconds, weight_bytes
from record import (
    BenchRecord,
    cuda_copy_gbs,
    cuda_matmul_peak_gflops,
    matmul_peak_gflops,
    stream_gbs,
)
from torch.utils.flop_counter import FlopCounterMode

from rag.config import compose
from rag.service.engine.engine import Sequence
from rag.service.generator import Generator
from rag.service.models import describe_runtime
from rag.service.pipeline import RAGPipeline

MAX_STEP_OVER_FLOOR = 1.5
MIN_TOKENS_OVER_GENERATE = 2.0
NEW_TOKENS = 32
LATENCY_PROMPTS = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def decode_path(generator: Generator, path: str) -> Iterator[None]:
    """Decode-only steps take `path` for the duration: `dynamic`, `static` (the static step
    run eagerly) or the engine's own."""
    assert generator.engine is not None
    slots = generator.engine.model
    static = slots.static
    graphs = static.graphs if static is not None else False
    if path == "dynamic":
        slots.static = None
    elif path == "static" and static is not None:
        static.graphs = False
    try:
        yield
    finally:
        slots.static = static
        if static is not None:
            static.graphs = graphs


def decode_step_seconds(generator: Generator, prompt: list[int], steps: int) -> float:
    """The median wall time of the decode-only steps of one sequence running alone (each
    step ends when its token is on the host), after a first run that captures graphs."""
    engine = generator.engine
    assert engine is not None
    device = generator.model.device
    times: list[float] = []
    for run in range(2):
        sequence = engine.submit(Sequence(prompt, steps + 1, min_new_tokens=steps + 1))
        engine.step()  # the prefill, and the first token
        while engine.busy:
            synchronize(device)
            started = time.perf_counter()
            engine.step()
            if run:
                times.append(time.perf_counter() - started)
        assert len(sequence.tokens) == steps + 1
    return statistics.median(times)


def tokens_per_second(generator: Generator, prompts: list[str]) -> float:
    """Output tokens per second of one batch of `prompts`, best of two after a warm-up."""
    answers = generator.generate(prompts, NEW_TOKENS)
    assert all(a.new_tokens == NEW_TOKENS for a in answers), "every answer must be full length"
    best = min(seconds(lambda: generator.generate(prompts, NEW_TOKENS)) for _ in range(2))
    return len(prompts) * NEW_TOKENS / best


def counted_flops(generator: Generator, call: Callable[[], object]) -> int:
    """The FLOPs of `call`, its prompt attention masked (the same arithmetic: torch's counter
    cannot follow SDPA's causal bias tensor)."""
    assert generator.engine is not None
    slots = generator.engine.model
    masked = slots.masked_prompts
    slots.masked_prompts = True
    try:
        with FlopCounterMode(display=False) as counter:
            call()
    finally:
        slots.masked_prompts = masked
    return counter.get_total_flops()


def ceilings(device: torch.device, dtype: str) -> dict[str, float]:
    """The device's matmul peak (GFLOP/s) and how fast its memory moves bytes (GB/s): a
    device-to-device copy on a GPU, reading a large tensor on the CPU."""
    if device.type == "cuda":
        return {"matmul_peak_gflops": cuda_matmul_peak_gflops(dtype), "copy_gbs": cuda_copy_gbs()}
    return {"matmul_peak_gflops": matmul_peak_gflops(dtype), "copy_gbs": stream_gbs()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpu_suite(args: argparse.Namespace, record: BenchRecord) -> None:
    overrides = [f"model={args.model}", *args.override, "model.ignore_eos=true"]
    pipeline = RAGPipeline.from_config(compose(overrides))
    engine = pipeline.generator
    assert isinstance(engine, Generator) and engine.engine is not None
    model, device = engine.model, engine.model.device
    today = Generator(model, engine.tokenizer, compose([*overrides, "model.engine=false"]).model)
    dtype = str(model.dtype).removeprefix("torch.")
    runtime = describe_runtime(engine)
    limits = ceilings(device, dtype)
    record.note(
        **runtime, **limits, model=args.model, embedder=engine.cfg.embedder,
        tokenizers="borrowed from packaged models (rag/service/shaped.py), for timing only"
        if runtime["weights"] == "random" else "the models' own",
    )  # fmt: skip
    configured = runtime["decode_step"]
    paths = [configured] if configured == "dynamic" else [configured, "dynamic"]

    prompt = engine.encode(rag_prompts(pipeline, 1, start=200))[0]
    step_s = {}
    for path in paths:
        with decode_path(engine, path):
            step_s[path] = decode_step_seconds(engine, prompt, args.decode_steps)
    weights = weight_bytes(model, rows=1)
    floor_s = weights / (limits["copy_gbs"] * 1e9)

    prompts = rag_prompts(pipeline, args.batch, start=args.batch)
    generators = {"engine": engine, "generate": today}
    rates = {name: tokens_per_second(g, prompts) for name, g in generators.items()}
    with decode_path(engine, "dynamic"):
        flops = counted_flops(engine, lambda: engine.generate(prompts, NEW_TOKENS))
    engine_gflops = flops / (args.batch * NEW_TOKENS / rates["engine"]) / 1e9

    single = rag_prompts(pipeline, LATENCY_PROMPTS, start=300)
    latency = {
        name: statistics.median(
            seconds(lambda g=g, p=p: g.generate([p], NEW_TOKENS)) for p in single
        )
        for name, g in generators.items()
    }
    record.results = {
        "decode_step_s": step_s,
        "decode_weight_bytes": weights,
        "decode_floor_s": floor_s,
        "output_tokens_per_s": rates,
        "engine_gflops": engine_gflops,
        "engine_of_matmul_peak": engine_gflops / limits["matmul_peak_gflops"],
        "batch_1_latency_s": latency,
        "peak_memory_gb": peak_memory_gb(device),
    }
    print(
        "decode step at batch 1: "
        + ", ".join(f"{path} {1e3 * s:.2f} ms" for path, s in step_s.items())
        + f"; floor {1e3 * floor_s:.2f} ms ({weights / 1e9:.2f} GB of weights at "
        f"{limits['copy_gbs']:.0f} GB/s)",
        flush=True,
    )
    print(
        f"batch {args.batch}, {NEW_TOKENS} tokens each: engine {rates['engine']:.0f} tokens/s "
        f"({engine_gflops:.0f} GFLOP/s, {record.results['engine_of_matmul_peak']:.1%} of the "
        f"{limits['matmul_peak_gflops']:.0f} GFLOP/s matmul peak), generate "
        f"{rates['generate']:.0f} tokens/s; batch-1 latency engine {latency['engine']:.3f} s, "
        f"generate {latency['generate']:.3f} s; peak memory "
        f"{record.results['peak_memory_gb']:.2f} GB",
        flush=True,
    )
    record.target(
        "decode step at batch 1 / weight-traffic floor", step_s[configured] / floor_s,
        at_most=MAX_STEP_OVER_FLOOR,
        detail=f"{configured} {1e3 * step_s[configured]:.2f} ms, floor {1e3 * floor_s:.2f} ms"
        + "".join(f"; {p} {step_s[p] / floor_s:.2f}x" for p in paths[1:]),
    )  # fmt: skip
    record.target(
        f"engine / generate output tokens/s (batch {args.batch})",
        rates["engine"] / rates["generate"], at_least=MIN_TOKENS_OVER_GENERATE,
        detail=f"engine {rates['engine']:.0f}, generate {rates['generate']:.0f} tokens/s",
    )  # fmt: skip
