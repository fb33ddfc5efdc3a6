"""Prometheus metrics of one server, in a registry of its own (several apps may share a
process in tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from rag.web import ConnectionGuard

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
STAGES = ("queue", "embed", "retrieve", "generate", "total")


class _CounterReading(Collector):
    """A counter whose value another object keeps (prometheus_client's Counter cannot
    read a callback, unlike Gauge.set_function)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


class ServerMetrics:
    def __init__(
        self,
        queue_depth: Callable[[], float],
        dropped: Callable[[], float],
        cancelled: Callable[[], float],
        refused: Callable[[], float],
        connections: ConnectionGuard,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rag_requests", "Requests to /rag by HTTP status", ["status"], registry=self.registry
        )
        self.v1_requests = Counter(
            "rag_v1_requests",
            "Requests to the OpenAI-compatible routes by route and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "rag_ttft_seconds",
            "Time from a request's arrival to its first token (every route, streamed or not)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "rag_tpot_seconds",
            "Time per output token after the first, per request with two tokens or more",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(
            _CounterReading(
                "rag_cancelled",
                "Requests whose client left mid-generation (their generation stopped at once)",
                cancelled,
            )
        )
        self.queue_depth = Gauge(
            "rag_queue_depth", "Requests waiting for a batch", registry=self.registry
        )
        self.queue_depth.set_function(queue_depth)
        self.batch_size = Histogram(
            "rag_batch_size",
            "Requests per computed batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(
            _CounterReading(
                "rag_dropped",
                "Requests dropped before compute (client gone, or past their deadline)",
                dropped,
            )
        )
        self.registry.register(
            _CounterReading(
                "rag_refused",
                "Requests refused 429 for overload (queue full, or not servable by their deadline)",
                refused,
            )
        )
        self.registry.register(
            _CounterReading(
                "rag_connections_refused",
                "Requests answered 503 for being over the connection cap with none idle",
                lambda: connections.refused,
            )
        )
        self.registry.register(
            _CounterReading(
                "rag_head_timeouts",
                "Connections closed for not sending a request head in time",
                lambda: connections.timed_out,
            )
        )
        self.registry.register(
            _CounterReading(
                "rag_connections_evicted",
                "Idle connections closed to make room for new ones at the connection cap",
                lambda: connections.evicted,
            )
        )
        self.registry.register(
            _CounterReading(
                "rag_malformed_requests",
                "Requests refused as bad HTTP (400, 431) before reaching the app",
                lambda: connections.malformed,
            )
        )
        self.stage_seconds = Histogram(
            "rag_stage_seconds",
            "Per-request time in each stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def count_response(self, path: str, status: int) -> None:
        if path == "/rag":
            self.requests.labels(str(status)).inc()
        else:
            self.v1_requests.labels(path, str(status)).inc()

    def observe_answer(self, answer: dict[str, Any]) -> None:
        """An answer's stage timings, TTFT and TPOT (as `rag.service.answering` states them)."""
        for stage in STAGES:
            if (value := answer["timings"].get(f"{stage}_ms")) is not None:
                self.stage_seconds.labels(stage).observe(value / 1e3)
        if answer["ttft_ms"] is not None:
            self.ttft.observe(answer["ttft_ms"] / 1e3)
        if answer["tpot_ms"] is not None:
            self.tpot.observe(answer["tpot_ms"] / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)
