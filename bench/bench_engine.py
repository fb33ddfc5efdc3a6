"""The generation engine against transformers' `generate` (today's path, `model.engine=false`)
on the default models, side by side in one process.

1. batch-1 latency for 32 new tokens (`ignore_eos`) on RAG prompts of the built-in queries:
   engine / today, median of per-prompt ratios (target <= 0.5); beside it, what each option
   buys: the engine without 4-bit decode (static KV slots, packed prefill), without the
   shared prefix, and with both;
2. 4-bit token agreement: along greedy answers of natural length (EOS allowed), the share
   of positions where 4-bit decode chooses the token bf16 decode chooses, teacher-forced
   (target >= 0.95); beside it, whole answers of the engine (4-bit and bf16) against
   today's path, where one flipped near-tie changes the rest of an answer;
3. saturated throughput of `answer_batch` at `--batch` on the engine, FLOP/s by torch's
   FlopCounterMode over the same batch, against the bf16 matmul peak measured in this
   process (target >= 60 %); today's path at the same batch beside it;
   beside it, where the batch's time goes on the engine: its prefill passes against the
   matmul peak, its decode-only steps' bytes (weights as read at that many rows, keys and
   values of every row) against the stream bandwidth, and the FLOP rate the batch would
   reach if both ran at those ceilings (a roofline: what the kernels leave on the table);
4. peak RSS of a process that loads the default pipeline and answers a batch and a single
   request on the engine (target <= 1.5 GB).

On a GPU (a preset whose device is CUDA, or `--suite gpu`) the targets are those of
`engine_gpu.py` instead.

    python bench/bench_engine.py [--prompts 6] [--agreement 24] [--batch 20] [--check]
    python bench/bench_engine.py --model a6000-shaped [--batch 32] [--decode-steps 64]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from bench_pipeline import demo_queries
from record import BenchRecord, add_check_option, matmul_peak_gflops, stream_gbs
from torch.utils.flop_counter import FlopCounterMode

from rag.config import compose
from rag.service.engine.int4 import Int4Linear
from rag.service.engine.packed import PackedLinear
from rag.service.generator import Generator
from rag.service.models import load_generator, pick_device
from rag.service.pipeline import Prepared, RAGPipeline
from rag.service.questions import Decoding, Question

MAX_LATENCY_RATIO = 0.5
MIN_AGREEMENT = 0.95
MIN_OF_PEAK = 0.60
MAX_RSS_GB = 1.5


@contextmanager
def without_int4(generator: Generator) -> Iterator[None]:
    """Every 4-bit layer multiplies with its dense weight for the duration."""
    layers = [m for m in generator.model.modules() if isinstance(m, Int4Linear)]
    kept = [layer.max_rows for layer in layers]
    for layer in layers:
        layer.max_rows = 0
    try:
        yield
    finally:
        for layer, rows in zip(layers, kept, strict=True):
            layer.max_rows = rows


@contextmanager
def without_prefix(generator: Generator) -> Iterator[None]:
    assert generator.engine is not None
    prefix = list(generator.engine.prefix)
    generator.engine.set_shared_prefix([])
    try:
        yield
    finally:
        generator.engine.set_shared_prefix(prefix)


def generate(generator: Generator, prompts: list[str], max_new_tokens: int) -> list:
    """The generator's answers to `prompts`, each at most `max_new_tokens` long (the
    configuration's other settings)."""
    decoding = Decoding.configured(generator.cfg, max_new_tokens)
    return generator.generate(prompts, [Question(p, 0, decoding) for p in prompts])


def seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def rag_prompts(pipeline: RAGPipeline, n: int, start: int = 0) -> list[str]:
    queries = demo_queries(n, start)
    prepared = pipeline.prepare(pipeline.ask(queries, [2] * n))
    return [p.prompt for p in prepared if isinstance(p, Prepared)]


