"""One prepared run on a lent GPU machine (started by bench/gpu_check.sh): install the
bundle, print the environment, run the CUDA tests, then the engine and continuous-batching
benchmarks on the a6000-shaped model, and leave every record and log under $OUT.

Each stage has its own time limit (`--limit STAGE=SECONDS` changes one), all of them
together fit the budget (`--budget`, 450 s: the run ends within 8 minutes), and a stage
that fails or runs out of time is reported and the next one runs, so one bug does not cost
the GPU run.  Stages can be chosen (`tests engine`) to redo some of them.  $OUT receives
few files, as the machine hands back at most 8: summary.txt (stage by stage, every
met/MISSED line, the tail of each failure), records/*.json (the benchmarks' records) and
gpu-check.tar.gz (every log, record, CSV and the tests' junit XML).

`--dry-run` does the same on this machine's CPU with tiny models and short runs: the
bundle is checked and installed (for CPython 3.12 on x86-64, whatever runs this), the
stages run through the same code paths, the same files are written.

Stdlib (and `packaging`, through gpu_bundle) only: nothing else is installed when it starts.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_bundle import DEFAULT_BUNDLE, PIP_TARGET, REPO, problems

BUDGET_S = 450
KILL_GRACE_S = 10
MIN_STAGE_S = 5  # a stage is not started with less of the budget left
TARGET_LINE = re.compile(r"\[target [^]]*\]\s+(met|MISSED)")
PYTEST_LINE = re.compile(r"^=+ .*\b(passed|failed|skipped|error)\b.* =+$")
ENVIRONMENT = """\
import importlib, shutil, subprocess, sys, torch
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi"], check=False)
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
          "bf16 native", torch.cuda.is_bf16_supported(including_emulation=False))
