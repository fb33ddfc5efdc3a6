"""A decode step's products alone, ours (dense and 4-bit) beside vLLM-CPU's, at each row count.

`bench_peer.py --steps` found a decode step's matmuls the one part still slower than
vLLM's (12.6 against 10.8 ms at 20 rows), with the same torch and the same oneDNN under
both.  This separates the products from the rest of a step: the generator's layers (every
layer's fused q/k/v, o, fused gate/up and down, then the vocabulary's head) at the default
model's shapes, each layer with weights of its own so that a step streams them from memory
as the engine's does, timed as a step's sequence, in fresh processes taking turns:

- `packed`: ours, the engine's own layer (`rag/service/engine/packed.py`: the weight
  reordered once for oneDNN, `mkldnn._linear_pointwise` per call);
- `packed_rows`: the same, its layout chosen for the step's own row count, not for 128;
- `linear`: `F.linear` on the dense weight (oneDNN reorders it at every call);
- `four_bit`: the engine's 4-bit layer (`rag/service/engine/int4.py`, the kernel the
  engine multiplies decode steps of up to `model.int4_max_rows` rows with), on random
  codes and scales (a product's time does not depend on them), the head in two 4-bit
  halves as the default model's Q8_0 head is;
- `vllm`: vLLM-CPU's `onednn_mm` (a handle made once from the transposed weight, as its
  `dispatch_cpu_unquantized_gemm` does), run by the peer's own interpreter.

    ragbench-bench .venv/bin/python bench/matmul_peer.py [--rows 1 8 20 24 40]

And what a call costs around the kernel: a product of one row of 64 by 64, called 2,000
times.  Only the figures of one run compare.  The peer's interpreter runs this file as it
is: what it measures there imports only torch and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("packed", "packed_rows", "linear", "four_bit", "vllm")
ROWS = (1, 2, 4, 6, 8, 12, 16, 20, 24, 40)
PEER_ENV = {"OMP_NUM_THREADS": "2"}
DEFAULT_PEER = "/work/venvs/vllm/bin/python"
TARGET_ROWS = 20  # the row count whose ratio is judged: a served decode step's
MAX_RATIO = 1.0


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's products, fused as the engine fuses them."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    return [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * inner), (inner, hidden)]


def measure(kind: str, spec: dict, out: str) -> None:
    """Time `kind`'s step at each row count (run in a fresh process per kind)."""
    import torch

    torch.manual_seed(0)
    shapes = [tuple(s) for s in spec["layer"]] * spec["layers"] + [tuple(spec["head"])]
    weights = [torch.randn(o, i, dtype=torch.bfloat16) / i**0.5 for i, o in shapes]
    halves = [1] * (len(shapes) - 1) + [2]  # the head's Q8_0 is two 4-bit halves
    figures = {}
    for rows in spec["rows"]:
        products = [make_product(kind, w, rows, n) for w, n in zip(weights, halves, strict=True)]
        inputs = {i: torch.randn(rows, i, dtype=torch.bfloat16) for i, _ in shapes}
        step = [(product, inputs[i]) for product, (i, _) in zip(products, shapes, strict=True)]
        seconds = []
        for _ in range(spec["warmup"] + spec["repeats"]):
            started = time.perf_counter()
            for product, x in step:
                product(x)
            seconds.append(time.perf_counter() - started)
        figures[str(rows)] = statistics.median(seconds[spec["warmup"] :]) * 1e3
        del products
    Path(out).write_text(json.dumps({
        "ms_per_step": figures,
        "us_per_call": call_cost(kind),
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


def call_cost(kind: str, calls: int = 2000) -> float:
    """Microseconds a call of a product too small to cost anything itself (one row of 64
    by 64): what `kind` spends around oneDNN's kernel (the best of 5 runs)."""
    import torch

    product = make_product(kind, torch.randn(64, 64, dtype=torch.bfloat16), 1, 1)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    runs = []
    for _ in range(6):
        started = time.perf_counter()
        for _ in range(calls):
            product(x)
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return min(runs[1:])


def make_product(kind: str, weight, rows: int, parts: int):
    """The function computing x @ weight.T the way `kind` does (`four_bit`: a 4-bit
    matrix of `parts` parts of weight's shape instead)."""
    import torch
    import torch.nn.functional as F

    if kind == "linear":
        return lambda x: F.linear(x, weight)
    if kind == "packed":  # the engine's own layer (our interpreter runs this kind)
        from rag.service.engine.packed import PackedLinear

        dense = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        dense.weight.data = weight
        return PackedLinear(dense).multiply
    if kind == "four_bit":
        return four_bit_layer(weight.shape, parts, rows).four_bit_product
    if kind == "packed_rows":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    from vllm import _custom_ops as ops

    handler = ops.create_onednn_mm(weight.t(), 32)
    return lambda x: ops.onednn_mm(handler, x, None)


def four_bit_layer(shape, parts: int, rows: int):
    """The engine's 4-bit layer of `shape` ([out, in]) multiplying up to `rows` rows, its
    codes and per-group scales random."""
    import numpy as np
    import torch

    from rag.service.engine.int4 import GROUP, Blocks, Int4Linear

    out, inner = shape
    rng = np.random.default_rng(0)
    groups = (out, inner // GROUP)
    blocks = [
        Blocks(rng.integers(0, 16, shape, dtype=np.uint8),
               rng.uniform(1e-3, 2e-3, groups).astype(np.float32),
               rng.uniform(-1e-2, 1e-2, groups).astype(np.float32))
        for _ in range(parts)
    ]  # fmt: skip
    dense = torch.nn.Linear(inner, out, bias=False, dtype=torch.bfloat16, device="meta")
    return Int4Linear.from_blocks(dense, blocks, max_rows=rows)


def run_kind(kind: str, peer: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        python = peer if kind == "vllm" else sys.executable
        command = [python, __file__, "--child", kind, "--spec", json.dumps(spec), "--out", out.name]
        done = subprocess.run(command, env={**os.environ, **PEER_ENV}, capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", default=DEFAULT_PEER, help="the peer's python (vLLM-CPU)")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, json.loads(args.spec), args.out)
        return 0
    from bench_peer import has_peer, model_folder  # ours only: the peer lacks their imports
    from record import BenchRecord

    record = BenchRecord("matmul_peer", vars(args))
    config = json.loads((model_folder() / "config.json").read_text())
    spec = {
        "layer": layer_shapes(config),
        "layers": config["num_hidden_layers"],
        "head": (config["hidden_size"], config["vocab_size"]),
        "rows": args.rows,
        "repeats": args.repeats,
        "warmup": 3,
    }
    kinds = [k for k in KINDS if k != "vllm" or has_peer(args.peer)]
    record.note(shapes=spec, peer_env=PEER_ENV, kinds=kinds)
    rounds = []
    for number in range(args.rounds):  # each round in the other order
        order = kinds if number % 2 == 0 else kinds[::-1]
        rounds.append({kind: run_kind(kind, args.peer, spec) for kind in order})
    figures = {
        kind: {rows: statistics.median(r[kind]["ms_per_step"][str(rows)] for r in rounds)
               for rows in args.rows}
        for kind in kinds
    }  # fmt: skip
    calls = {kind: statistics.median(r[kind]["us_per_call"] for r in rounds) for kind in kinds}
    record.results.update(rounds=rounds, ms_per_step=figures, us_per_call=calls)
    for rows in args.rows:
        print(f"{rows:>3} rows: " + ", ".join(f"{k} {figures[k][rows]:.2f} ms" for k in kinds))
    print("one call: " + ", ".join(f"{k} {calls[k]:.1f} us" for k in kinds))
    if "vllm" in kinds and TARGET_ROWS in args.rows:
        ratio = figures["packed"][TARGET_ROWS] / figures["vllm"][TARGET_ROWS]
        record.target(f"decode products at {TARGET_ROWS} rows, ours / vLLM", ratio,
                      at_most=MAX_RATIO)  # fmt: skip
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
