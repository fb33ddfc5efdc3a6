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
    api: str = _option("rag", "rag | openai-chat | openai-completions: what requests say")
    path: str = _option("", "endpoint path appended to a base URL ('' = the API's own)")
    stream: bool = _option(
        True, "ask for a streamed answer and time its tokens (--no-stream: the end only)"
    )
    model_name: str = _option(
        "", "OpenAI APIs: the model to ask for ('' = the first the target's /v1/models lists)"
    )
    max_tokens: int = _option(0, "output tokens per request at most (0 = the server's default)")
    max_tokens_high: int = _option(
        0, "above max_tokens: each request's max_tokens drawn uniformly from that range"
    )
    ignore_eos: bool = _option(False, "ask for exactly max_tokens tokens (vLLM's extension)")
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
        "",
        "query file, one per line, or .jsonl with prompt and max_tokens per line"
        " ('' = built-in list; a saved schedule brings its own)",
    )
    k: int = _option(2, "documents to retrieve, sent with every query")
    slo_ttft_s: float = _option(0.0, "goodput: time to first token at most (0 = no objective)")
    slo_tpot_s: float = _option(0.0, "goodput: time per output token at most (0 = none)")
    slo_e2e_s: float = _option(0.0, "goodput: latency at most (0 = no objective)")
    max_in_flight: int = _option(0, "cap on concurrent requests (0 = none); waiting is latency")
    stop_grace: float = _option(5.0, "seconds to wait for in-flight requests after Ctrl-C")
    out: str = _option("", "per-request CSV path; summary/schedule/meta files go beside it")
    tag: str = _option("", "run label added to every row and the summary")
    progress: bool = _option(True, "live progress line on stderr when it is a terminal")
