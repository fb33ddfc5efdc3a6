"""test-results/: the aggregated table, every plot, and a one-page HTML report with the
images embedded (it opens anywhere, alone)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from rag.harness.aggregate import ENVIRONMENT, collect
from rag.harness.files import now
from rag.harness.plots import (
    batch_size_comparison,
    latency_vs_rate,
    max_rps_bars,
    throughput_vs_rate,
)
from rag.harness.plots_detail import batch_sizes, latency_cdf, replicas_over_time, stage_times
from rag.harness.plots_tokens import goodput_vs_rate, token_latency_vs_rate
from rag.storage import write_atomically

CAPTIONS = {
    "latency.png": "Latency from each request's scheduled send against the offered load.",
    "throughput.png": "Successful completions per second; on the dashed line the service "
    "keeps up with what is offered.",
    "batch_size.png": "The batching variants at each maximum batch size.",
    "tokens.png": "Time to first token (from each request's scheduled send) and time per"
    " output token after the first, p50 and p99, against the offered load (streamed answers).",
    "goodput.png": "Requests per second that succeeded and met every objective given, against"
    " the offered load; on the dashed line every request offered was good.",
    "max_rps.png": "The highest offered load whose p99 met the target.",
    "latency_cdf.png": "Share of all scheduled requests answered within a time.",
    "stages.png": "Mean time a request spent in each server stage.",
    "batch_sizes.png": "The batch sizes requests were served in.",
    "replicas.png": "The autoscaler's replica count through each scaling run, the answers"
    " per second beside it, and where it judged what a scale-up bought.",
}
TABLE = {
    "tag": "tag", "variant": "variant", "model": "model", "timing_mode": "arrivals",
    "api": "api", "loop": "loop", "offered_rps": "offered/s", "concurrency": "users",
    "max_batch_size": "max batch", "repeats": "repeats", "throughput_rps": "served/s",
    "latency_p50_s": "p50 s", "latency_p99_s": "p99 s", "ttft_p50_s": "TTFT p50 s",
    "ttft_p99_s": "TTFT p99 s", "tpot_p50_s": "TPOT p50 s", "output_tokens_per_s": "tokens/s",
    "goodput_rps": "goodput/s", "ok_fraction": "succeeded",
    "schedule_kept": "client kept schedule", "replicas_max": "replicas (max)",
    "max_rps": "max rps (search)",
}  # fmt: skip
CLOSED_LOOP_NOTE = (
    "<p class=note>Points whose loop is <b>closed</b> ran a closed loop (timing mode"
    " <code>concurrency</code>): a number of users, each sending its next request when its"
    " answer arrives.  They have no offered rate (their plots put the users on x), and their"
    " latency and TTFT run from each send, not from a schedule.</p>"
)
SIMULATED_NOTE = (
    "<p class=note>Points labelled <b>simulated</b> ran a sleeping cost model: they test the"
    " scaling logic and are no performance claim.</p>"
)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 2em; max-width: 1500px; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:nth-child(-n+4) { text-align: left; }
tr.behind td { background: #fde2e2; } figure { margin: 2em 0; }
img { max-width: 100%; border: 1px solid #ddd; } figcaption { color: #555; }
.note { color: #555; }
"""


