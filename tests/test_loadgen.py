"""The load generator against real local HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from loadgen_server import LocalServer, rag_ok

from rag.loadgen import (
    ROW_COLUMNS,
    LoadConfig,
    plan,
    run_load,
    run_load_async,
    send,
    summarise_run,
    write_run,
)
from rag.loadgen import run as run_module
from rag.loadgen.stats import LATE_S


def config(target: str, **overrides) -> LoadConfig:
    base = {"timing_mode": "ideal", "rps": 50.0, "num_requests": 20, "progress": False}
    return LoadConfig(target=target, **{**base, **overrides})


def assert_one_row_each(rows: list[dict], n: int) -> None:
    assert [r["request_id"] for r in rows] == list(range(n))


def assert_verdict_is_the_clients_own_timing(rows: list[dict], summary: dict) -> None:
    """The schedule verdict speaks of the client's own timing only: kept, or void for late
    sends or a low send rate that the rows themselves show (a loaded machine can cause
    either at moments), never for what the server did (stalls, failures, latency)."""
    sent = [r for r in rows if r["sent_s"] is not None]
    late = sum(r["send_lag_s"] > LATE_S for r in sent)
    assert summary["late_fraction"] == late / len(sent)  # from send lag, not latency
    span = max(r["sent_s"] for r in sent) - min(r["sent_s"] for r in sent)
    assert summary["achieved_send_rps"] == pytest.approx((len(sent) - 1) / span)
    reason = summary["schedule_kept_reason"]
    assert summary["schedule_kept"] is (reason == "")
    for part in filter(None, reason.split("; ")):
        assert part.endswith("late by more than 5 ms") or part.startswith("achieved send rate")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ok_run_rows_summary_and_files(tmp_path: Path):
    out = tmp_path / "requests.csv"
    with LocalServer() as server:
        rows, summary = run_load(config(server.url, out=str(out), tag="t1"))
    assert server.hits["/rag"] == 20
    assert_one_row_each(rows, 20)
    for r in rows:
        assert r["error"] is None and r["status"] == 200
        assert r["response_bytes"] > 0
        assert r["server_queue_ms"] == 1.5 and r["server_total_ms"] == 14.0
        assert r["server_batch_size"] == 3 and r["server_replica"] == "r0"
        assert r["latency_s"] == pytest.approx(r["send_lag_s"] + r["service_latency_s"])
        assert r["tag"] == "t1"
    assert [r["scheduled_s"] for r in rows] == pytest.approx([i / 50 for i in range(20)])

    assert summary["scheduled"] == summary["sent"] == summary["ok"] == 20
    assert summary["ok_fraction"] == 1.0
    assert summary["failed"] == 0
    assert summary["schedule_rps"] == pytest.approx(50.0)
    assert summary["percentile_method"] == "linear"
    assert_verdict_is_the_clients_own_timing(rows, summary)
    assert 0 < summary["latency_p50_s"] <= summary["latency_p99_s"] <= summary["latency_max_s"]

    with open(out) as f:
        written = list(csv.DictReader(f))
    assert len(written) == 20
    assert set(ROW_COLUMNS) <= set(written[0])
    assert {
        "server_queue_ms",
        "server_embed_ms",
        "server_retrieve_ms",
        "server_generate_ms",
        "server_total_ms",
        "server_batch_size",
        "server_replica",
    } <= set(written[0])
    with open(tmp_path / "summary.csv") as f:
        (summary_row,) = list(csv.DictReader(f))
    assert summary_row["ok"] == "20"
    assert summary_row["schedule_kept"] == str(summary["schedule_kept"])
    with open(tmp_path / "schedule.csv") as f:
        schedule = list(csv.DictReader(f))
    assert [float(s["scheduled_s"]) for s in schedule] == pytest.approx(
        [r["scheduled_s"] for r in rows]
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    for key in ("hostname", "python", "platform", "cpu_count", "start_time", "git_commit"):
        assert key in meta
    assert meta["packages"]["aiohttp"]
    assert meta["config"]["rps"] == 50.0


def test_stem_prefixes_companion_files(tmp_path: Path):
    with LocalServer() as server:
        run_load(config(server.url, num_requests=3, out=str(tmp_path / "run1.csv")))
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"run1.csv", "run1.summary.csv", "run1.schedule.csv", "run1.meta.json"}


def test_the_steps_run_one_by_one(tmp_path: Path):
    """What a sweep does: plan, send, summarise and write as separate calls."""
    with LocalServer() as server:
        run = plan(config(server.url, num_requests=5))
        assert len(run.schedule) == 5 and server.hits["/rag"] == 0
        rows, interrupted = asyncio.run(send(run))
        summary = summarise_run(run, rows, interrupted)
    assert server.hits["/rag"] == 5 and not interrupted
    assert summary["ok"] == 5 and summary["start_time"] == run.meta["start_time"]
    write_run(run, str(tmp_path / "requests.csv"), rows, summary)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"requests.csv", "summary.csv", "schedule.csv", "meta.json"}


def test_a_replayed_schedule_sends_the_saved_queries_in_the_saved_order(tmp_path: Path):
    """The replay draws nothing: another seed and another query file change no query."""
    first, other = tmp_path / "first.txt", tmp_path / "other.txt"
    first.write_text("\n".join(f"first {i}" for i in range(40)))
    other.write_text("\n".join(f"other {i}" for i in range(40)))
    received: list[str] = []

    async def remember(request: web.Request) -> web.StreamResponse:
        received.append((await request.json())["query"])
        return await rag_ok(request)

    saved_run = tmp_path / "saved" / "requests.csv"
    with LocalServer(remember) as server:
        original, _ = run_load(
            config(server.url, timing_mode="poisson", rps=100.0, num_requests=30, seed=4,
                   queries=str(first), out=str(saved_run))
        )  # fmt: skip
        received.clear()
        replay, summary = run_load(
            config(server.url, timing_mode="trace", trace=str(saved_run.parent / "schedule.csv"),
                   num_requests=0, seed=9, queries=str(other))
        )  # fmt: skip
    saved = [r["query"] for r in original]
    assert len(set(saved)) > 15  # a draw with an order to keep
    assert [r["query"] for r in replay] == saved
    assert [r["scheduled_s"] for r in replay] == pytest.approx([r["scheduled_s"] for r in original])
    assert summary["ok"] == 30 and sorted(received) == sorted(saved)


def stalling_server(stall_at: int, stall_s: float = 1.0) -> LocalServer:
    """Blocks its whole event loop for `stall_s` when the `stall_at`-th request arrives,
    like a long GC pause: everything sent meanwhile waits in the socket."""
    server: LocalServer

    async def behaviour(request: web.Request) -> web.StreamResponse:
        if server.hits["/rag"] == stall_at:
            time.sleep(stall_s)
        return await rag_ok(request)

    server = LocalServer(behaviour)
    return server


def test_progress_is_logged_when_nobody_watches_a_terminal(monkeypatch, caplog):
    """A sweep's log or a SLURM job's output is not a terminal: progress comes as log
    lines saying how far the run is."""
    monkeypatch.setattr(run_module, "PROGRESS_LOG_S", 0.2)
    caplog.set_level(logging.INFO, logger="rag.loadgen")
    with LocalServer(rag_ok) as server:
        run_load(config(server.url, num_requests=50, progress=True))  # 1 s at 50/s
    lines = [r.getMessage() for r in caplog.records if r.name == "rag.loadgen"]
    assert len(lines) >= 2
    assert all(line.startswith("sent ") and "/50  ok " in line for line in lines)
    assert lines[0] != lines[-1]  # it moved


def test_stall_shows_as_latency_from_the_schedule():
    with stalling_server(stall_at=11) as server:
        rows, summary = run_load(config(server.url, num_requests=75))  # 1.5 s at 50/s
    assert_one_row_each(rows, 75)
    assert summary["ok"] == 75 and server.hits["/rag"] == 75
    # The stall starts when the 11th request reaches the server, at most a moment after it
    # was sent, and lasts 1 s: whatever is sent from 50 ms after that until 0.8 s after is
    # stuck behind it, however busy the machine.
    stall_start = rows[10]["sent_s"]
    during = [r for r in rows if stall_start + 0.05 < r["sent_s"] < stall_start + 0.8]
    assert len(during) >= 30
    for r in during:
        # Held up by the stall, they would be late by most of its second; a loaded machine
        # may make them late by a little.
        assert r["send_lag_s"] < 0.5
        assert stall_start + 0.95 < r["done_s"] < stall_start + 1.5  # all answered after it
    assert during[0]["latency_s"] > 0.8
    assert summary["latency_max_s"] > 0.8
    # The stall is the server's latency, not the client's lateness (counted from latency,
    # every request in it would be late).
    assert_verdict_is_the_clients_own_timing(rows, summary)


def test_slot_wait_counts_as_latency_and_voids_the_run():
    """With a concurrency cap, requests queue behind the stall: their service latency is
    small, but latency from the schedule still shows the second they waited."""
    with stalling_server(stall_at=3) as server:
        rows, summary = run_load(config(server.url, num_requests=40, max_in_flight=1))
    assert_one_row_each(rows, 40)
    assert server.hits["/rag"] == 40
    queued = [r for r in rows if r["latency_s"] > 0.7 and r["service_latency_s"] < 0.1]
    assert queued, "some request waited for a slot, not for the server"
    assert all(r["send_lag_s"] > 0.5 for r in queued)
    assert summary["schedule_kept"] is False
    assert "late by more than 5 ms" in summary["schedule_kept_reason"]


def test_timeouts_are_failures_never_retried():
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({"result": "too late"})

    with LocalServer(hang) as server:
        rows, summary = run_load(config(server.url, num_requests=10, timeout=0.3))
    assert server.hits["/rag"] == 10
    assert_one_row_each(rows, 10)
    for r in rows:
        assert r["error"] == "timeout" and r["status"] is None
        assert 0.25 < r["service_latency_s"] < 1.0
    assert summary["failed_timeout"] == summary["failed"] == 10
    assert summary["ok"] == 0
    # Whether the client kept its schedule does not depend on nothing succeeding.
    assert summary["ok_fraction"] == 0.0
    assert_verdict_is_the_clients_own_timing(rows, summary)
    assert math.isinf(summary["latency_adj_p50_s"])
    assert math.isnan(summary["latency_p50_s"])


def test_connection_refused_is_a_failure_never_dropped():
    rows, summary = run_load(config(f"http://127.0.0.1:{closed_port()}", num_requests=10))
    assert_one_row_each(rows, 10)
    assert all(r["error"] == "connection" for r in rows)
    assert all("Error" in r["error_detail"] for r in rows)
    assert summary["failed_connection"] == 10
    assert summary["sent"] == 10


EXPECTED = {
    "ok": None,
    "422": "http_4xx",
    "429": "http_4xx",
    "503": "http_5xx",
    "504": "http_5xx",
    "302": "http_3xx",
    "notjson": "bad_body",
    "noresult": "bad_body",
}


async def by_query(request: web.Request) -> web.Response:
    """Misbehave in the way the query names."""
    query = (await request.json())["query"]
    if query == "ok":
        return await rag_ok(request)
    if query == "notjson":
        return web.Response(text="<html>oops</html>", content_type="text/html")
    if query == "noresult":
        return web.json_response({"query": query})
    if query == "302":
        raise web.HTTPFound("/rag")
    return web.json_response({"detail": f"failing with {query}"}, status=int(query))


def test_http_error_classes(tmp_path: Path):
    queries = tmp_path / "queries.txt"
    queries.write_text("# one per outcome\n\n" + "\n".join(EXPECTED) + "\n")
    with LocalServer(by_query) as server:
        rows, summary = run_load(
            config(server.url, num_requests=60, rps=200.0, queries=str(queries))
        )
    assert server.hits["/rag"] == 60  # the redirect was not followed
    assert_one_row_each(rows, 60)
    assert {r["query"] for r in rows} == set(EXPECTED)
    for r in rows:
        assert r["error"] == EXPECTED[r["query"]], r
        if r["query"].isdigit():
            assert r["status"] == int(r["query"])
        if r["query"] in ("422", "503"):
            assert r["error_detail"] == f"failing with {r['query']}"
    assert summary["failed"] == sum(1 for r in rows if r["query"] != "ok")
    assert summary["failed_http_4xx"] == sum(1 for r in rows if r["query"] in ("422", "429"))


def test_assign_mode_asks_the_balancer_then_posts_to_the_backend():
    with LocalServer() as backend:
        endpoint = f"{backend.url}/rag"

        async def assign(request: web.Request) -> web.Response:
            return web.json_response({"backend": endpoint})

        with LocalServer(assign) as balancer:
            rows, summary = run_load(config(balancer.url, num_requests=10, assign=True))
    assert balancer.hits == {"/assign": 10}
    assert backend.hits == {"/rag": 10}
    assert summary["ok"] == 10
    assert all(r["backend"] == endpoint for r in rows)  # posted to as given
    assert all(r["server_replica"] == "r0" for r in rows)


def test_assign_failure_is_a_failure():
    async def overloaded(request: web.Request) -> web.Response:
        return web.json_response({"detail": "no replica"}, status=503)

    with LocalServer(overloaded) as balancer:
        rows, _ = run_load(config(balancer.url, num_requests=5, assign=True))
    assert balancer.hits == {"/assign": 5}
    assert all(r["error"] == "http_5xx" and r["status"] == 503 for r in rows)
    assert all(r["error_detail"] == "no replica" for r in rows)


def test_blocked_client_loop_makes_the_run_invalid():
    """A client that cannot keep its schedule says so instead of reporting figures."""

    async def scenario():
        async def block():
            async with asyncio.timeout(30):
                while server.hits["/rag"] < 5:  # the run is under way
                    await asyncio.sleep(0.001)
            time.sleep(0.3)  # the event loop cannot send anything meanwhile

        blocker = asyncio.ensure_future(block())
        result = await run_load_async(config(server.url, num_requests=40, rps=100.0))
        await blocker
        return result

    with LocalServer() as server:
        rows, summary = asyncio.run(scenario())
    assert_one_row_each(rows, 40)
    assert summary["ok"] == 40
    assert summary["send_lag_max_s"] > 0.2
    assert summary["schedule_kept"] is False
    assert "late by more than 5 ms" in summary["schedule_kept_reason"]


def test_stop_marks_unsent_and_cancelled_rows():
    async def every_third_hangs(request: web.Request) -> web.StreamResponse:
        if server.hits["/rag"] % 3 == 0:
            await asyncio.sleep(30)
        return await rag_ok(request)

    async def scenario():
        stop = asyncio.Event()

        async def stop_midway() -> float:
            async with asyncio.timeout(30):
                while server.hits["/rag"] < 30:  # some answered, some hanging, most unsent
                    await asyncio.sleep(0.001)
            stop.set()
            return time.perf_counter()

        stopping = asyncio.ensure_future(stop_midway())
        result = await run_load_async(config(server.url, num_requests=200, stop_grace=0.2), stop)
        return result, time.perf_counter() - await stopping

    server = LocalServer(every_third_hangs)
    with server:
        (rows, summary), stopped_in = asyncio.run(scenario())
    assert stopped_in < 5  # the grace, not the 30 s the hanging requests would take
    assert_one_row_each(rows, 200)
    errors = {r["error"] for r in rows}
    assert {None, "cancelled", "not_sent"} <= errors
    assert summary["sent"] == server.hits["/rag"]
    assert summary["failed_not_sent"] == 200 - summary["sent"]
    assert summary["interrupted"] is True and summary["schedule_kept"] is False
    for r in rows:
        if r["error"] == "cancelled":
            assert r["sent_s"] is not None and r["done_s"] is None
        if r["error"] == "not_sent":
            assert r["sent_s"] is None


def test_random_schedule_reports_target_and_own_rate(tmp_path: Path):
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(str(10 + i * 0.02) for i in range(10)))
    with LocalServer() as server:
        _, poisson = run_load(
            config(server.url, timing_mode="poisson", rps=200.0, num_requests=100, seed=3)
        )
        _, replay = run_load(config(server.url, timing_mode="trace", trace=str(trace)))
    assert server.hits["/rag"] == 110
    assert poisson["target_rps"] == 200.0
    assert poisson["schedule_rps"] != pytest.approx(200.0, rel=1e-3)  # a finite draw
    assert poisson["achieved_send_rps"] == pytest.approx(poisson["schedule_rps"], rel=0.1)
    assert replay["scheduled"] == 10
    assert replay["target_rps"] == replay["schedule_rps"] == pytest.approx(50.0)


def test_running_out_of_sockets_is_the_clients_failure():
    """EMFILE at connect is not the server's fault: class `client`, and the run is void."""

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({"result": "too late"})

    code = (
        "import resource, sys\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (80, hard))\n"
        "from rag.loadgen import LoadConfig, run_load\n"
        "rows, s = run_load(LoadConfig(target=sys.argv[1], timing_mode='ideal', rps=500.0,"
        " num_requests=100, timeout=0.5, progress=False))\n"
        "print(s['failed_client'], s['failed_timeout'], s['schedule_kept'],"
        " s['schedule_kept_reason'])\n"
    )
    with LocalServer(hang) as server:
        result = subprocess.run(
            [sys.executable, "-c", code, server.url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    failed_client, failed_timeout, valid, reason = result.stdout.split(" ", 3)
    assert int(failed_client) > 0 and int(failed_client) + int(failed_timeout) == 100
    assert valid == "False" and "failed in the client itself" in reason
