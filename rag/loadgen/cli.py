"""The load generator's command line.

    python -m rag.loadgen --target http://127.0.0.1:8000 --timing_mode poisson --rps 5 \
        --num_requests 200 --out outputs/try/requests.csv
    python -m rag.loadgen --target http://127.0.0.1:8000 --timing_mode concurrency \
        --concurrency 8 --duration 30          # closed loop: 8 users, for 30 s

Options are LoadConfig's fields; the run writes requests.csv, summary.csv, schedule.csv
and meta.json and prints a summary a person can read at a glance.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from rag.loadgen.config import LoadConfig
from rag.loadgen.run import run_load


def format_summary(s: dict[str, Any]) -> str:
    """A few lines a person can read at a glance."""

    def ms(key: str) -> str:
        return f"{s[key] * 1e3:.1f}"

    failed = ", ".join(
        f"{k.removeprefix('failed_')} {v}" for k, v in s.items() if k.startswith("failed_") and v
    )
    pct = "  ".join(f"p{p} {ms(f'latency_p{p}_s')}" for p in (50, 90, 95, 99))
    adj = "  ".join(f"p{p} {ms(f'latency_adj_p{p}_s')}" for p in (50, 90, 95, 99))
    kept = "yes" if s["schedule_kept"] else f"NO ({s['schedule_kept_reason']})"
    scheduled = "" if s["loop"] == "closed" else f"scheduled {s['scheduled']}  "
    requests = f"requests   {scheduled}sent {s['sent']}  ok {s['ok']}  failed {s['failed']}" + (
        f" ({failed})" if failed else ""
    )
    latency = f"latency ms mean {ms('latency_mean_s')}  {pct}  max {ms('latency_max_s')}"
    adjusted = f"adjusted   {adj}  (failures as +inf)"
    of = "sent" if s["loop"] == "closed" else "scheduled"
    ok = f"ok         {s['ok_fraction']:.1%} of {of}"
    if s["loop"] == "closed":
        return "\n".join(
            [
                f"closed loop: {s['concurrency']} users, each sending its next request when its"
                " previous answer arrives; latency from each send, not from a schedule",
                requests,
                f"rate /s    achieved send {s['achieved_send_rps']:.1f}"
                f"  throughput {s['throughput_rps']:.1f}",
                f"{latency}  (ok only, percentiles numpy {s['percentile_method']})",
                adjusted,
                f"{ok} requests",
                f"client     kept up {kept}",
            ]
        )
    return "\n".join(
        [
            requests,
            f"rate /s    target {s['target_rps']:.1f}  schedule {s['schedule_rps']:.1f}"
            f"  achieved send {s['achieved_send_rps']:.1f}"
            f"  throughput {s['throughput_rps']:.1f}",
            f"{latency}  (from schedule, ok only, percentiles numpy {s['percentile_method']})",
            adjusted,
            f"service ms p50 {ms('service_latency_p50_s')}  p99 {ms('service_latency_p99_s')}",
            f"send lag   p50 {ms('send_lag_p50_s')}  p99 {ms('send_lag_p99_s')}"
            f"  max {ms('send_lag_max_s')} ms  late >5 ms {s['late_fraction']:.2%}",
            f"{ok} requests",
            f"schedule   kept {kept}",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """Options named after LoadConfig's fields (`--timing_mode`, `--num_requests`, ...)."""
    parser = argparse.ArgumentParser(
        prog="python -m rag.loadgen",
        description="Load generator: sends a seeded schedule to the RAG service (open loop),"
        " or keeps N users busy (closed loop, --timing_mode concurrency), writes one CSV row"
        " per request and prints a summary.",
    )
    for f in fields(LoadConfig):
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(
                f"--{f.name}",
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
        else:
            parser.add_argument(
                f"--{f.name}", type=type(f.default), default=f.default, help=help_text
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = LoadConfig(**vars(parser.parse_args(argv)))
    try:
        _, summary = run_load(config)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(format_summary(summary))
    if config.out:
        print(f"wrote      {config.out} and its summary, schedule and meta files")
    return 130 if summary["interrupted"] else 0
