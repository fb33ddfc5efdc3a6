"""Plots that look inside each point, from its own files: latency CDFs (requests.csv),
time per server stage, batch sizes served, and replicas over time (autoscaler.csv)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import colormaps

from rag.harness.aggregate import STAGES
from rag.harness.plots import log_axis, measured, save_figure, series_label, timing_modes

STAGE_COLOURS = ("tab:gray", "tab:blue", "tab:green", "tab:orange")


def _requests(root: Path, folder: str, columns: list[str]) -> pd.DataFrame:
    path = root / folder / "requests.csv"
    header = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, usecols=[c for c in columns if c in header], low_memory=False)


def _rate_colours(rates: pd.Series) -> dict[float, tuple]:
    """A light-to-dark colour per offered rate: heavier load reads darker."""
    ordered = sorted(rates.unique())
    cmap = colormaps["viridis_r"]
    return {r: cmap(0.15 + 0.8 * i / max(1, len(ordered) - 1)) for i, r in enumerate(ordered)}


def _grid(rows: int, cols: int, width: float = 5.5, height: float = 4.2):
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def _panels(table: pd.DataFrame, width: float = 5.5, height: float = 4.2):
    """A panel per series (columns) and arrival process (rows): the figure, and for each
    panel (axes, title, its points by offered rate)."""
    labels = table.apply(lambda r: series_label(r, table), axis=1)
    names, modes = sorted(labels.unique()), timing_modes(table)
    fig, axes = _grid(len(modes), len(names), width, height)
    panels = [
        (axes[r][c], f"{name}, {mode} arrivals",
         table[(labels == name) & (table["timing_mode"] == mode)].sort_values("offered_rps"))
        for r, mode in enumerate(modes)
        for c, name in enumerate(names)
    ]  # fmt: skip
    return fig, panels


def latency_cdf(table: pd.DataFrame, root: Path, out: Path) -> Path | None:
    """Share of all scheduled requests answered within x seconds, one line per point; a
    failed request never arrives, so a curve tops out at the point's success share."""
    table = measured(table)
    if table.empty:
        return None
    fig, panels = _panels(table)
    colours = _rate_colours(table["offered_rps"])
    for ax, title, points in panels:
        for point in points.itertuples():
            frame = _requests(root, point.folder, ["latency_s", "error"])
            latency = np.sort(frame.loc[frame["error"].isna(), "latency_s"].to_numpy())
            share = np.arange(1, len(latency) + 1) / max(1, len(frame))
            behind = "" if point.schedule_kept else " (client fell behind)"
            ax.step(latency, share, where="post", color=colours[point.offered_rps],
                    ls="-" if point.schedule_kept else ":",
                    label=f"{point.offered_rps:g}/s{behind}")  # fmt: skip
        log_axis(ax, "x")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.set_xlabel("latency from scheduled send (s, log)")
        ax.set_ylabel("share of requests answered")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="offered", fontsize=8)
    fig.suptitle("Latency distribution per point", fontsize=14)
    return save_figure(fig, out / "latency_cdf.png")


def stage_times(table: pd.DataFrame, out: Path) -> Path | None:
    """Mean server time per stage (queue, embed, retrieve, generate), stacked, per point."""
    table = measured(table)
    columns = [f"stage_{s}_ms" for s in STAGES]
    if table.empty or not set(columns) <= set(table) or table[columns].isna().all().all():
        return None
    table = table.dropna(subset=columns, how="all")
    fig, panels = _panels(table, width=5, height=4.5)
    for ax, title, points in panels:
        x = np.arange(len(points))
        bottom = np.zeros(len(points))
        for stage, column, colour in zip(STAGES, columns, STAGE_COLOURS, strict=True):
            values = points[column].fillna(0).to_numpy() / 1e3
            ax.bar(x, values, bottom=bottom, color=colour, label=stage, width=0.7)
            bottom += values
        ax.bar_label(ax.containers[-1], labels=[f"{v:.2f} s" for v in bottom], fontsize=8)
        ticks = [f"{p.offered_rps:g}" + ("\n(behind)" if not p.schedule_kept else "")
                 for p in points.itertuples()]  # fmt: skip
        ax.set_xticks(x, ticks)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("mean time in the server (s)")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Where a request's server time goes (mean per stage)", fontsize=14)
    return save_figure(fig, out / "stages.png")


