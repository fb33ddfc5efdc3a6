"""Plots over the offered rate, from the aggregated table: latency, throughput, batch size
10 vs 20, and the highest rate that meets a latency target.

Every plot marks the points that cannot be read at face value: a red cross where the
client fell behind its schedule (the offered load was not what it says), a hollow marker
where fewer than 99 % of requests succeeded (latency is then over the survivors).  Repeats
of a point (`seed=0,1,2`) are each a marker; the line runs through their median and a band
spans their minimum to maximum.  A closed loop (timing mode `concurrency`) has no offered
rate: its panels put the number of concurrent users on x and say "closed loop".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

VARIANT_COLOURS = {
    "base": "tab:blue", "batched": "tab:orange", "scaling": "tab:green", "continuous": "tab:red"
}  # fmt: skip
OTHER_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
MIN_OK_FRACTION = 0.99
LATENCY_STATS = (("latency_mean_s", "mean"), ("latency_p50_s", "p50"),
                 ("latency_p95_s", "p95"), ("latency_p99_s", "p99"))  # fmt: skip


def measured(table: pd.DataFrame) -> pd.DataFrame:
    """The finished points of a plain sweep (not a search)."""
    if table.empty or "outcome" not in table:
        return table.iloc[0:0]
    rows = table[table["outcome"] == "ok"]
    if "search" in rows:
        rows = rows[rows["search"].isna()]
    return rows


def series_label(row: pd.Series, table: pd.DataFrame) -> str:
    """The variant, plus whatever else tells its series apart in this table: the batch
    size where it varies, the model where there are several, and `simulated` always."""
    label = str(row["variant"])
    same = table[table["variant"] == row["variant"]]
    if row["variant"] != "base" and same["max_batch_size"].nunique() > 1:
        label += f" (batch {row['max_batch_size']})"
    if table["model"].nunique() > 1 or row["model"] == "simulated":
        label += f" [{row['model']}]"
    return label


def series(table: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(label, colour, rows sorted by offered rate) for each series in the table."""
    labels = table.apply(lambda row: series_label(row, table), axis=1)
    spare = iter(OTHER_COLOURS * 4)
    for label in sorted(labels.unique()):
        rows = table[labels == label].sort_values(load_column(table))
        variant = rows["variant"].iloc[0]
        colour = VARIANT_COLOURS.get(variant) if label == variant else None
        yield label, colour or next(spare), rows


def timing_modes(table: pd.DataFrame) -> list[str]:
    return sorted(table["timing_mode"].unique())


CLOSED_LOOP = "concurrency"


def load_column(rows: pd.DataFrame) -> str:
    """What x is: the offered rate, or a closed loop's number of users."""
    closed = not rows.empty and (rows["timing_mode"] == CLOSED_LOOP).all()
    return "concurrency" if closed else "offered_rps"


def mode_title(mode: str) -> str:
    return "closed loop" if mode == CLOSED_LOOP else f"{mode} arrivals"


PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def log_axis(ax: Axes, which: str = "y") -> None:
    """A log scale labelled in plain numbers (0.5, 1, 2, 5, 10), not powers of ten.  An
    axis with nothing positive drawn on it (a panel whose runs all lack the figure) stays
    linear: a log scale would have nothing to show."""
    _, highest = ax.dataLim.intervaly if which == "y" else ax.dataLim.intervalx
    if not highest > 0:
        return
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(PLAIN)
    axis.set_minor_formatter(NullFormatter())


def rate_axis(ax: Axes, table: pd.DataFrame) -> None:
    """Offered load (or a closed loop's users) on x, log when it spans a decade, ticks at
    the values that ran."""
    x = load_column(table)
    rates = sorted(table[x].unique())
    if rates[-1] / max(rates[0], 1e-9) >= 8:
        log_axis(ax, "x")
    if len(rates) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(rates))
        ax.xaxis.set_major_formatter(PLAIN)
    closed = x == "concurrency"
    ax.set_xlabel("concurrent users (closed loop)" if closed else "offered load (requests/s)")
    ax.grid(True, which="both", alpha=0.3)


