"""The continuous variant started for real on loopback with tiny random models: requests
join the engine's running batch between steps, and the batcher's HTTP contract holds
(429, 504, departed clients, drain, /stats and /metrics).

Long answers (`ignore_eos`, many tokens) keep requests in the engine for hundreds of steps,
so "while another request runs" is a state the tests wait for, not a moment they guess."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from async_helpers import run, soon, until
from cluster_helpers import ready, wait_for
from queue_helpers import (
    LONG,
    joined_while_running,
    post,
    send_in_background,
    sent_to_a_full_queue,
    stats,
)
from server_metrics import metric

from rag.clock import FakeClock
from rag.cluster.pool import Replica
from rag.cluster.scaling import replica_overrides
from rag.config import ServerKind, compose
from rag.service.batching import DeadlineExceeded
from rag.service.continuous import ContinuousBatcher, waves_to_wait
from rag.service.pipeline import RAGPipeline

HOVER = "Which animals can hover in the air?"


def long_tiny_pipeline(tmp_path: Path) -> RAGPipeline:
    """The tiny model's pipeline in process, its requests LONG, its caches under `tmp_path`."""
    cache = [f"model.cache_dir={tmp_path}", f"corpus.cache_dir={tmp_path}"]
    return RAGPipeline.from_config(compose(["model=tiny", *LONG, *cache]))


@pytest.fixture
def start_continuous(start_server):
    return lambda *overrides: start_server("variant=continuous", *overrides)


def test_concurrent_requests_are_answered_with_the_batched_contract(start_continuous):
    # Answers of 300 steps: requests sent together overlap however slow the machine is.
    server = start_continuous("model.ignore_eos=true", "model.max_new_tokens=300")
    bodies = [{"query": f"{HOVER} ({i})", "k": 1 + i % 3} for i in range(12)]
    threads, results = send_in_background(server.url, bodies)
    for thread in threads:
        thread.join(120)
    answers = [results[i].json() for i in range(12)]
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["query"] == body["query"] and len(answer["docs"]) == body["k"]
        assert answer["variant"] == "continuous" and answer["new_tokens"] == 300
        assert set(answer["timings"]) == {
            "queue_ms", "embed_ms", "retrieve_ms", "generate_ms", "total_ms"
        }  # fmt: skip
    after = stats(server.url)
    assert after["running"] == 0 and after["queue_depth"] == 0
    cfg = compose(["variant=continuous", "model=tiny"])
    running_at_most = min(cfg.variant.max_batch_size, cfg.model.engine_slots)
    assert after["max_batch_size"] == running_at_most and after["max_wait_ms"] == 0
    assert after["short_queue_batch_size"] == cfg.variant.short_queue_batch_size
    assert max(int(rows) for rows in after["batch_size_counts"]) > 1  # decoded together
    parts = after["step_parts"]  # every step counted once, every prompt prefilled once
    assert parts["mixed_steps"] + parts["decode_steps"] == sum(after["batch_size_counts"].values())
    assert parts["prefilled"] == 12 and parts["prefill_tokens"] > parts["prefilled"]
    assert min(parts["prepare_s"], parts["mixed_s"], parts["decode_s"], parts["events_s"]) >= 0
    assert 'rag_requests_total{status="200"} 12.0' in httpx.get(f"{server.url}/metrics").text


def test_a_newcomer_joins_the_running_batch_without_waiting_for_it(start_continuous):
    server = start_continuous(*LONG)
    first, second = joined_while_running(server.url, {"query": HOVER}, {"query": f"{HOVER} again"})
    early, late = first.json(), second.json()
    assert (early["new_tokens"], late["new_tokens"]) == (5000, 5000)
    # The newcomer waited for a step of the running batch, not for its 5000 steps.
    assert late["timings"]["queue_ms"] < early["timings"]["generate_ms"] / 10
    assert stats(server.url)["batch_size_counts"].get("2", 0) >= 1


def test_full_queue_answers_429_with_retry_after(start_continuous):
    server = start_continuous(*LONG, "variant.max_batch_size=1", "variant.max_queue=1")
    third = sent_to_a_full_queue(server.url, {"query": HOVER})
    assert int(third.headers["Retry-After"]) >= 1 and "queue is full" in third.json()["detail"]
    assert metric(server.url, 'rag_requests_total{status="429"}') == 1


