"""The settings of one load run, as a plain dataclass: the command line is built from its
fields, and the sweep composes it from the config tree (registered in `rag.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class LoadConfig:
    """One load run.  Plain defaults, so the sweep can compose it from the config tree."""

    target: str = _option("http://127.0.0.1:8000", "service base URL (or the full POST URL)")
    path: str = _option("/rag", "endpoint path appended to a base URL")
    assign: bool = _option(False, "two-step: GET <target>/assign -> {backend}, then POST to it")
    timing_mode: str = _option(
        "poisson", "ideal | poisson | gamma | trace (open loop) | concurrency (closed loop)"
    )
    rps: float = _option(10.0, "target requests per second (ideal, poisson, gamma)")
    concurrency: int = _option(
        0, "closed loop: users, each sending its next request when its answer arrives"
    )
    num_requests: int = _option(100, "requests to send (0 = as many as fit duration)")
    duration: float = _option(0.0, "seconds of schedule, or of a closed loop (0 = no limit)")
    burstiness: float = _option(1.0, "gamma shape: 1 = poisson, <1 burstier, >1 more regular")
    trace: str = _option(
        "", "timestamps file for timing_mode=trace, or a saved schedule.csv (times and queries)"
    )
    seed: int = _option(0, "seed for the schedule and the query draw")
    timeout: float = _option(60.0, "seconds per request from its send, then it fails; no retry")
    queries: str = _option(
        "", "query file, one per line ('' = built-in list; a saved schedule brings its own)"
    )
    k: int = _option(2, "documents to retrieve, sent with every query")
    max_in_flight: int = _option(0, "cap on concurrent requests (0 = none); waiting is latency")
    stop_grace: float = _option(5.0, "seconds to wait for in-flight requests after Ctrl-C")
    out: str = _option("", "per-request CSV path; summary/schedule/meta files go beside it")
    tag: str = _option("", "run label added to every row and the summary")
    progress: bool = _option(True, "live progress line on stderr when it is a terminal")
