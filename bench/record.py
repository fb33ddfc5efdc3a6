"""What every benchmark does with its figures: judge each against its target, print one
line per target, and write a JSON record of the results and the environment they came from.

A figure without its machine, its software and the machine's load is not comparable with
another, so the record carries them: git commit and dirty flag, CPU model, package versions,
torch's threads, the dtype, the load average before and after, and whatever the benchmark
adds (a matmul peak measured in the same process, its settings).

    record = BenchRecord("serve", vars(args))
    record.target("served / offline", 0.97, at_least=0.9)
    sys.exit(record.finish(args.check))
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rag.loadgen.files import machine
from rag.storage import write_json

# outputs/bench/, or where $RAGBENCH_RECORD_DIR says (bench/gpu_check.py gathers records so)
RECORD_DIR = Path(
    os.environ.get("RAGBENCH_RECORD_DIR")
    or Path(__file__).resolve().parent.parent / "outputs" / "bench"
)
PACKAGES = ("torch", "transformers", "numpy", "aiohttp", "uvloop")


def add_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )


def matmul_peak_gflops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """The best GFLOP/s of one square matmul in `dtype` (torch's name: float32, bfloat16),
    in this process with its thread setting: the ceiling a model's FLOP rate is held to."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def stream_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """The best GB/s of reading a tensor far larger than the caches once (a sum), in this
    process with its thread setting: the ceiling of a step that streams weights and keys."""
    import torch

    data = torch.ones(megabytes << 19, dtype=torch.bfloat16)
    data.sum()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best / 1e9


def cuda_seconds(call: Callable[[], object], repeats: int) -> float:
    """The best time of `call` on the GPU over `repeats` runs after one, by CUDA events."""
    import torch

    call()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def cuda_matmul_peak_gflops(dtype: str, size: int = 8192, repeats: int = 10) -> float:
    """The best GFLOP/s of one square matmul in `dtype` on the current GPU."""
    import torch

    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype), device="cuda") for _ in "ab")
    return 2 * size**3 / cuda_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def cuda_copy_gbs(megabytes: int = 2048, repeats: int = 10) -> float:
    """The best GB/s of a device-to-device copy on the current GPU, counting the bytes read
    and the bytes written: how fast the GPU's memory moves bytes, the ceiling of a step
    that streams weights."""
    import torch

    source = torch.empty(megabytes << 20, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.nbytes / cuda_seconds(lambda: target.copy_(source), repeats) / 1e9


class BenchRecord:
    """The targets and results of one benchmark run, and the environment around it."""

    def __init__(self, bench: str, settings: dict[str, Any]) -> None:
        self.bench = bench
        self.started = time.perf_counter()
        env = machine(PACKAGES)
        self.environment: dict[str, Any] = {
            **env,
            "load_average_before": env.pop("load_average"),
        }
        self.settings = settings
        self.targets: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    def note(self, **facts: Any) -> None:
        """Add to the environment (dtype, matmul peak, ...)."""
        self.environment.update(facts)

    def target(
        self,
        name: str,
        figure: float,
        *,
        at_least: float | None = None,
        at_most: float | None = None,
        unit: str = "",
        fmt: str = ".2f",
        detail: str = "",
    ) -> bool:
        """Judge `figure` against its bound, print the verdict line and keep it."""
        if (at_least is None) == (at_most is None):
            raise ValueError("give exactly one of at_least and at_most")
        bound = at_least if at_least is not None else at_most
        criterion = f"{'>=' if at_least is not None else '<='} {bound:{fmt}}{unit}"
        met = bool(figure >= bound if at_least is not None else figure <= bound)
        extra = f"  ({detail})" if detail else ""
        print(
            f"{name}: {figure:{fmt}}{unit}  [target {criterion}]  {'met' if met else 'MISSED'}"
            f"{extra}",
            flush=True,
        )
        self.targets.append(
            {"name": name, "figure": figure, "unit": unit, "criterion": criterion,
             "met": met, "detail": detail}
        )  # fmt: skip
        return met

    @property
    def missed(self) -> list[str]:
        return [t["name"] for t in self.targets if not t["met"]]

    def finish(self, check: bool = False) -> int:
        """Write the record; the exit status: 1 under `check` when a target was missed."""
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            self.environment.setdefault("torch_threads", torch.get_num_threads())
        self.environment["load_average_after"] = os.getloadavg()
        self.environment["seconds"] = round(time.perf_counter() - self.started, 1)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RECORD_DIR / f"{self.bench}-{stamp}.json"
        record = {
            "bench": self.bench,
            "settings": self.settings,
            "targets": self.targets,
            "missed": self.missed,
            "results": self.results,
            "environment": self.environment,
        }
        write_json(path, record)
        verdict = f"MISSED: {', '.join(self.missed)}" if self.missed else "all targets met"
        print(f"# {verdict}; record: {os.path.relpath(path)}")
        return 1 if check and self.missed else 0