def test_a_request_past_its_deadline_gets_504_and_leaves_the_engine(start_continuous):
    server = start_continuous(*LONG, "variant.request_timeout_s=0.3")
    response = post(server.url, {"query": HOVER})
    assert response.status_code == 504
    assert response.json()["detail"] == "not answered within its 0.3 s deadline"
    wait_for(lambda: stats(server.url)["running"] == 0, 30, "the expired request cancelled")
    assert metric(server.url, "rag_dropped_total") == 1


def test_a_departed_clients_request_leaves_the_engine(start_continuous):
    server = start_continuous(*LONG)
    with pytest.raises(httpx.ReadTimeout):
        post(server.url, {"query": HOVER}, timeout=0.5)
    wait_for(lambda: stats(server.url)["running"] == 0, 30, "the departed request cancelled")
    assert metric(server.url, "rag_dropped_total") == 1
    assert metric(server.url, 'rag_requests_total{status="200"}') == 0


def test_sigterm_drains_the_running_batch_then_exits(start_continuous):
    server = start_continuous(*LONG)
    threads, results = send_in_background(server.url, [{"query": HOVER}] * 3)
    wait_for(lambda: stats(server.url)["running"] == 3, 60, "three requests decoding")
    os.killpg(server.process.pid, signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 10, "draining")
    assert post(server.url, {"query": HOVER}).status_code == 503
    for thread in threads:
        thread.join(120)
    assert [results[i].json()["new_tokens"] for i in range(3)] == [5000, 5000, 5000]
    assert server.process.wait(30) == 0


def test_without_the_engine_the_variant_fails_at_start_with_a_clear_error(start_server):
    from rag.cluster.process import ServerFailed

    with pytest.raises(ServerFailed) as failed:
        start_server("variant=continuous", "model.engine=false", ready_timeout_s=60)
    assert "needs the generation engine" in str(failed.value)


def test_a_scaling_replica_can_be_continuous(start_server, tmp_path):
    argv = ["model=tiny", "variant=scaling", "variant.scaling.replica_variant=continuous"]
    overrides = replica_overrides(argv, compose(argv), Replica("r0"))
    assert compose(overrides).variant.kind is ServerKind.continuous
    server = start_server(
        *argv[1:],
        "variant.scaling.min_replicas=1",
        "variant.scaling.max_replicas=1",
        f"run_dir={tmp_path / 'run'}",
    )
    wait_for(lambda: len(ready(server.url)) == 1, 120, "the replica ready")
    answer = post(server.url, {"query": HOVER})
    assert answer.status_code == 200 and answer.json()["variant"] == "continuous"


def test_on_a_fake_clock_a_request_past_its_deadline_waiting_for_a_slot_never_runs(tmp_path):
    """The continuous loop in process, on the tiny model and a fake clock: a request queued
    behind a full running batch expires when the test moves the clock past its deadline
    (an hour: on the real clock the test would wait that long), and never joins the engine."""
    pipeline = long_tiny_pipeline(tmp_path)

    async def scenario():
        clock = FakeClock()
        with ThreadPoolExecutor(1, thread_name_prefix="compute") as compute:
            batcher = ContinuousBatcher(pipeline, 1, 4, compute, clock=clock)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(pipeline.ask([HOVER], [1])[0]))
            await until(lambda: batcher.running == 1, "the first decoding")
            late = batcher.submit(pipeline.ask([HOVER], [1])[0], timeout_s=3600)
            late = asyncio.ensure_future(late)
            await until(lambda: batcher.depth == 1 and clock.waiting == 1, "the second queued")
            steps = batcher.batch_size_counts.total()
            await until(lambda: batcher.batch_size_counts.total() > steps + 2, "steps go on")
            assert (batcher.running, batcher.depth) == (1, 1)  # no slot for it
            clock.advance(3600)
            with pytest.raises(DeadlineExceeded, match="within its 3600 s deadline"):
                await soon(late)
            first.cancel()
            await soon(batcher.wait_idle(math.inf))
            await batcher.stop()
        return batcher

    batcher = run(scenario())
    assert (batcher.dropped, batcher.expired) == (2, 0)  # both left; neither was answered
    assert max(batcher.batch_size_counts) == 1  # the running batch never held two


