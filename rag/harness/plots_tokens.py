"""Plots of tokens as users see them, over the offered rate: time to first token and time
per output token (p50 and p99), and goodput, the requests/s that met every objective.

Drawn only for points whose answers were streamed (TTFT and TPOT need the tokens' arrival)
or, for goodput, that were given objectives (`slo.ttft_s`, `slo.tpot_s`, `slo.e2e_s`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from rag.harness.plots import (
    CLOSED_LOOP,
    measured,
    mode_title,
    plot_series,
    rate_axis,
    save_figure,
    series,
    since_send,
    stats_vs_rate,
    timing_modes,
    warning_legend,
)

TOKEN_STATS = (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"),
               ("tpot_p50_s", "TPOT p50"), ("tpot_p99_s", "TPOT p99"))  # fmt: skip


def _with(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The measured points that have a value in each of `columns`."""
    table = measured(table)
    if table.empty or any(c not in table for c in columns):
        return table.iloc[0:0]
    return table.dropna(subset=columns)


def token_latency_vs_rate(table: pd.DataFrame, out: Path) -> Path | None:
    """TTFT and TPOT, p50 and p99, against the offered rate; a row per arrival process."""
    table = _with(table, [column for column, _ in TOKEN_STATS])
    if table.empty:
        return None

    def label(column: str, stat: str, mode: str) -> tuple[str, str]:
        if column.startswith("ttft"):
            ylabel = f"first token from {since_send(mode)} (s, log)"
        else:
            ylabel = "time per output token (s, log)"
        return f"{stat}, {mode_title(mode)}", ylabel

    title = "Time to first token and per output token (successful requests)"
    return stats_vs_rate(table, TOKEN_STATS, label, title, out / "tokens.png")


def _objectives(rows: pd.DataFrame) -> str:
    """The objectives the points were given, as one title line."""
    named = (("TTFT", "slo_ttft_s"), ("TPOT", "slo_tpot_s"), ("latency", "slo_e2e_s"))
    parts = []
    for name, column in named:
        values = sorted({v for v in rows.get(column, pd.Series(dtype=float)) if v > 0})
        if values:
            parts.append(f"{name} ≤ {'/'.join(f'{v:g}' for v in values)} s")
    return ", ".join(parts)


def goodput_vs_rate(table: pd.DataFrame, out: Path) -> Path | None:
    """Requests/s that met every objective against the offered rate, with y = x."""
    table = _with(table, ["goodput_rps"])
    if table.empty:
        return None
    modes = timing_modes(table)
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = table[table["timing_mode"] == mode]
        if mode != CLOSED_LOOP:
            top = max(rows["offered_rps"].max(), rows["goodput_rps"].max()) * 1.1
            ax.plot([0, top], [0, top], "--", color="gray", label="good = offered")
        for label, colour, s in series(rows):
            plot_series(ax, s, "goodput_rps", label, colour)
        ax.set_title(f"Goodput, {mode_title(mode)}\n{_objectives(rows)}", fontsize=11)
        ax.set_ylabel("requests/s meeting every objective")
        rate_axis(ax, rows)
        warning_legend(ax, rows)
    fig.suptitle("Goodput against offered load", fontsize=14)
    return save_figure(fig, out / "goodput.png")