def plot_series(
    ax: Axes, rows: pd.DataFrame, column: str, label: str, colour: str, style: str = "-"
) -> None:
    """A line through the median at each load, every point a marker, the min-max spread of
    repeats a band; suspect points marked."""
    x = load_column(rows)
    at = rows.groupby(x)[column]
    line = at.median()
    ax.plot(line.index, line.values, style, color=colour, label=label)
    if (at.count() > 1).any():
        ax.fill_between(line.index, at.min(), at.max(), color=colour, alpha=0.15, lw=0)
    healthy = rows["ok_fraction"] >= MIN_OK_FRACTION
    ax.plot(rows[x][healthy], rows[column][healthy], "o", color=colour)
    ax.plot(rows[x][~healthy], rows[column][~healthy], "o", mfc="white", color=colour)
    behind = ~rows["schedule_kept"].astype(bool)
    ax.plot(rows[x][behind], rows[column][behind], "x", color="red", ms=12, mew=2.5)


def warning_legend(ax: Axes, table: pd.DataFrame) -> None:
    """The series legend, plus entries for the marks this table needs."""
    handles, labels = ax.get_legend_handles_labels()
    if "repeats" in table and (table["repeats"] > 1).any():
        handles.append(Patch(color="gray", alpha=0.3))
        labels.append("min-max over repeats")
    if (table["ok_fraction"] < MIN_OK_FRACTION).any():
        handles.append(Line2D([], [], marker="o", mfc="white", color="gray", ls=""))
        labels.append("under 99 % succeeded")
    if (~table["schedule_kept"].astype(bool)).any():
        handles.append(Line2D([], [], marker="x", color="red", ms=10, mew=2.5, ls=""))
        labels.append("client fell behind its schedule")
    ax.legend(handles, labels, fontsize=8, loc="best")


def save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stats_vs_rate(
    table: pd.DataFrame,
    stats: Sequence[tuple[str, str]],
    label: Callable[[str, str, str], tuple[str, str]],
    title: str,
    path: Path,
) -> Path:
    """A panel per statistic (columns) and arrival process (rows), each variant a series
    against the offered rate; `label(column, stat, mode)` gives a panel's title and y label."""
    modes = timing_modes(table)
    fig, axes = plt.subplots(len(modes), len(stats), figsize=(16, 4.2 * len(modes)), squeeze=False)
    for r, mode in enumerate(modes):
        rows = table[table["timing_mode"] == mode]
        for c, (column, stat) in enumerate(stats):
            ax = axes[r][c]
            for name, colour, s in series(rows):
                plot_series(ax, s, column, name, colour)
            log_axis(ax)
            panel_title, ylabel = label(column, stat, mode)
            ax.set_title(panel_title)
            ax.set_ylabel(ylabel)
            rate_axis(ax, rows)
            warning_legend(ax, rows)
    fig.suptitle(title, fontsize=14)
    return save_figure(fig, path)


def since_send(mode: str) -> str:
    """Where a point's times run from: each send in a closed loop, else the schedule."""
    return "each send" if mode == CLOSED_LOOP else "scheduled send"


def latency_vs_rate(table: pd.DataFrame, out: Path) -> Path | None:
    """Mean, p50, p95, p99 latency against the offered rate; a row per arrival process."""
    table = measured(table)
    if table.empty:
        return None

    def label(column: str, stat: str, mode: str) -> tuple[str, str]:
        return f"{stat} latency, {mode_title(mode)}", f"latency from {since_send(mode)} (s, log)"

    title = "Latency against offered load (successful requests)"
    return stats_vs_rate(table, LATENCY_STATS, label, title, out / "latency.png")