def make_plots(table: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    """Every plot this table has data for."""
    made = [
        latency_vs_rate(table, out),
        throughput_vs_rate(table, out),
        token_latency_vs_rate(table, out),
        goodput_vs_rate(table, out),
        batch_size_comparison(table, out),
        max_rps_bars(table, out),
        latency_cdf(table, root, out),
        stage_times(table, out),
        batch_sizes(table, root, out),
        replicas_over_time(table, root, out),
    ]
    return [p for p in made if p is not None]


def _repeats_note(ok: pd.DataFrame) -> str:
    """How many repeats each setting has, e.g. "3 repeats: 4 settings; 1 repeat: 2"."""
    if "repeats" not in ok or ok.empty:
        return ""
    settings = ok.groupby(["tag", "setting"], dropna=False)["repeats"].first()
    counts = settings.value_counts().sort_index(ascending=False)
    parts = [f"{n:.0f} repeat{'s' if n != 1 else ''}: {c} setting{'s' if c != 1 else ''}"
             for n, c in counts.items()]  # fmt: skip
    return (
        "<p class=note>Repeats (points that differ only in <code>seed</code>) per setting: "
        + "; ".join(parts)
        + ".  Plots draw the median of a setting's repeats, each repeat a marker, and their"
        " min-max spread as a band.</p>"
    )


def _cell(value: object, column: str = "") -> str:
    if column == "ok_fraction" and isinstance(value, float) and pd.notna(value):
        return f"{value:.1%}"
    if column == "concurrency" and value == 0:  # an open loop has no users
        return ""
    if column == "schedule_kept":
        return "yes" if bool(value) else "<b>no</b>"
    if isinstance(value, float):
        return f"{value:.3g}" if pd.notna(value) else ""
    return html.escape(str(value))


def _table(frame: pd.DataFrame, columns: dict[str, str], flag_behind: bool = False) -> str:
    present = [c for c in columns if c in frame]
    head = "".join(f"<th>{html.escape(columns[c])}</th>" for c in present)
    body = []
    for _, row in frame.iterrows():
        behind = flag_behind and not bool(row.get("schedule_kept", True))
        cells = "".join(f"<td>{_cell(row[c], c)}</td>" for c in present)
        body.append(f"<tr{' class=behind' if behind else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = html.escape(CAPTIONS.get(path.name, path.name))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{path.name}">' \
        f"<figcaption>{caption}</figcaption></figure>"  # fmt: skip


def _scaling_section(ok: pd.DataFrame) -> list[str]:
    """Where the autoscaler found that more replicas added nothing, point by point."""
    if "replicas_max" not in ok or ok["replicas_max"].isna().all():
        return []
    scaling = ok[ok["replicas_max"].notna()]
    found = scaling["no_gain"].fillna("") if "no_gain" in scaling else pd.Series("", scaling.index)
    lines = [
        f"<li>{html.escape(str(row.variant))} at {row.offered_rps:g}/s ({row.timing_mode}):"
        f" up to {row.replicas_max:.0f} replica{'s' * (row.replicas_max != 1)}; "
        + (f"no gain {html.escape(text)}" if text else "no scale-up was found to add nothing")
        + "</li>"
        for row, text in zip(scaling.itertuples(), found, strict=True)
    ]
    return [
        "<h2>Where replication bought nothing</h2>",
        "<p class=note>After each scale-up the autoscaler compares the served rate before and"
        " after; replicas that added under <code>gain_share</code> (a quarter) of one"
        " replica's rate while the queue grew were taken back, and scale-ups above the rest"
        " held (each point's autoscaler.csv has every decision).</p>",
        f"<ul>{''.join(lines)}</ul>",
    ]


def render(table: pd.DataFrame, plots: list[Path], sources: str) -> str:
    ok = table[table["outcome"] == "ok"] if not table.empty else table
    failed = table[table["outcome"] == "failed"] if not table.empty else table
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ragbench results</title>",
        f"<style>{STYLE}</style></head><body><h1>ragbench results</h1>",
        f"<p class=note>{len(ok)} points finished, {len(failed)} failed; from {sources},"
        f" aggregated {now()}.  Latency runs from each request's scheduled send time."
        " Rows in red: the load generator fell behind its schedule, so the offered load"
        " was lower than stated.</p>",
        "<h2>Points</h2>",
        _repeats_note(ok),
        _table(ok, TABLE, flag_behind=True),
    ]
    if "loop" in ok and (ok["loop"] == "closed").any():
        parts.append(CLOSED_LOOP_NOTE)
    if "model" in ok and (ok["model"] == "simulated").any():
        parts.append(SIMULATED_NOTE)
    parts += _scaling_section(ok)
    if not failed.empty:
        failures = {"tag": "tag", "point": "point", "failure_reason": "reason"}
        parts += ["<h2>Failed points</h2>", _table(failed, failures)]
    parts += ["<h2>Plots</h2>", *(_figure(p) for p in plots)]
    env = {"point": "point", **{k: k.replace("_", " ") for k in ENVIRONMENT}, "start_time": "start"}
    parts += ["<h2>Environment of each point</h2><details><summary>show</summary>",
              _table(ok, env), "</details></body></html>"]  # fmt: skip
    return "\n".join(parts)


def aggregate(root: Path, out: Path, tags: list[str] | None = None) -> pd.DataFrame:
    """Write out/summary.csv, the plots and out/report.html from the points under root."""
    table = collect(root, tags)
    if table.empty:
        which = f" with tag {', '.join(tags)}" if tags else ""
        raise SystemExit(f"no finished or failed points under {root}{which}")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "summary.csv", table.to_csv(index=False))
    plots = make_plots(table, root, out)
    sources = f"{root}/" + ("{" + ",".join(tags) + "}" if tags else "*")
    write_atomically(out / "report.html", render(table, plots, sources))
    return table