def latencies(engine: Generator, today: Generator, prompts: list[str]) -> dict[str, float]:
    """Median seconds of each path for one prompt and 32 tokens, the paths interleaved per
    prompt so that they see the same moments of the machine; and the median ratios."""
    paths: dict[str, Callable[[str], object]] = {
        "today": lambda p: generate(today, [p], 32),
        "engine": lambda p: generate(engine, [p], 32),
    }

    def variant(*contexts: Callable[[Generator], object]) -> Callable[[str], object]:
        def run(p: str) -> object:
            with _all(engine, contexts):
                return generate(engine, [p], 32)

        return run

    paths["engine_bf16"] = variant(without_int4)
    paths["engine_no_prefix"] = variant(without_prefix)
    paths["engine_bf16_no_prefix"] = variant(without_int4, without_prefix)
    for run in paths.values():
        run(prompts[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    for prompt in prompts:
        for name, run in paths.items():
            times[name].append(seconds(lambda run=run, prompt=prompt: run(prompt)))
    result = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    for name in paths:
        ratios = [a / b for a, b in zip(times[name], times["today"], strict=True)]
        result[f"{name}_ratio"] = statistics.median(ratios)
    return result


@contextmanager
def _all(generator: Generator, contexts: tuple) -> Iterator[None]:
    if not contexts:
        yield
        return
    with contexts[0](generator), _all(generator, contexts[1:]):
        yield


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def free_running(engine: Generator, today: Generator, prompts: list[str]) -> dict[str, float]:
    """Whole answers against today's: the share of today's tokens (of the answer text) each
    engine path reproduces before it first differs (what follows a difference is another
    answer, not another token), and the share of identical answers.  Any rounding
    difference, bf16's included, can flip a near-tie and so a whole answer's tail."""
    reference = [today.generate([p])[0] for p in prompts]
    ids = [today.tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in reference]
    result: dict[str, float] = {}
    for name, contexts in (("int4", ()), ("bf16", (without_int4,))):
        with _all(engine, contexts):
            answers = [engine.generate([p])[0] for p in prompts]
        mine = [engine.tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in answers]
        kept = sum(common_prefix(a, b) for a, b in zip(mine, ids, strict=True))
        result[f"{name}_vs_today_prefix_share"] = kept / max(1, sum(len(b) for b in ids))
        same = sum(a.text == b.text for a, b in zip(answers, reference, strict=True))
        result[f"{name}_vs_today_identical_answers"] = same / len(prompts)
    return result


def forced_agreement(engine: Generator, prompts: list[str]) -> float:
    """Token agreement of 4-bit decode: along each bf16 greedy answer (teacher forcing, so
    one different choice does not change what follows), the share of positions where
    decoding with 4-bit weights chooses the token decoding with bf16 weights chooses."""
    assert engine.engine is not None
    slots = engine.engine.model

    def choices(prompt: list[int], answer: list[int]) -> list[int]:
        picks = [int(slots.prefill([(0, prompt, 0)]).argmax(-1)[0])]
        for n, token in enumerate(answer[:-1]):
            picks.append(int(slots.decode([token], [len(prompt) + n]).argmax(-1)[0]))
        return picks

    agreed = total = 0
    for prompt in engine.encode(prompts):
        with without_int4(engine):
            answer = engine.engine.generate([engine.sequence(prompt)])[0].tokens
            dense = choices(prompt, answer)
        packed = choices(prompt, answer)
        agreed += sum(a == b for a, b in zip(packed, dense, strict=True))
        total += len(dense)
    return agreed / total


def throughput(pipeline: RAGPipeline, batch: int) -> dict[str, float]:
    """Requests per second of `answer_batch` at `batch` (fixed work: ignore_eos), the
    best of two runs after a warm-up, and its FLOP/s by FlopCounterMode's count of a run."""
    queries = demo_queries(batch, start=batch)
    ks = [2] * batch
    pipeline.answer_batch(queries, ks)
    best = min(seconds(lambda: pipeline.answer_batch(queries, ks)) for _ in range(2))
    with FlopCounterMode(display=False) as flops:
        pipeline.answer_batch(queries, ks)
    return {"rps": batch / best, "gflops": flops.get_total_flops() / best / 1e9}


def read_bytes(linear: torch.nn.Module, rows: int) -> int:
    """The weight bytes a linear layer reads to multiply `rows` rows."""
    if isinstance(linear, Int4Linear) and rows <= linear.max_rows:
        return sum(t.nbytes for t in (*linear.packed, *linear.scales))
    dense = linear.dense if isinstance(linear, Int4Linear) else linear
    return dense.nbytes if isinstance(dense, PackedLinear) else dense.weight.nbytes


def weight_bytes(model: torch.nn.Module, rows: int) -> int:
    """The weight bytes one pass of the engine's forward reads at `rows` rows."""
    layers = [
        linear
        for layer in model.model.layers
        for linear in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj,
            layer.mlp.gate_up_proj, layer.mlp.down_proj,
        )
    ]  # fmt: skip
    return sum(read_bytes(linear, rows) for linear in (*layers, model.lm_head))


def breakdown(generator: Generator, prompts: list[str], peak: float) -> dict[str, float]:
    """A batch of `prompts` (32 tokens each) on the engine, step by step: the passes that
    prefill (compute-bound: FLOP/s against the matmul peak) and the decode-only steps
    (bandwidth-bound: the bytes each reads against the stream bandwidth); and the ceiling,
    the FLOP rate of the batch were each at its bound.  FLOPs are counted in a second run of
    the same steps, since counting slows each operation."""
    engine = generator.engine
    assert engine is not None
    model = generator.model
    kv_bytes = 2 * engine.model.cache.keys[:, 0, 0].nbytes  # one position, every layer

    def run(between: Callable[[], float]) -> list[tuple[bool, int, int, float]]:
        steps = []
        sequences = [generator.sequence(ids, 32) for ids in generator.encode(prompts)]
        for sequence in sequences:
            sequence.min_new_tokens = 32
            engine.submit(sequence)
        while engine.busy:
            rows = len(engine.active)
            span = max((s.cached for s in engine.active), default=-1) + 1
            before = between()
            report = engine.step()
            steps.append((bool(report.prefilled), rows, span, between() - before))
        return steps

    timed = run(time.perf_counter)
    with FlopCounterMode(display=False) as counter:
        counted = run(counter.get_total_flops)
    flops = [c[3] for c in counted]
    peak_flops, bandwidth = peak * 1e9, stream_gbs() * 1e9
    prefill = [(t[3], f) for t, f in zip(timed, flops, strict=True) if t[0]]
    decode = [(t[3], f, t[1], t[2]) for t, f in zip(timed, flops, strict=True) if not t[0]]
    prefill_s, prefill_flops = (sum(x) for x in zip(*prefill, strict=True))
    decode_s = sum(d[0] for d in decode)

    def step_bytes(rows: int, span: int, weight_rows: int) -> int:
        """A decode step's bytes: its weights as read at `weight_rows` rows, then the keys
        and values of every row."""
        return weight_bytes(model, weight_rows) + rows * span * kv_bytes

    def decode_floor(int4_every_row: bool) -> float:
        """The decode steps' seconds were each at its bound: FLOPs at the matmul peak, or
        bytes at the stream bandwidth, whichever takes longer."""
        return sum(
            max(f / peak_flops, step_bytes(rows, span, 1 if int4_every_row else rows) / bandwidth)
            for _, f, rows, span in decode
        )

    read = sum(step_bytes(rows, span, rows) for _, _, rows, span in decode)
    as_read, as_int4 = decode_floor(False), decode_floor(True)
    prefill_floor = prefill_flops / peak_flops
    total = sum(flops)
    return {
        "prefill_s": prefill_s,
        "prefill_of_peak": prefill_flops / prefill_s / peak_flops,
        "decode_steps": len(decode),
        "decode_s": decode_s,
        "decode_gbs": read / decode_s / 1e9,
        "stream_gbs": bandwidth / 1e9,
        "decode_floor_s": as_read,
        "of_peak": total / (prefill_s + decode_s) / peak_flops,
        "ceiling_of_peak": total / (prefill_floor + as_read) / peak_flops,
        "ceiling_of_peak_int4_every_row": total / (prefill_floor + as_int4) / peak_flops,
    }


def child_peak_rss_gb(batch: int, overrides: list[str]) -> float:
    """Peak RSS of a fresh process that loads the pipeline and answers a batch and one
    request on the engine."""
    code = (
        "import resource, sys\n"
        "sys.path.insert(0, 'bench')\n"
        "from rag.config import compose\n"
        "from rag.service.pipeline import RAGPipeline\n"
        "from bench_pipeline import demo_queries\n"
        f"p = RAGPipeline.from_config(compose({overrides!r}))\n"
        "p.warm_up()\n"
        f"p.answer_batch(demo_queries({batch}), [2] * {batch})\n"
        "p.answer_batch(demo_queries(1), [2])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=6, help="prompts timed at batch 1")
    parser.add_argument("--agreement", type=int, default=24, help="prompts compared")
    parser.add_argument("--batch", type=int, default=20, help="batch of the throughput figure")
    parser.add_argument("--model", default="smollm2-cpu", help="model preset")
    parser.add_argument("--override", nargs="*", default=[], metavar="OVERRIDE")
    parser.add_argument(
        "--suite", choices=("auto", "cpu", "gpu"), default="auto",
        help="cpu: this module's targets; gpu: engine_gpu.py's (on any device: the dry run "
        "uses it on the CPU); auto: gpu where the preset runs on CUDA",
    )  # fmt: skip
    parser.add_argument("--decode-steps", type=int, default=64, help="gpu: steps timed")
    add_check_option(parser)
    args = parser.parse_args()
    base = [f"model={args.model}", *args.override]
    if args.suite == "gpu" or (
        args.suite == "auto" and pick_device(compose(base).model.device).type == "cuda"
    ):
        from engine_gpu import gpu_suite

        record = BenchRecord("engine-gpu", vars(args))
        gpu_suite(args, record)
        return record.finish(args.check)
    record = BenchRecord("engine", vars(args))

    rss_gb = child_peak_rss_gb(args.batch, base)  # first, while this process holds no model
    pipeline = RAGPipeline.from_config(compose(base))
    engine = pipeline.generator
    assert isinstance(engine, Generator) and engine.engine is not None
    today = load_generator(compose([*base, "model.engine=false"]).model)
    dtype = str(engine.model.dtype).removeprefix("torch.")
    record.note(dtype=dtype, shared_prefix_tokens=len(engine.engine.prefix))

    timed = latencies(engine, today, rag_prompts(pipeline, args.prompts))
    agreement_prompts = rag_prompts(pipeline, args.agreement, start=100)
    agreed = free_running(engine, today, agreement_prompts)
    agreed["int4_forced_agreement"] = forced_agreement(engine, agreement_prompts)
    peak_before = matmul_peak_gflops(dtype)
    fixed = compose([*base, "model.ignore_eos=true"]).model
    engine.cfg, today.cfg = fixed, fixed  # every request generates max_new_tokens
    served = throughput(pipeline, args.batch)
    where = breakdown(engine, rag_prompts(pipeline, args.batch, start=args.batch), peak_before)
    pipeline.generator = today
    served_today = throughput(pipeline, args.batch)
    peak = max(peak_before, matmul_peak_gflops(dtype))
    record.note(matmul_peak_gflops=peak)
    record.results = {
        "latency": timed,
        "agreement": agreed,
        "throughput": {"engine": served, "today": served_today},
        "batch_breakdown": where,
        "peak_rss_gb": rss_gb,
        "max_rss_of_this_process_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        "batch-1 latency, 32 tokens (s): "
        + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in timed.items() if k.endswith("_s")),
        flush=True,
    )
    print(
        f"batch {args.batch}: engine {served['rps']:.2f} req/s, {served['gflops']:.0f} GFLOP/s; "
        f"today {served_today['rps']:.2f} req/s, {served_today['gflops']:.0f} GFLOP/s; "
        f"matmul peak {peak:.0f} GFLOP/s ({dtype})",
        flush=True,
    )
    print(
        f"batch {args.batch} on the engine: prefill passes {where['prefill_s']:.2f} s at "
        f"{where['prefill_of_peak']:.0%} of the matmul peak; {where['decode_steps']} decode "
        f"steps {where['decode_s']:.2f} s reading {where['decode_gbs']:.0f} GB/s of the "
        f"{where['stream_gbs']:.0f} GB/s this machine streams (floor "
        f"{where['decode_floor_s']:.2f} s); roofline ceiling {where['ceiling_of_peak']:.0%} "
        f"of peak ({where['ceiling_of_peak_int4_every_row']:.0%} with 4-bit weights at "
        "every row count)",
        flush=True,
    )
    record.target(
        "batch-1 latency engine / today", timed["engine_ratio"], at_most=MAX_LATENCY_RATIO,
        detail=f"engine {timed['engine_s']:.3f} s vs today {timed['today_s']:.3f} s",
    )  # fmt: skip
    record.target(
        "4-bit token agreement (teacher-forced)", agreed["int4_forced_agreement"],
        at_least=MIN_AGREEMENT, fmt=".3f",
        detail="whole answers vs today: tokens kept before a first difference "
        f"int4 {agreed['int4_vs_today_prefix_share']:.2f}, bf16 engine "
        f"{agreed['bf16_vs_today_prefix_share']:.2f}; identical answers int4 "
        f"{agreed['int4_vs_today_identical_answers']:.2f}, bf16 engine "
        f"{agreed['bf16_vs_today_identical_answers']:.2f}",
    )  # fmt: skip
    record.target(
        f"saturated throughput / matmul peak (batch {args.batch})", served["gflops"] / peak,
        at_least=MIN_OF_PEAK,
        detail=f"today's path {served_today['gflops'] / peak:.2f}; engine "
        f"{served['rps'] / served_today['rps']:.2f}x today's req/s; roofline ceiling of the "
        f"engine's batch {where['ceiling_of_peak']:.2f}",
    )  # fmt: skip
    record.target("peak RSS, default models", rss_gb, at_most=MAX_RSS_GB, unit=" GB")
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
