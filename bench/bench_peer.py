"""Our engine against vLLM-CPU (the peer) on this machine: the same prompts, the same
weights, the same torch, one engine after the other, each in a process of its own.

In process: the same RAG prompts (built by our pipeline, 2 retrieved documents each, as
token ids), exactly 32 new tokens, greedy, EOS ignored, at 1, 20 and 40 requests (each
size warmed up, then the median of --repeats runs): our engine (the default: 4-bit decode
up to model.int4_max_rows rows; and all bf16) against vLLM's `LLM.generate` with its
worker in process (bench/peer_vllm.py, run by the peer's interpreter).  Two rounds, the
engines in opposite order; a ratio's figure is the median of the rounds' ratios.  Targets:
requests per second at 20 and at 40 requests >= 1.0x vLLM's; time to 32 tokens at 1
request <= 0.8x vLLM's.

Served (--served): one poisson schedule per rate (4 and 8 requests/s, --served-requests
requests, 240 by default, 32 tokens each) to our batched and continuous servers through
the load generator, and to vLLM's OpenAI server through /v1/completions (`peer_client`),
the same queries at the same moments, the prompts our pipeline builds for them.  Targets,
for our best variant at each rate (the one meeting the most of them, then the lower p99;
the record gives every variant's ratios): throughput >= 1.0x vLLM's, p50 and p99 latency
<= 1.0x.

--steps: where the time goes instead: one run at 1, 8, 20 and 40 requests on each engine,
step by step, each step's wall time split into matmuls, attention and the rest
(`step_profile`); no targets.

The peer lives in its own virtual environment (--peer, its python); without it, nothing is
measured and the record says which paired record its verdicts come from.

    python bench/bench_peer.py [--peer /work/venvs/vllm/bin/python] [--repeats 3]
        [--rounds 2] [--served] [--steps] [--override OVERRIDE ...] [--check]

--override: config overrides for our engines in process (e.g. model.engine_slots=40), to
measure an option against the peer in the same run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from record import BenchRecord, add_check_option

if TYPE_CHECKING:
    from rag.loadgen import LoadConfig

BENCH = Path(__file__).resolve().parent
COMMITTED = BENCH.parent / "test-results" / "bench"
DEFAULT_PEER = "/work/venvs/vllm/bin/python"
BATCHES = (1, 20, 40)
STEP_BATCHES = (1, 8, 20, 40)
NEW_TOKENS = 32
ENGINES = ("ours", "ours_bf16", "vllm")
PEER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "2"}
SERVED_VARIANTS = ("batched", "continuous")
SERVED_RATES = (4.0, 8.0)
# At 8/s both servers run near their capacity, where one 120-request schedule's p50 moved
# by about 15 % from run to run and its throughput was set by its last answer.
SERVED_REQUESTS = 240
WARM_UP_REQUESTS = 4
MIN_THROUGHPUT_RATIO = 1.0
MAX_LATENCY_RATIO = 0.8
MAX_SERVED_LATENCY_RATIO = 1.0


def has_peer(python: str) -> bool:
    """Whether `python` exists and imports vLLM."""
    if not Path(python).exists():
        return False
    found = subprocess.run([python, "-c", "import vllm"], capture_output=True)
    return found.returncode == 0


def model_folder() -> Path:
    """The default generator as safetensors, config and tokenizer (what both engines load):
    the model cache's files, linked, without its 4-bit blocks, since vLLM would load every
    `*.safetensors` it finds as weights."""
    from rag.config import compose
    from rag.service.models import BLOCKS_FILE, dequantized_cache, resolve_source

    cfg = compose([]).model
    cache = dequantized_cache(resolve_source(cfg.generator), cfg)
    folder = Path(tempfile.mkdtemp(prefix="ragbench-peer-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for path in cache.iterdir():
        if path.name != BLOCKS_FILE:
            (folder / path.name).symlink_to(path)
    return folder


def prompt_ids(count: int) -> list[list[int]]:
    """`count` RAG prompts of the built-in queries as our pipeline builds them, token ids."""
    from bench_engine import rag_prompts

    from rag.config import compose
    from rag.service.pipeline import RAGPipeline

    pipeline = RAGPipeline.from_config(compose([]))
    return pipeline.generator.encode(rag_prompts(pipeline, count))


def run_engine(
    engine: str, peer: str, prompts: Path, model: Path, extra: list[str], overrides: list[str]
) -> dict:
    """One engine in a fresh process (ours under `overrides`): its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        common = ["--prompts", str(prompts), "--out", out.name, *extra]
        if engine == "vllm":
            command = [peer, str(BENCH / "peer_vllm.py"), "--model", str(model), *common]
            env = {**os.environ, **PEER_ENV}
        else:
            int4 = "true" if engine == "ours" else "false"
            command = [sys.executable, __file__, "--child", int4, *common]
            command += ["--override", *overrides] if overrides else []
            env = dict(os.environ)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{engine} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def child(
    int4: str,
    prompts_path: str,
    out: str,
    batches: list[int],
    repeats: int,
    steps: bool,
    overrides: list[str],
):
    """Our side of `run_engine`: the default generator with the engine, 4-bit decode on or
    off, timing `Engine.generate` and decoding the text, as vLLM's `LLM.generate` does."""
    import torch
    from step_profile import profiled

    from rag.config import compose
    from rag.service.engine.int4_rows import int4_rows
    from rag.service.models import load_generator

    prompts = json.loads(Path(prompts_path).read_text())
    started = time.perf_counter()
    overrides = ["model.ignore_eos=true", f"model.int4_decode={int4}", *overrides]
    generator = load_generator(compose(overrides).model)
    engine = generator.engine
    assert engine is not None
    result: dict = {"load_s": time.perf_counter() - started, "batches": {}}

    def sequences(batch: int) -> list:
        return [generator.sequence(ids, NEW_TOKENS) for ids in prompts[:batch]]

    def generate(batch: int) -> list:
        done = engine.generate(sequences(batch))
        [generator.decode(s.tokens) for s in done]  # the text, as vLLM's generate gives it
        return done

    for batch in batches:
        generate(batch)  # warm-up
        if steps:
            for sequence in sequences(batch):
                engine.submit(sequence)
            taken = []
            while engine.busy:
                report, step = profiled(engine.step)
                tokens = report.prefill_tokens + report.decoded
                rows = report.prefilled + report.decoded
                taken.append({"tokens": tokens, "rows": rows, **step})
            result["batches"][batch] = taken
            continue
        seconds, tokens = [], []
        for _ in range(repeats):
            begun = time.perf_counter()
            done = generate(batch)
            seconds.append(time.perf_counter() - begun)
            tokens = tokens or [s.tokens for s in done]
        result["batches"][batch] = {"seconds": seconds, "tokens": tokens}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["torch_threads"] = torch.get_num_threads()
    result["int4_max_rows"] = int4_rows(generator.model)
    Path(out).write_text(json.dumps(result))


