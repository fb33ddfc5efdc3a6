"""What every benchmark does with its figures: judge each against its target, print one
line per target, and write a JSON record of the results and the environment they came from.

A figure without its machine, its software and the machine's load is not comparable with
another, so the record carries them: git commit and dirty flag, CPU model, package versions,
torch's threads, the dtype, the load average before and after, and whatever the benchmark
adds (a matmul peak measured in the same process, its settings).  And how fast the machine
was: a short bf16 matmul timed before and after the run (one CPU model has given half the
speed of another day's on the same figures, with no load and no steal to show it), and its
processor time during the run by kind (busy, idle, and stolen: time a virtual machine's
processors were ready but its host ran something else).  A run whose machine changed speed
or was robbed says so in its record and its last line.

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
# Above this share of the machine's processor time taken by its host (steal), or this change
# of the machine's matmul speed between a run's start and end, a run's timings say more about
# the machine than about the code.
STOLEN_NOISY = 0.02
SPEED_CHANGE_NOISY = 0.15


def processor_times() -> dict[str, float]:
    """Processor seconds the whole machine has spent so far (all processors, /proc/stat):
    busy (user, nice, system, interrupts), idle (idle, iowait) and stolen by the host."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = (
        t / os.sysconf("SC_CLK_TCK") for t in ticks
    )
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "stolen": steal}


def processor_use(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The machine's processor seconds between two `processor_times()`, by kind, and the
    share of them that was stolen."""
    spent = {kind: round(after[kind] - before[kind], 2) for kind in before}
    total = sum(spent.values())
    return {**spent, "stolen_share": round(spent["stolen"] / total, 4) if total else 0.0}


def machine_gflops() -> float:
    """The machine's bf16 matmul speed now, on all its processors (about 0.1 s): a figure
    to compare runs by, not a peak."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        return round(matmul_peak_gflops("bfloat16", size=1024, repeats=20), 1)
    finally:
        torch.set_num_threads(threads)


def noise(environment: dict[str, Any]) -> str:
    """Why a run's timings are not comparable, from its environment; "" when nothing says so."""
    reasons = []
    if (stolen := environment["processor_s"]["stolen_share"]) > STOLEN_NOISY:
        reasons.append(f"the host took {stolen:.1%} of the processors")
    before, after = environment["machine_gflops_before"], environment["machine_gflops_after"]
    if abs(after / before - 1) > SPEED_CHANGE_NOISY:
        reasons.append(f"the machine's matmul speed went from {before:.0f} to {after:.0f} GFLOP/s")
    return "; ".join(reasons)


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
        self._processor_before = processor_times()
        env = machine(PACKAGES)
        self.environment: dict[str, Any] = {
            **env,
            "load_average_before": env.pop("load_average"),
            "machine_gflops_before": machine_gflops(),
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
        self.environment["processor_s"] = processor_use(self._processor_before, processor_times())
        self.environment["machine_gflops_after"] = machine_gflops()
        if noisy := noise(self.environment):
            self.environment["noisy"] = noisy
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
        if noisy := self.environment.get("noisy"):
            verdict += f"; NOISY: {noisy}"
        print(f"# {verdict}; record: {os.path.relpath(path)}")
        return 1 if check and self.missed else 0