@pytest.mark.parametrize("spare", [True, False])
def test_a_freed_row_goes_to_a_request_likely_to_end_in_time_when_another_waits(tmp_path, spare):
    """The continuous loop in process, on the tiny model and a fake clock, one slot: a
    request with 1.5 s left when the slot frees (a request there takes 1-2 s, likely at
    most 2.125) gives it up to a younger one waiting behind it, and takes it when none is."""
    pipeline = long_tiny_pipeline(tmp_path)

    async def scenario():
        clock = FakeClock()
        with ThreadPoolExecutor(1, thread_name_prefix="compute") as compute:
            batcher = ContinuousBatcher(pipeline, 1, 4, compute, clock=clock)
            batcher.request_times.record(1, 1.0)
            batcher.request_times.record(1, 2.0)
            batcher.start()
            ask = lambda: pipeline.ask([HOVER], [1])[0]  # noqa: E731
            first = asyncio.ensure_future(batcher.submit(ask()))
            await until(lambda: batcher.running == 1, "the first decoding")
            tight = asyncio.ensure_future(batcher.submit(ask(), timeout_s=10))
            await until(lambda: batcher.depth == 1, "the second queued")
            clock.advance(8.5)
            queued = [asyncio.ensure_future(batcher.submit(ask(), timeout_s=10))] if spare else []
            await until(lambda: batcher.depth == 1 + len(queued), "all queued")
            first.cancel()
            if spare:
                with pytest.raises(DeadlineExceeded, match="not started"):
                    await soon(tight)
            await until(lambda: batcher.running == 1 and batcher.depth == 0, "the slot taken")
            assert tight.done() == spare  # without a spare, "tight" runs
            for request in (tight, *queued):
                request.cancel()
            await soon(batcher.wait_idle(math.inf))
            await batcher.stop()
        return batcher

    assert run(scenario()).expired == int(spare)


def test_the_running_batch_grows_only_while_a_whole_batch_waits(tmp_path):
    """The continuous loop in process, on the tiny model (LONG requests): with a running
    batch of 2 while the queue is short and 4 at most, a third request waits while it alone
    is queued, joins with a fourth once two wait, and two more wait while four run."""
    pipeline = long_tiny_pipeline(tmp_path)

    async def scenario():
        with ThreadPoolExecutor(1, thread_name_prefix="compute") as compute:
            batcher = ContinuousBatcher(pipeline, 4, 8, compute, short_queue_running=2)
            batcher.start()
            sent = []

            async def send(count: int, then: Callable[[], bool], what: str) -> None:
                questions = pipeline.ask([HOVER] * count, [1] * count)
                sent.extend(asyncio.ensure_future(batcher.submit(q)) for q in questions)
                await until(then, what)

            async def held(running: int, waiting: int) -> None:
                steps = batcher.batch_size_counts.total()
                await until(lambda: batcher.batch_size_counts.total() > steps + 2, "steps go on")
                assert (batcher.running, batcher.depth) == (running, waiting)

            await send(2, lambda: batcher.running == 2, "the first two decoding")
            await send(1, lambda: batcher.depth == 1, "the third queued")
            await held(2, 1)
            await send(1, lambda: batcher.running == 4, "the third and fourth joining")
            await send(2, lambda: batcher.depth == 2, "the fifth and sixth queued")
            await held(4, 2)
            for request in sent:
                request.cancel()
            await soon(batcher.wait_idle(math.inf))
            await batcher.stop()
        return batcher

    batcher = run(scenario())
    assert max(batcher.batch_size_counts) == 4


def test_a_request_waits_through_the_running_batch_and_the_waves_ahead():
    assert waves_to_wait(ahead=0, running=1, room=24) == 1  # a free slot: its own only
    assert waves_to_wait(ahead=23, running=0, room=24) == 1
    assert waves_to_wait(ahead=0, running=24, room=24) == 2  # the running batch's rest first
    assert waves_to_wait(ahead=30, running=64, room=64) == 2
    assert waves_to_wait(ahead=64, running=64, room=64) == 3
    # The queue shortened while 64 run: none of the 40 rows above 24 counts as a wave ahead.
    assert waves_to_wait(ahead=20, running=64, room=24) == 2