def throughput_vs_rate(table: pd.DataFrame, out: Path) -> Path | None:
    """Successful completions per second against the offered rate, with y = x."""
    table = measured(table)
    if table.empty:
        return None
    modes = timing_modes(table)
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = table[table["timing_mode"] == mode]
        if mode != CLOSED_LOOP:
            top = max(rows["offered_rps"].max(), rows["throughput_rps"].max()) * 1.1
            ax.plot([0, top], [0, top], "--", color="gray", label="served = offered")
        for label, colour, s in series(rows):
            plot_series(ax, s, "throughput_rps", label, colour)
        ax.set_title(f"Throughput, {mode_title(mode)}")
        ax.set_ylabel("successful requests/s")
        rate_axis(ax, rows)
        if ax.get_xscale() == "log":
            log_axis(ax)
        warning_legend(ax, rows)
    fig.suptitle("Served against offered load", fontsize=14)
    return save_figure(fig, out / "throughput.png")


def batch_size_comparison(table: pd.DataFrame, out: Path) -> Path | None:
    """Batching variants at each maximum batch size: p50, p99 and throughput by rate."""
    table = measured(table)
    table = table[table["variant"] != "base"] if not table.empty else table
    if table.empty or table["max_batch_size"].nunique() < 2:
        return None
    panels = (("latency_p50_s", "p50 latency (s, log)"), ("latency_p99_s", "p99 latency (s, log)"),
              ("throughput_rps", "successful requests/s"))  # fmt: skip
    modes = timing_modes(table)
    fig, axes = plt.subplots(len(modes), 3, figsize=(16, 4.2 * len(modes)), squeeze=False)
    colours = dict(zip(sorted(table["max_batch_size"].unique()), OTHER_COLOURS, strict=False))
    styles = dict(zip(sorted(table["variant"].unique()), ("-", "--", ":", "-."), strict=False))
    for r, mode in enumerate(modes):
        rows = table[table["timing_mode"] == mode]
        for c, (column, ylabel) in enumerate(panels):
            ax = axes[r][c]
            for (variant, size), s in rows.groupby(["variant", "max_batch_size"]):
                s = s.sort_values(load_column(s))
                label = f"{variant}, batch {size}"
                plot_series(ax, s, column, label, colours[size], styles[variant])
            if column != "throughput_rps":
                log_axis(ax)
            ax.set_title(f"{ylabel.split(' (')[0]}, {mode_title(mode)}")
            ax.set_ylabel(ylabel)
            rate_axis(ax, rows)
            warning_legend(ax, rows)
    fig.suptitle("Maximum batch size compared", fontsize=14)
    return save_figure(fig, out / "batch_size.png")


def _targets(point: object) -> str:
    """A search's targets as a bar's label: p99, and TTFT and TPOT p99 where set."""
    named = (("p99", "slo_p99_s"), ("TTFT", "slo_ttft_s"), ("TPOT", "slo_tpot_s"))
    values = ((name, getattr(point, key, 0.0)) for name, key in named)
    return "\n".join(f"{name} ≤ {v:g} s" for name, v in values if pd.notna(v) and v > 0)


def max_rps_bars(table: pd.DataFrame, out: Path) -> Path | None:
    """The highest offered rate that met the latency target, per variant (searches only)."""
    if table.empty or "search" not in table:
        return None
    rows = table[(table["outcome"] == "ok") & table["search"].notna()]
    if rows.empty:
        return None
    rows = rows.assign(label=rows.apply(lambda r: series_label(r, rows), axis=1))
    rows = rows.sort_values(["slo_p99_s", "label"])
    names = [f"{r.label}\n{_targets(r)}" for r in rows.itertuples()]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 5))
    colours = [VARIANT_COLOURS.get(v, "tab:purple") for v in rows["variant"]]
    bars = ax.bar(np.arange(len(rows)), rows["max_rps"], color=colours)
    ax.bar_label(bars, labels=[f"{v:.3g}/s" for v in rows["max_rps"]])
    ax.set_xticks(np.arange(len(rows)), names)
    ax.set_ylabel("highest offered load meeting the target (requests/s)")
    failed = rows["slo_max_failed_fraction"].iloc[0]
    ax.set_title(f"Highest load with p99 within target and under {failed:.0%} failed")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, out / "max_rps.png")