def batch_sizes(table: pd.DataFrame, root: Path, out: Path) -> Path | None:
    """How many requests were served in batches of each size, per batching point."""
    table = measured(table)
    table = table[table["variant"] != "base"] if not table.empty else table
    if table.empty or "batch_size_mean" not in table or table["batch_size_mean"].isna().all():
        return None
    fig, panels = _panels(table)
    colours = _rate_colours(table["offered_rps"])
    for ax, title, points in panels:
        edges = np.arange(0.5, int(points["max_batch_size"].max()) + 1.5)
        for point in points.itertuples():
            sizes = _requests(root, point.folder, ["server_batch_size"])["server_batch_size"]
            sizes = sizes.dropna()
            if sizes.empty:
                continue
            ax.hist(sizes, bins=edges, weights=np.full(len(sizes), 1 / len(sizes)),
                    histtype="step", lw=2, color=colours[point.offered_rps],
                    label=f"{point.offered_rps:g}/s (mean {sizes.mean():.1f})")  # fmt: skip
        ax.set_xlabel("batch size a request was served in")
        ax.set_ylabel("share of requests")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(title="offered", fontsize=8)
    fig.suptitle("Batch sizes served (per request)", fontsize=14)
    return save_figure(fig, out / "batch_sizes.png")


RATE_WINDOW_S = 5.0  # the served rate beside the replicas: a trailing mean over this
VERDICT_MARKS = {"no gain": ("X", "tab:red"), "probe": ("v", "tab:orange"),
                 "gain": ("^", "tab:green")}  # fmt: skip


def trailing_rate(elapsed: np.ndarray, rate: np.ndarray, window_s: float) -> np.ndarray:
    """A per-check rate (over each check's interval) as its mean over the trailing
    `window_s`: the area under it, differenced, so checks of any length weigh their time."""
    seconds = np.diff(elapsed, prepend=elapsed[0])
    area = np.cumsum(rate * seconds)
    earlier = np.interp(elapsed - window_s, elapsed, area, left=0.0)
    span = np.minimum(window_s, elapsed - elapsed[0])
    return np.divide(area - earlier, span, out=np.zeros_like(area), where=span > 0)


def _scaling_panel(ax: plt.Axes, frame: pd.DataFrame) -> None:
    """Replicas over time on the left axis, requests arriving and answered per second
    beside them on the right, and a mark where the autoscaler judged a scale-up."""
    elapsed = frame["elapsed_s"].to_numpy(dtype=float)
    ax.step(elapsed, frame["replicas_after"], where="post", lw=2, color="tab:blue",
            label="replicas (ready + starting)")  # fmt: skip
    for word, (marker, colour) in VERDICT_MARKS.items():
        judged = frame[frame["verdict"] == word] if "verdict" in frame else frame.iloc[0:0]
        if not judged.empty:
            ax.plot(judged["elapsed_s"], judged["replicas_after"], marker, color=colour, ms=11,
                    ls="", label=word)  # fmt: skip
    ax.set_xlabel("time since the variant started (s)")
    ax.set_ylabel("replicas", color="tab:blue")
    ax.set_ylim(0, max(2, int(frame["replicas_after"].max())) + 0.5)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    rates = ax.twinx()
    columns = (("rps", "arriving", ":", "gray"), ("served", "answered", "-", "tab:orange"))
    for column, name, style, colour in columns:
        if column in frame:
            rate = trailing_rate(elapsed, frame[column].to_numpy(dtype=float), RATE_WINDOW_S)
            rates.plot(elapsed, rate, style, color=colour, lw=1.5,
                       label=f"{name}/s ({RATE_WINDOW_S:g} s mean)")  # fmt: skip
    rates.set_ylabel("requests/s", color="tab:orange")
    rates.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = rates.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize=7, ncol=3, loc="upper center",
              bbox_to_anchor=(0.5, -0.16))  # fmt: skip


def replicas_over_time(table: pd.DataFrame, root: Path, out: Path) -> Path | None:
    """Per scaling point: replicas after each autoscaler check with the served rate beside
    them, and where the autoscaler judged what a scale-up bought."""
    table = measured(table)
    if table.empty:
        return None
    points = [p for p in table.itertuples() if (root / p.folder / "autoscaler.csv").exists()]
    if not points:
        return None
    rows = sorted({(series_label(p._asdict(), table), p.timing_mode) for p in points})
    rates = sorted({p.offered_rps for p in points})
    fig, axes = _grid(len(rows), len(rates), width=6.5, height=5)
    for ax in axes.flat:
        ax.set_visible(False)
    for point in points:
        frame = pd.read_csv(root / point.folder / "autoscaler.csv")
        if frame.empty:
            continue
        row = (series_label(point._asdict(), table), point.timing_mode)
        ax = axes[rows.index(row)][rates.index(point.offered_rps)]
        ax.set_visible(True)
        _scaling_panel(ax, frame)
        ax.set_title(f"{row[0]}, {point.offered_rps:g}/s offered, {point.timing_mode}")
    fig.suptitle("Replicas over time and what they served", fontsize=14)
    return save_figure(fig, out / "replicas.png")
