"""The load generator's command line.

    python -m rag.loadgen --target http://127.0.0.1:8000 --timing_mode poisson --rps 5 \
        --num_requests 200 --out outputs/try/requests.csv
    python -m rag.loadgen --target http://127.0.0.1:8000 --timing_mode concurrency \
        --concurrency 8 --duration 30          # closed loop: 8 users, for 30 s
    python -m rag.loadgen --target http://127.0.0.1:8001 --api openai-chat --rps 2 \
        --max_tokens 64 --slo_ttft_s 0.5 --slo_tpot_s 0.05   # any OpenAI-compatible server

Options are LoadConfig's fields; the run writes requests.csv, summary.csv, schedule.csv
and meta.json and prints a summary a person can read at a glance.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from typing import Any

from rag.loadgen.config import LoadConfig
from rag.loadgen.run import run_load
from rag.loadgen.stats import Slo


def _token_lines(s: dict[str, Any], since: str) -> list[str]:
    """Tokens, their timing and goodput, where the run measured them."""
    lines = []
    if math.isfinite(s["output_tokens_total"]):
        lines.append(
            f"tokens     prompt {s['prompt_tokens_total']:.0f}"
            f"  output {s['output_tokens_total']:.0f}"
            f"  output/s {s['output_tokens_per_s']:.1f}  (ok requests)"
        )
    for name, note in (("ttft", f"  (from {since})"), ("tpot", ""), ("itl", "")):
        if math.isfinite(s[f"{name}_p50_s"]):
            pct = "  ".join(f"p{p} {s[f'{name}_p{p}_s'] * 1e3:.1f}" for p in (50, 90, 99))
            lines.append(f"{name} ms    {pct}  max {s[f'{name}_max_s'] * 1e3:.1f}{note}")
    if math.isfinite(s["good"]):
        lines.append(
            f"goodput /s {s['goodput_rps']:.2f}  ({s['good_fraction']:.1%} of requests met"
            f" {Slo(s['slo_ttft_s'], s['slo_tpot_s'], s['slo_e2e_s']).describe()})"
        )
    return lines


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
                *_token_lines(s, "each send"),
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
            *_token_lines(s, "schedule"),
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
        description="Load generator: sends a seeded schedule to the RAG service or to any"
        " OpenAI-compatible server (open loop), or keeps N users busy (closed loop,"
        " --timing_mode concurrency), times each answer and its tokens, writes one CSV row"
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
