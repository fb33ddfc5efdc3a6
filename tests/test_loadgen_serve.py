"""The load generator against ragbench's own servers (tiny model, real processes on
127.0.0.1): every API streamed and whole, token counts as the server reports them, time to
first token from the schedule and never before the server's own, goodput, the closed loop,
and through the balancer."""

from __future__ import annotations

import pytest

from rag.loadgen import LoadConfig, run_load

APIS = ("rag", "openai-chat", "openai-completions")
TOKENS = 4  # asked for with ignore_eos: every answer is exactly this long


def load(url: str, api: str, **overrides) -> LoadConfig:
    base = dict(target=url, api=api, timing_mode="poisson", rps=8.0, num_requests=12,
                max_tokens=TOKENS, ignore_eos=True, timeout=60.0, progress=False)  # fmt: skip
    return LoadConfig(**{**base, **overrides})


def assert_streamed(rows: list[dict], summary: dict) -> None:
    assert summary["ok"] == summary["scheduled"] == len(rows), [r["error_detail"] for r in rows]
    for r in rows:
        assert r["output_tokens"] == TOKENS and r["prompt_tokens"] > 0, r
        assert r["scheduled_s"] <= r["sent_s"] < r["first_token_s"] <= r["done_s"], r
        assert r["ttft_s"] == pytest.approx(r["first_token_s"] - r["scheduled_s"])
        assert r["ttft_s"] <= r["latency_s"]
    assert summary["output_tokens_total"] == TOKENS * len(rows)
    assert 0 < summary["ttft_p50_s"] <= summary["ttft_p99_s"] <= summary["latency_max_s"]


@pytest.mark.parametrize("variant", ["continuous", "batched"])
def test_every_api_streams_from_our_server_token_by_token(shared_server, variant):
    server = shared_server(variant=variant)
    for api in APIS:
        rows, summary = run_load(load(server.url, api, slo_ttft_s=60.0, slo_e2e_s=60.0))
        assert_streamed(rows, summary)
        assert summary["good"] == len(rows) and summary["goodput_rps"] > 0  # loose objectives
        if api == "rag":  # the server's own TTFT runs from the request's arrival: never longer
            for r in rows:
                assert r["server_ttft_ms"] / 1e3 <= r["ttft_s"], r
        whole, summary = run_load(load(server.url, api, stream=False))
        assert summary["ok"] == len(whole) and summary["output_tokens_total"] == TOKENS * 12
        assert all(r["ttft_s"] is None and r["output_tokens"] == TOKENS for r in whole)


def test_the_closed_loop_and_the_balancer_stream_too(start_server):
    server = start_server("variant=scaling", "variant.scaling.min_replicas=1",
                          "variant.scaling.max_replicas=1")  # fmt: skip
    rows, summary = run_load(
        load(server.url, "openai-chat", timing_mode="concurrency", concurrency=3)
    )
    assert_streamed(rows, summary)
    assert summary["loop"] == "closed" and summary["model_name"] == "tiny"
    rows, summary = run_load(load(server.url, "rag", max_tokens=2, max_tokens_high=TOKENS,
                                  ignore_eos=True, num_requests=20))  # fmt: skip
    assert summary["ok"] == 20
    assert {r["max_tokens"] for r in rows} <= {2, 3, 4} and len({r["max_tokens"] for r in rows}) > 1
    assert all(r["output_tokens"] == r["max_tokens"] for r in rows)  # each its own length
