"""`+search=max_rps`: the highest offered rate at which p99 latency (from the scheduled
send) meets `slo.p99_s` with fewer than `slo.max_failed_fraction` failures, and the p99
of time to first token and of time per output token meet `slo.ttft_s` and `slo.tpot_s`
where they are set.

Doubling from `start_rps` until a trial misses (or halving until one meets), then
bisecting geometrically between the highest rate that met and the lowest that missed,
until they are within `resolution` of each other.  A trial where the client could not
keep its schedule is a miss: its latency says nothing trustworthy about the server.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rag.config import SearchConfig, SloConfig
from rag.loadgen import LoadConfig
from rag.storage import write_csv

log = logging.getLogger("rag.harness")
Rows = list[dict[str, Any]]
LoadRunner = Callable[[LoadConfig], tuple[Rows, dict[str, Any]]]


def verdict(summary: dict[str, Any], slo: SloConfig) -> tuple[bool, str]:
    """Whether one trial meets the target, and why not: p99 latency within `slo.p99_s`
    (and `slo.e2e_s` when set), and the p99 of each token objective set (time to first
    token, time per output token) within it."""
    if not summary["schedule_kept"]:
        return False, f"client fell behind its schedule ({summary['schedule_kept_reason']})"
    failed = 1.0 - summary["ok_fraction"]
    if failed >= slo.max_failed_fraction:
        return False, f"{failed:.1%} failed"
    latency_limit = min(slo.p99_s, slo.e2e_s) if slo.e2e_s > 0 else slo.p99_s
    limits = (("p99", "latency_p99_s", latency_limit), ("ttft p99", "ttft_p99_s", slo.ttft_s),
              ("tpot p99", "tpot_p99_s", slo.tpot_s))  # fmt: skip
    met = []
    for name, key, limit in limits:
        if limit <= 0:
            continue
        value = summary[key]
        if not value <= limit:  # NaN (nothing measured) misses too
            return False, f"{name} {value:.3g} s over {limit:g} s"
        met.append(f"{name} {value:.3g} s")
    return True, ", ".join(met)


def bisect_rates(search: SearchConfig, meets: Callable[[float], bool]) -> float:
    """The highest rate found to meet the target (0.0 when none did)."""
    best, worst = 0.0, math.inf  # highest rate that met, lowest that missed
    rate = search.start_rps
    for _ in range(search.max_trials):
        if meets(rate):
            best = rate
        else:
            worst = rate
        if math.isfinite(worst) and best > 0:
            if worst / best - 1 <= search.resolution:
                break
            rate = math.sqrt(best * worst)
        elif best > 0:  # every trial met: double, up to the ceiling
            if best >= search.max_rps:
                break
            rate = min(2 * best, search.max_rps)
        else:  # every trial missed: halve, down to the floor
            if worst <= search.min_rps:
                break
            rate = max(worst / 2, search.min_rps)
    return best


def run_search(
    search: SearchConfig, slo: SloConfig, base: LoadConfig, load: LoadRunner, folder: Path
) -> tuple[Rows, dict[str, Any], dict[str, Any]]:
    """Run the trials against one server: (every trial's rows, the summary of the best
    trial with the search's result, meta).  Writes trials.csv, one row per trial."""
    trials: list[tuple[float, Rows, dict[str, Any], bool, str]] = []

    def meets(rate: float) -> bool:
        n = max(search.min_trial_requests, math.ceil(rate * search.trial_duration_s))
        rows, summary = load(replace(base, rps=rate, num_requests=n, duration=0.0))
        ok, why = verdict(summary, slo)
        for row in rows:
            row.update(trial=len(trials), offered_rps=rate)
        trials.append((rate, rows, summary, ok, why))
        log.info(f"search: {rate:.3g}/s {'meets' if ok else 'misses'} the target: {why}")
        return ok

    max_rps = bisect_rates(search, meets)
    table = [
        {"trial": i, "offered_rps": rate, "meets_slo": ok, "why": why, **summary}
        for i, (rate, _, summary, ok, why) in enumerate(trials)
    ]
    write_csv(folder / "trials.csv", table, list(table[0]))
    best = next((t for t in trials if t[0] == max_rps), min(trials, key=lambda t: t[0]))
    result = {
        "search": search.name,
        "max_rps": max_rps,
        "slo_p99_s": slo.p99_s,
        "slo_ttft_s": slo.ttft_s,
        "slo_tpot_s": slo.tpot_s,
        "slo_e2e_s": slo.e2e_s,
        "slo_max_failed_fraction": slo.max_failed_fraction,
        "trials": len(trials),
        "offered_rps": best[0],
        **best[2],
    }
    rows = [row for _, trial_rows, *_ in trials for row in trial_rows]
    return rows, result, {"search": {"max_rps": max_rps, "trials": len(trials)}}
