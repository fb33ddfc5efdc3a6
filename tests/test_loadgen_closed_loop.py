"""The load generator's closed loop (`timing_mode=concurrency`) against real HTTP servers on
127.0.0.1: exactly N requests in flight, for a number of requests or a duration, labelled
closed-loop, with the open loop's draw of queries."""

from __future__ import annotations

import asyncio
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web
from loadgen_server import Behaviour, LocalServer, rag_ok

from rag.loadgen import LoadConfig, plan, run_load
from rag.loadgen.schedule import build_schedule, load_prompts


def closed(target: str, users: int, **overrides) -> LoadConfig:
    fields = {"timing_mode": "concurrency", "concurrency": users, "num_requests": 40}
    return LoadConfig(target=target, progress=False, **{**fields, **overrides})


def users_gate(users: int) -> tuple[Behaviour, dict[str, int]]:
    """A server behaviour that holds every request until `users` are in flight at once (a
    503 if they never are), then answers; and its count of the most ever in flight."""
    seen = {"in_flight": 0, "most": 0}
    gate: list[asyncio.Event] = []  # made on the server's own loop

    async def behaviour(request: web.Request) -> web.StreamResponse:
        if not gate:
            gate.append(asyncio.Event())
        seen["in_flight"] += 1
        seen["most"] = max(seen["most"], seen["in_flight"])
        if seen["in_flight"] == users:
            gate[0].set()
        try:
            await asyncio.wait_for(gate[0].wait(), 30)
        except TimeoutError:
            return web.json_response({"detail": f"never {users} in flight"}, status=503)
        finally:
            seen["in_flight"] -= 1
        return await rag_ok(request)

    return behaviour, seen


def test_n_users_keep_exactly_n_requests_in_flight():
    behaviour, seen = users_gate(4)
    with LocalServer(behaviour) as server:
        rows, summary = run_load(closed(server.url, 4))
    assert server.hits["/rag"] == 40
    assert [r["request_id"] for r in rows] == list(range(40))
    assert all(r["error"] is None for r in rows), rows[0]
    assert seen["most"] == 4  # all four users at once, never a fifth request
    # Each request leaves when a user is free: at no moment are more than four in flight.
    events = sorted([(r["sent_s"], 1) for r in rows] + [(r["done_s"], -1) for r in rows])
    in_flight = [0]
    for _, change in events:
        in_flight.append(in_flight[-1] + change)
    assert max(in_flight) <= 4
    assert summary["loop"] == "closed" and summary["concurrency"] == 4
    assert summary["sent"] == summary["ok"] == 40
    assert math.isnan(summary["target_rps"]) and math.isnan(summary["schedule_rps"])


def test_a_duration_bounds_the_loop_and_latency_runs_from_each_send(tmp_path: Path):
    out = tmp_path / "requests.csv"
    with LocalServer() as server:
        rows, summary = run_load(closed(server.url, 2, num_requests=0, duration=1.0, out=str(out)))
    assert len(rows) == server.hits["/rag"] >= 2
    assert all(r["error"] is None for r in rows)
    assert all(r["scheduled_s"] < 1.0 for r in rows)  # none started after the duration
    for r in rows:  # its moment is its send: the client's own preparation at most between
        assert r["latency_s"] == pytest.approx(r["service_latency_s"] + r["send_lag_s"])
        assert 0 <= r["send_lag_s"] < r["latency_s"]
    assert summary["loop"] == "closed" and summary["schedule_kept"]
    assert not (tmp_path / "schedule.csv").exists()  # nothing to replay
    with open(tmp_path / "summary.csv") as f:
        assert next(csv.DictReader(f))["loop"] == "closed"


def refuse_first(retry_after: str) -> Behaviour:
    """Answer the first request 429 with `retry_after` as its Retry-After, then answer."""
    refused: list[bool] = []

    async def behaviour(request: web.Request) -> web.StreamResponse:
        if not refused:
            refused.append(True)
            return web.json_response(
                {"detail": "busy"}, status=429, headers={"Retry-After": retry_after}
            )
        return await rag_ok(request)

    return behaviour


def test_a_user_told_to_retry_after_waits_that_long_before_its_next_request():
    with LocalServer(refuse_first("1")) as server:
        rows, summary = run_load(closed(server.url, 1, num_requests=3))
    refusal, *answers = rows
    assert refusal["status"] == 429 and refusal["error"] == "http_4xx"
    assert refusal["retry_after_s"] == 1.0
    assert answers[0]["sent_s"] - refusal["done_s"] >= 1.0
    assert all(r["error"] is None for r in answers)
    assert summary["failed"] == 1 and summary["ok"] == 2


def test_a_retry_after_past_the_duration_ends_the_user_with_the_run():
    with LocalServer(refuse_first("3600")) as server:
        rows, _ = run_load(closed(server.url, 1, num_requests=0, duration=1.0))
    assert [r["status"] for r in rows] == [429]


def test_it_asks_the_open_loops_draw_of_queries():
    with LocalServer() as server:
        rows, _ = run_load(closed(server.url, 3, num_requests=25, seed=7))
    schedule = build_schedule("ideal", 10.0, 25, seed=7, prompts=load_prompts())
    assert [r["query"] for r in rows] == schedule.queries


@pytest.mark.parametrize(
    "overrides, complaint",
    [
        ({"concurrency": 0}, "goes with concurrency >= 1"),
        ({"timing_mode": "poisson"}, "goes with concurrency >= 1, and only it"),
        ({"max_in_flight": 2}, "leave max_in_flight at 0"),
        ({"num_requests": 0, "duration": 0.0}, "give num_requests or duration"),
    ],
)
def test_bad_closed_loop_settings_are_refused_before_anything_is_sent(overrides, complaint):
    with pytest.raises(ValueError, match=complaint):
        plan(closed("http://127.0.0.1:9", 4, **overrides))


def test_the_command_line_runs_a_closed_loop_against_the_rag_server(default_server, tmp_path):
    server = default_server
    out = tmp_path / "requests.csv"
    result = subprocess.run(
        [sys.executable, "-m", "rag.loadgen", "--target", server.url,
         "--timing_mode", "concurrency", "--concurrency", "3", "--num_requests", "12",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "closed loop: 3 users" in result.stdout and "sent 12  ok 12" in result.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "200" for r in rows)
    assert {r["server_batch_size"] for r in rows} <= {"1", "2", "3"}  # never more than 3 users
