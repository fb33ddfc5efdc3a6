"""What every benchmark does with its figures: judge each against its target, print one
line per target, and write a JSON record of the results and the environment they came from.

    record = BenchRecord("balancer", vars(args))
    record.target("added p50", 0.3, at_most=0.5, unit=" ms")
    sys.exit(record.finish(args.check))
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

from rag.loadgen.files import environment

RECORD_DIR = Path(__file__).resolve().parent.parent / "outputs" / "bench"


def add_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target is missed"
    )


class BenchRecord:
    """The targets and results of one benchmark run, and the environment around it."""

    def __init__(self, bench: str, settings: dict[str, Any]) -> None:
        self.bench = bench
        self.started = time.perf_counter()
        env = environment({}, 0, 0.0)
        for unused in ("config", "schedule"):
            env.pop(unused)
        env["load_average_before"] = env.pop("load_average")
        self.environment: dict[str, Any] = env
        self.settings = settings
        self.targets: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    def note(self, **facts: Any) -> None:
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
        verdict = "met" if met else "MISSED"
        print(f"{name}: {figure:{fmt}}{unit}  [target {criterion}]  {verdict}{extra}", flush=True)
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
        self.environment["load_average_after"] = os.getloadavg()
        self.environment["seconds"] = round(time.perf_counter() - self.started, 1)
        RECORD_DIR.mkdir(parents=True, exist_ok=True)
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
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        verdict = f"MISSED: {', '.join(self.missed)}" if self.missed else "all targets met"
        print(f"# {verdict}; record: {path.relative_to(RECORD_DIR.parent.parent)}")
        return 1 if check and self.missed else 0