for name in ("transformers", "tokenizers", "numpy", "fastapi", "pydantic", "uvicorn",
             "faiss", "hydra", "aiohttp", "httpx"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
"""


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int
    command: list[str]
    dry_command: list[str]


STAGES = [
    Stage("env", 60, ["-c", ENVIRONMENT], ["-c", ENVIRONMENT]),
    Stage(
        "tests", 150,
        ["-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py",
         "--timeout", "120", "--junitxml", "{work}/pytest-cuda.xml"],
        ["-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py",
         "--timeout", "120", "--junitxml", "{work}/pytest-cuda.xml"],
    ),
    Stage(
        "engine", 120,
        ["bench/bench_engine.py", "--model", "a6000-shaped", "--batch", "32",
         "--decode-steps", "64"],
        ["bench/bench_engine.py", "--suite", "gpu", "--model", "tiny", "--override",
         "model.decode_step=static", "--batch", "4", "--decode-steps", "8"],
    ),
    Stage(
        "continuous", 170,
        ["bench/bench_continuous.py", "--model", "a6000-shaped", "--seconds", "15",
         "--rounds", "2", "--saturate-seconds", "8", "--burst-gap", "0.02",
         "--continuous", "variant.max_batch_size=32", "variant.short_queue_batch_size=32"],
        ["bench/bench_continuous.py", "--model", "tiny", "--override", "model.ignore_eos=true",
         "model.max_new_tokens=64", "--seconds", "3", "--rounds", "1",
         "--saturate-seconds", "2", "--burst-gap", "0.02"],
    ),
]  # fmt: skip
STAGE_NAMES = [s.name for s in STAGES]


def install(bundle: Path, site: Path, log: Path) -> None:
    """The bundle's wheels into `site`, for CPython 3.12 on x86-64 whatever runs this."""
    command = [
        sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
        "--no-cache-dir", "--disable-pip-version-check", "--only-binary=:all:", *PIP_TARGET,
        "--target", str(site), *map(str, sorted((bundle / "wheels").glob("*.whl"))),
    ]  # fmt: skip
    with log.open("w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
        out.write("installed: " + " ".join(sorted(p.name for p in site.iterdir())) + "\n")


def run_stage(command: list[str], limit_s: float, env: dict, log: Path) -> str:
    """Run one stage in a process group of its own, its output to `log` and to this
    process's stdout, for at most `limit_s`; its status: ok, exit N, timed out."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            text=True, errors="replace",
        )  # fmt: skip

        def copy() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                out.write(line)
                out.flush()
                print(f"[{log.stem}] {line}", end="", flush=True)

        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
        try:
            code = process.wait(limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            copier.join(5)
            return f"timed out after {limit_s:.0f} s"
        copier.join(5)
    return "ok" if code == 0 else f"exit {code}"


def summarise(results: list[tuple[str, str, float]], work: Path, header: list[str]) -> str:
    """summary.txt: the run, each stage's status, every target's verdict and the tests'
    count, and the tail of each stage that did not end well."""
    lines = [*header, ""]
    lines += [f"stage {name}: {status} ({seconds:.0f} s)" for name, status, seconds in results]
    lines.append("")
    for name, status, _ in results:
        text = (work / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        lines += [f"{name}: {line}" for line in text if TARGET_LINE.search(line)]
        lines += [f"{name}: {line}" for line in text if PYTEST_LINE.match(line)]
        if status != "ok":
            lines += ["", f"--- {name} ({status}), last lines:", *text[-40:], ""]
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"of {', '.join(STAGE_NAMES)}")
    parser.add_argument("--dry-run", action="store_true", help="on this CPU, tiny and short")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--out", type=Path, default=None, help="default $OUT, else outputs/")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the stages")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGE_NAMES]
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)}; stages: {', '.join(STAGE_NAMES)}")
    limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in STAGE_NAMES or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--limit {item}: give STAGE=SECONDS, a stage of {STAGE_NAMES}")
        limits[name] = float(seconds)
    args.limits = limits
    if args.out is None:
        default = "outputs/gpu-check-dry" if args.dry_run else "outputs/gpu-check"
        args.out = Path(os.environ.get("OUT") or REPO / default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    wrong = problems(args.bundle)
    if wrong:
        print("the bundle cannot serve (make gpu-bundle):", *wrong, sep="\n  ", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ragbench-gpu-check-"))
    (work / "logs").mkdir()
    site = work / "site"
    install(args.bundle, site, work / "logs" / "install.log")
    carried_usable = sys.version_info[:2] == (3, 12)  # else (a dry run elsewhere): only checked
    path = [str(site)] if carried_usable else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [*path, str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "RAGBENCH_TOKENIZERS": str(args.bundle.resolve() / "tokenizers"),
        "RAGBENCH_RECORD_DIR": str(work / "records"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    header = [
        f"gpu_check {'dry run' if args.dry_run else 'run'}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"python {sys.version.split()[0]} ({sys.executable}); bundle installed in {site}"
        + ("" if carried_usable else " (not used: this is not CPython 3.12)"),
        "models: "
        + ("tiny, on the CPU" if args.dry_run else "a6000-shaped")
        + ": random weights; tokenizers borrowed, for timing only",
    ]
    print(*header, sep="\n", flush=True)
    results = []
    chosen = [s for s in STAGES if not args.stages or s.name in args.stages]
    for stage in chosen:
        left = args.budget - (time.monotonic() - started)
        limit = min(args.limits.get(stage.name, stage.limit_s), left)
        command = stage.dry_command if args.dry_run else stage.command
        command = [part.format(work=work) for part in command]
        begun = time.monotonic()
        if left < MIN_STAGE_S:
            status = "not run: the budget is spent"
            (work / "logs" / f"{stage.name}.log").write_text(status + "\n")
        else:
            print(f"== stage {stage.name} (at most {limit:.0f} s)", flush=True)
            status = run_stage(command, limit, env, work / "logs" / f"{stage.name}.log")
        results.append((stage.name, status, time.monotonic() - begun))
    summary = summarise(results, work, header)
    deliver(work, args.out, summary)
    print("\n" + summary, flush=True)
    return 0 if all(status == "ok" for _, status, _ in results) else 1


def deliver(work: Path, out: Path, summary: str) -> None:
    """summary.txt, records/*.json and gpu-check.tar.gz (everything) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(summary)
    (work / "summary.txt").write_text(summary)
    records = sorted((work / "records").glob("*.json"))
    if records:
        (out / "records").mkdir(exist_ok=True)
        for record in records:
            shutil.copy(record, out / "records" / record.name)
    shutil.rmtree(work / "site", ignore_errors=True)
    with tarfile.open(out / "gpu-check.tar.gz", "w:gz") as archive:
        archive.add(work, arcname="gpu-check")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