def in_process(
    peer: str, prompts: Path, model: Path, rounds: int, repeats: int, overrides: list[str]
) -> list[dict]:
    """`rounds` rounds of every engine at every batch size, the order reversed each round."""
    extra = ["--batches", *map(str, BATCHES), "--repeats", str(repeats)]
    results = []
    for n in range(rounds):
        order = ENGINES if n % 2 == 0 else ENGINES[::-1]
        results.append({e: run_engine(e, peer, prompts, model, extra, overrides) for e in order})
        for engine in ENGINES:
            figures = ", ".join(
                f"{b}: {statistics.median(results[-1][engine]['batches'][str(b)]['seconds']):.3f} s"
                for b in BATCHES
            )
            print(f"round {n} {engine}: {figures}", flush=True)
    return results


def median_seconds(result: dict, batch: int) -> float:
    return statistics.median(result["batches"][str(batch)]["seconds"])


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of positions where two engines chose the same token, before each
    sequence's first difference (what follows a difference continues another text)."""
    kept = 0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        kept += n
    return kept / max(1, sum(len(x) for x in a))


def step_summary(steps: list[dict]) -> dict[str, dict[str, float]]:
    """A run's steps in two kinds, prefill (some prompt tokens) and decode-only: how many,
    and the milliseconds of a step of that kind on average, in all and by category."""
    summary = {}
    for kind, chosen in (
        ("prefill", [s for s in steps if s["tokens"] > s["rows"]]),
        ("decode", [s for s in steps if s["tokens"] == s["rows"]]),
    ):
        if not chosen:
            continue
        mean = {key: 1e3 * statistics.mean(s[key] for s in chosen) for key in (
            "seconds", "matmul_s", "attention_s")}  # fmt: skip
        summary[kind] = {
            "steps": len(chosen),
            "tokens": statistics.mean(s["tokens"] for s in chosen),
            "step_ms": mean["seconds"],
            "matmul_ms": mean["matmul_s"],
            "attention_ms": mean["attention_s"],
            "rest_ms": mean["seconds"] - mean["matmul_s"] - mean["attention_s"],
        }
    return summary


