"""Summary statistics of one load run: a flat dict that becomes one row of summary.csv.

Latency and time to first token are timed from each request's scheduled send, so a slow
server cannot hide its queue.  Failures are never dropped: they are counted by class, and
the error-adjusted percentiles count each one as an infinitely slow request.  Goodput
counts the requests that met every objective given, as vLLM's `--goodput` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rag.loadgen.sender import TOKEN_TIMES

PERCENTILE_METHOD = "linear"  # numpy's default: interpolate between closest ranks
PERCENTILES = (50, 90, 95, 99)
ERROR_CLASSES = (
    "timeout",
    "connection",
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "bad_body",
    "stream_error",
    "stream_cut",
    "client",
    "cancelled",
    "not_sent",
)
LATE_S = 0.005  # a send this late counts against the schedule ...
MAX_LATE_FRACTION = 0.01  # ... and more than this fraction of late sends voids the run
MIN_SEND_RATE_RATIO = 0.99  # achieved send rate must reach this share of the schedule's


@dataclass(frozen=True)
class Slo:
    """Per-request objectives, 0 = not set.  A request is good when it succeeded and met
    every objective set: time to first token and latency from its scheduled send, time per
    output token (which an answer of at most one token meets, as in vLLM)."""

    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0

    @property
    def given(self) -> bool:
        return any(v > 0 for v in (self.ttft_s, self.tpot_s, self.e2e_s))

    def describe(self) -> str:
        named = (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("e2e", self.e2e_s))
        return ", ".join(f"{name} <= {value:g} s" for name, value in named if value > 0)

    def met(self, row: dict[str, Any]) -> bool:
        if row["error"] is not None:
            return False
        if self.e2e_s > 0 and not row["latency_s"] <= self.e2e_s:
            return False
        if self.ttft_s > 0 and not (row["ttft_s"] is not None and row["ttft_s"] <= self.ttft_s):
            return False
        if self.tpot_s > 0 and (row["output_tokens"] or 0) > 1:
            return row["tpot_s"] is not None and row["tpot_s"] <= self.tpot_s
        return True


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """numpy's 'linear' percentile, also defined when some values are +inf: a rank that
    falls on or interpolates towards an infinite value is infinite."""
    v = np.sort(np.asarray(values, dtype=float))
    if len(v) == 0:
        return float("nan")
    h = (len(v) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    frac = h - lo
    if frac == 0 or v[lo] == v[hi]:
        return float(v[lo])
    if math.isinf(v[hi]):
        return math.inf
    return float(v[lo] + (v[hi] - v[lo]) * frac)


def _column(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r.get(key) for r in rows if r.get(key) is not None], dtype=float)


def _add_distribution(out: dict[str, Any], name: str, values: np.ndarray) -> None:
    out[f"{name}_mean_s"] = float(values.mean()) if len(values) else math.nan
    for p in PERCENTILES:
        out[f"{name}_p{p}_s"] = percentile(values, p)
    out[f"{name}_max_s"] = float(values.max()) if len(values) else math.nan


def _send_rate(sent_s: np.ndarray) -> float:
    """Sends per second over the span of sends, on the same footing as Schedule.rate."""
    if len(sent_s) < 2 or sent_s.max() <= sent_s.min():
        return math.nan
    return (len(sent_s) - 1) / float(sent_s.max() - sent_s.min())


def _tokens(out: dict[str, Any], ok: Sequence[dict[str, Any]], span: float) -> None:
    """Token counts and rates, and the distributions of TTFT and TPOT (over successful
    requests) and of inter-token latency (over every gap of every successful request)."""
    for kind in ("prompt", "output"):
        counts = _column(ok, f"{kind}_tokens")
        out[f"{kind}_tokens_total"] = int(counts.sum()) if len(counts) else math.nan
    total = out["output_tokens_total"]
    out["output_tokens_per_s"] = total / span if span > 0 else math.nan
    _add_distribution(out, "ttft", _column(ok, "ttft_s"))
    _add_distribution(out, "tpot", _column(ok, "tpot_s"))
    gaps = [np.diff(r[TOKEN_TIMES]) for r in ok if len(r.get(TOKEN_TIMES) or ()) > 1]
    _add_distribution(out, "itl", np.concatenate(gaps) if gaps else np.zeros(0))


def _goodput(out: dict[str, Any], rows: Sequence[dict[str, Any]], slo: Slo, span: float) -> None:
    """The objectives, how many requests met them all, and those per second (NaN when
    no objective is given)."""
    out["slo_ttft_s"], out["slo_tpot_s"], out["slo_e2e_s"] = slo.ttft_s, slo.tpot_s, slo.e2e_s
    good = sum(slo.met(r) for r in rows) if slo.given else math.nan
    out["good"] = good
    out["goodput_rps"] = good / span if span > 0 else math.nan
    out["good_fraction"] = good / len(rows) if rows else math.nan


def summarise(
    rows: Sequence[dict[str, Any]],
    schedule_rps: float,
    target_rps: float,
    interrupted: bool = False,
    slo: Slo | None = None,
) -> dict[str, Any]:
    """Counts, rates, latency, token and send-lag distributions, goodput under `slo`, and
    whether the client kept its schedule (`schedule_kept`: says nothing of the server;
    `ok_fraction` does).

    Throughput (requests, output tokens, goodput) counts per second between the first
    scheduled send and the last completion.  Latency percentiles are over successful
    requests; the `latency_adj_*` ones are over every scheduled request, a failure counting
    as +inf.
    """
    ok = [r for r in rows if r["error"] is None]
    sent = [r for r in rows if r["sent_s"] is not None]
    out: dict[str, Any] = {
        "scheduled": len(rows),
        "sent": len(sent),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
    }
    for cls in ERROR_CLASSES:
        out[f"failed_{cls}"] = sum(1 for r in rows if r["error"] == cls)

    sent_s = _column(sent, "sent_s")
    done_s = _column(rows, "done_s")
    first_scheduled = min((r["scheduled_s"] for r in rows), default=math.nan)
    span = float(done_s.max()) - first_scheduled if len(done_s) else math.nan
    out["target_rps"] = target_rps
    out["schedule_rps"] = schedule_rps
    out["achieved_send_rps"] = _send_rate(sent_s)
    out["throughput_rps"] = len(ok) / span if span > 0 else math.nan
    out["duration_s"] = span

    out["percentile_method"] = PERCENTILE_METHOD
    _add_distribution(out, "latency", _column(ok, "latency_s"))
    _add_distribution(out, "service_latency", _column(ok, "service_latency_s"))
    adjusted = [r["latency_s"] if r["error"] is None else math.inf for r in rows]
    for p in PERCENTILES:
        out[f"latency_adj_p{p}_s"] = percentile(adjusted, p)

    _tokens(out, ok, span)
    _goodput(out, rows, slo or Slo(), span)

    lag = _column(sent, "send_lag_s")
    out["send_lag_p50_s"] = percentile(lag, 50)
    out["send_lag_p99_s"] = percentile(lag, 99)
    out["send_lag_max_s"] = float(lag.max()) if len(lag) else math.nan
    out["late_fraction"] = float(np.mean(lag > LATE_S)) if len(lag) else math.nan

    reasons = _schedule_broken_reasons(out, interrupted)
    out["ok_fraction"] = len(ok) / len(rows) if rows else math.nan
    out["interrupted"] = interrupted
    out["schedule_kept"] = not reasons
    out["schedule_kept_reason"] = "; ".join(reasons)
    return out


def _schedule_broken_reasons(s: dict[str, Any], interrupted: bool) -> list[str]:
    """Why the client failed to keep to its schedule, if it did."""
    reasons = []
    if interrupted:
        reasons.append("interrupted")
    if s["scheduled"] and not s["sent"]:
        reasons.append("nothing sent")
    if s["failed_client"]:
        reasons.append(f"{s['failed_client']} requests failed in the client itself")
    if s["late_fraction"] > MAX_LATE_FRACTION:
        reasons.append(f"{s['late_fraction']:.1%} of sends late by more than {LATE_S * 1e3:.0f} ms")
    achieved, scheduled = s["achieved_send_rps"], s["schedule_rps"]
    if achieved < MIN_SEND_RATE_RATIO * scheduled:  # False when either is nan
        reasons.append(
            f"achieved send rate {achieved:.1f}/s is under"
            f" {MIN_SEND_RATE_RATIO:.0%} of the schedule's {scheduled:.1f}/s"
        )
    return reasons