def where_time_goes(peer: str, prompts: Path, model: Path, overrides: list[str]) -> dict:
    """Each engine step by step at STEP_BATCHES: `step_summary` of each run."""
    extra = ["--batches", *map(str, STEP_BATCHES), "--steps"]
    found: dict = {}
    for engine in ENGINES:
        runs = run_engine(engine, peer, prompts, model, extra, overrides)["batches"]
        found[engine] = {b: step_summary(runs[str(b)]) for b in STEP_BATCHES}
        for b in STEP_BATCHES:
            for kind, s in found[engine][b].items():
                print(
                    f"{engine} {b} requests, {s['steps']} {kind} steps of {s['tokens']:.0f} "
                    f"tokens: {s['step_ms']:.1f} ms = matmul {s['matmul_ms']:.1f} + attention "
                    f"{s['attention_ms']:.1f} + rest {s['rest_ms']:.1f}",
                    flush=True,
                )
    return found


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PeerServer:
    """vLLM's OpenAI server on the default generator, in a process group of its own,
    ready once /health answers; stopped (SIGTERM, then SIGKILL) on leaving."""

    def __init__(self, peer: str, model: Path, log: Path, ready_timeout_s: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            peer, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "peer", "--dtype", "bfloat16", "--max-model-len", "1056",
            "--kv-cache-memory-bytes", str(1 << 30), "--no-enable-prefix-caching",
            "--seed", "0", "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.log = log
        self.ready_timeout_s = ready_timeout_s

    def __enter__(self) -> PeerServer:
        from rag.cluster.process import http_get, log_tail, spawn

        self.process = spawn(self.command, self.log, PEER_ENV)
        deadline = time.monotonic() + self.ready_timeout_s
        while http_get(f"{self.url}/health")[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"vLLM's server did not start:\n{log_tail(self.log)}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        from rag.cluster.process import stop_group

        stop_group(self.process, 30)


def query_prompts(queries: list[str]) -> dict[str, list[int]]:
    """Each query's RAG prompt as our server builds it (2 documents), token ids."""
    from rag.config import compose
    from rag.service.pipeline import Prepared, RAGPipeline

    pipeline = RAGPipeline.from_config(compose([]))
    prepared = pipeline.prepare(pipeline.ask(queries, [2] * len(queries)))
    assert all(isinstance(p, Prepared) for p in prepared)
    ids = pipeline.generator.encode([p.prompt for p in prepared])  # type: ignore[union-attr]
    return dict(zip(queries, ids, strict=True))


def served_load(url: str, rate: float, count: int) -> LoadConfig:
    """The served comparison's schedule at `rate`: poisson, seeded, `count` requests."""
    from rag.loadgen import LoadConfig

    return LoadConfig(target=url, timing_mode="poisson", rps=rate, num_requests=count,
                      seed=0, timeout=120, progress=False)  # fmt: skip


def served(
    peer: str, model: Path, rates: list[float], requests: int, logs: Path
) -> tuple[dict, dict]:
    """Every rate's poisson schedule (seeded alike) to our batched and continuous servers
    and to vLLM's, one server at a time, each warmed by a few requests first: summaries,
    and what each of our servers ran on (its /stats runtime: threads, 4-bit rows)."""
    import httpx
    from peer_client import run_completions

    from rag.cluster.process import ServerProcess
    from rag.loadgen import run_load
    from rag.loadgen.schedule import load_prompts

    results: dict = {}
    runtimes: dict = {}
    for variant in SERVED_VARIANTS:
        with ServerProcess([f"variant={variant}", "model.ignore_eos=true"]) as server:
            run_load(served_load(server.url, 4, WARM_UP_REQUESTS))
            results[variant] = {
                rate: run_load(served_load(server.url, rate, requests))[1] for rate in rates
            }
            runtimes[variant] = httpx.get(f"{server.url}/stats", timeout=10).json()["runtime"]
    prompts = query_prompts([p.text for p in load_prompts()])
    with PeerServer(peer, model, logs / "vllm-server.log") as server:
        send = lambda rate, count=requests: run_completions(  # noqa: E731
            served_load(server.url, rate, count), prompts, "peer", NEW_TOKENS
        )[1]
        send(4, WARM_UP_REQUESTS)
        results["vllm"] = {rate: send(rate) for rate in rates}
    for name, by_rate in results.items():
        for rate, s in by_rate.items():
            print(
                f"served {name} at {rate:g}/s: {s['throughput_rps']:.2f}/s, p50 "
                f"{s['latency_adj_p50_s']:.2f} s, p99 {s['latency_adj_p99_s']:.2f} s, "
                f"{s['ok']}/{s['scheduled']} ok",
                flush=True,
            )
    return results, runtimes


def judge_in_process(record: BenchRecord, rounds: list[dict]) -> None:
    """The in-process targets, each the median of the rounds' ratios ours / vLLM."""

    def ratios(engine: str, batch: int) -> list[float]:
        return [median_seconds(r[engine], batch) / median_seconds(r["vllm"], batch) for r in rounds]

    for batch in BATCHES:
        ours, bf16 = ratios("ours", batch), ratios("ours_bf16", batch)
        seconds = {e: [median_seconds(r[e], batch) for r in rounds] for e in ENGINES}
        detail = (
            "; ".join(f"{e} " + " / ".join(f"{s:.3f}" for s in seconds[e]) + " s" for e in ENGINES)
            + f"; all bf16 {statistics.median(bf16):.2f}x"
        )
        if batch == 1:
            record.target(
                "1 request, time to 32 tokens, ours / vLLM", statistics.median(ours),
                at_most=MAX_LATENCY_RATIO, detail=detail,
            )  # fmt: skip
        else:
            record.target(
                f"{batch} requests, throughput, ours / vLLM", 1 / statistics.median(ours),
                at_least=MIN_THROUGHPUT_RATIO, detail=detail,
            )  # fmt: skip


def served_ratios(ours: dict, peer: dict) -> dict[str, float]:
    """One of our servers' served figures over vLLM's: throughput, p50, p99."""
    return {
        "throughput": ours["throughput_rps"] / peer["throughput_rps"],
        **{f"p{p}": ours[f"latency_adj_p{p}_s"] / peer[f"latency_adj_p{p}_s"] for p in (50, 99)},
    }


def served_met(ratios: dict[str, float]) -> int:
    """How many of the three served targets these ratios meet."""
    latencies = (ratios["p50"], ratios["p99"])
    return (ratios["throughput"] >= MIN_THROUGHPUT_RATIO) + sum(
        r <= MAX_SERVED_LATENCY_RATIO for r in latencies
    )


def judge_served(record: BenchRecord, results: dict) -> None:
    """At each rate, our best variant against vLLM: the one meeting the most of the three
    targets (throughput, p50, p99), then the one with the lower p99; the detail gives the
    other variants' ratios too."""
    for rate in SERVED_RATES:
        peer = results["vllm"][rate]
        ratios = {v: served_ratios(results[v][rate], peer) for v in SERVED_VARIANTS}
        best = max(SERVED_VARIANTS, key=lambda v: (served_met(ratios[v]), -ratios[v]["p99"]))
        ours = results[best][rate]
        others = "; ".join(
            f"{v} " + ", ".join(f"{k} {r:.2f}" for k, r in ratios[v].items())
            for v in SERVED_VARIANTS if v != best
        )  # fmt: skip
        detail = f"{best}; vLLM {peer['throughput_rps']:.2f}/s, p50 " \
            f"{peer['latency_adj_p50_s']:.2f} s, p99 {peer['latency_adj_p99_s']:.2f} s; " \
            f"{others}"  # fmt: skip
        record.target(
            f"served {rate:g}/s, throughput, ours / vLLM", ratios[best]["throughput"],
            at_least=MIN_THROUGHPUT_RATIO, detail=detail,
        )  # fmt: skip
        for p in (50, 99):
            key = f"latency_adj_p{p}_s"
            record.target(
                f"served {rate:g}/s, p{p}, ours / vLLM", ratios[best][f"p{p}"],
                at_most=MAX_SERVED_LATENCY_RATIO, detail=f"{best}: {ours[key]:.2f} s",
            )  # fmt: skip


def carried_forward(record: BenchRecord, peer: str) -> int:
    """Without the peer: the verdicts of the newest committed paired record, said so."""
    paired = sorted(COMMITTED.glob("peer-*.json"))
    print(f"vLLM-CPU is not installed at {peer}: nothing measured", flush=True)
    if not paired:
        return record.finish()
    last = json.loads(paired[-1].read_text())
    record.note(peer="not installed", carried_from=paired[-1].name)
    for t in last["targets"]:
        bound = float(t["criterion"].split()[1].removesuffix(t["unit"]))
        kind = "at_least" if t["criterion"].startswith(">=") else "at_most"
        record.target(
            t["name"], t["figure"], unit=t["unit"], **{kind: bound},
            detail=f"not measured now: the ratio of {paired[-1].name}",
        )  # fmt: skip
    return record.finish()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", default=DEFAULT_PEER, help="the peer's python (vLLM-CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--served", action="store_true", help="also the served comparison")
    parser.add_argument("--served-requests", type=int, default=SERVED_REQUESTS,
                        help="requests per rate in the served comparison")  # fmt: skip
    parser.add_argument("--steps", action="store_true", help="where the time goes instead")
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="OVERRIDE",
        help="config overrides for our engines in process (e.g. model.engine_slots=40)",
    )  # fmt: skip
    parser.add_argument("--child", choices=("true", "false"), help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", help=argparse.SUPPRESS)
    add_check_option(parser)
    args = parser.parse_args()
    if args.child:
        child(
            args.child, args.prompts, args.out, args.batches, args.repeats, args.steps,
            args.override,
        )  # fmt: skip
        return 0
    record = BenchRecord("peer", vars(args))
    if not has_peer(args.peer):
        return carried_forward(record, args.peer)
    model = model_folder()
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as work:
        prompts = Path(work) / "prompts.json"
        ids = prompt_ids(max(STEP_BATCHES + BATCHES))
        prompts.write_text(json.dumps(ids))
        record.note(prompt_tokens=[len(i) for i in ids], peer_env=PEER_ENV)
        if args.steps:
            record.results["steps"] = where_time_goes(args.peer, prompts, model, args.override)
            return record.finish()
        rounds = in_process(args.peer, prompts, model, args.rounds, args.repeats, args.override)
        record.note(peer=rounds[0]["vllm"]["versions"])
        last = rounds[-1]
        record.results["in_process"] = [
            {e: {k: v for k, v in r[e].items() if k != "batches"}
             | {"seconds": {b: x["seconds"] for b, x in r[e]["batches"].items()}}
             for e in ENGINES}
            for r in rounds
        ]  # fmt: skip
        tokens = {e: last[e]["batches"][str(max(BATCHES))]["tokens"] for e in ENGINES}
        record.results["token_agreement_with_vllm"] = {
            e: token_agreement(tokens[e], tokens["vllm"]) for e in ("ours", "ours_bf16")
        }
        judge_in_process(record, rounds)
        if args.served:
            results, runtimes = served(
                args.peer, model, list(SERVED_RATES), args.served_requests, Path(work)
            )
            record.note(served_runtime=runtimes)
            record.results["served"] = results
            judge_served(record, results)
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
