"""`python -m rag.loadgen` as a user runs it: output, terminal progress, Ctrl-C."""

from __future__ import annotations

import asyncio
import csv
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web
from loadgen_server import LocalServer, rag_ok


def loadgen(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rag.loadgen", "--timing_mode", "ideal", *args],
        text=True,
        **popen,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_prints_summary_writes_files_and_stays_quiet_off_a_terminal(tmp_path: Path):
    out = tmp_path / "requests.csv"
    with LocalServer() as server:
        proc = loadgen(
            "--target", server.url, "--rps", "100", "--num_requests", "20", "--out", str(out),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "scheduled 20  sent 20  ok 20" in stdout
    assert "\r" not in stderr  # no progress line when stderr is not a terminal
    assert len(read_csv(out)) == 20
    summary = read_csv(tmp_path / "summary.csv")[0]
    assert summary["ok"] == "20"
    # kept, unless a loaded machine made the client late (the summary's verdict, shown)
    assert ("schedule   kept yes" in stdout) is (summary["schedule_kept"] == "True")


def test_cli_shows_progress_on_a_terminal():
    with LocalServer() as server:
        controller, terminal = pty.openpty()
        proc = loadgen(
            "--target", server.url, "--rps", "20", "--num_requests", "20",
            stdout=subprocess.PIPE, stderr=terminal,
        )  # fmt: skip
        os.close(terminal)
        stdout, _ = proc.communicate(timeout=60)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        os.close(controller)
    assert proc.returncode == 0
    assert b"\rsent " in shown and b" ok " in shown
    assert "ok 20" in stdout


def test_cli_rejects_a_bad_option():
    proc = loadgen("--timing_mode", "sometimes", stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "timing_mode must be one of" in stderr


def test_ctrl_c_stops_sending_and_still_writes_every_row(tmp_path: Path):
    async def every_fifth_hangs(request: web.Request) -> web.StreamResponse:
        if server.hits["/rag"] % 5 == 0:
            await asyncio.sleep(30)
        return await rag_ok(request)

    out = tmp_path / "requests.csv"
    server = LocalServer(every_fifth_hangs)
    with server:
        proc = loadgen(
            "--target", server.url, "--rps", "100", "--num_requests", "3000",
            "--stop_grace", "0.5", "--out", str(out),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while server.hits["/rag"] < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - started
        hits = server.hits["/rag"]
    assert proc.returncode == 130, stderr
    assert stopped_in < 10
    assert "interrupted" in stdout
    rows = read_csv(out)
    assert [int(r["request_id"]) for r in rows] == list(range(3000))
    errors = [r["error"] for r in rows]
    assert errors.count("") >= 20
    assert errors.count("cancelled") >= 5  # the hanging ones, given up after the grace
    assert errors.count("not_sent") > 2000
    assert set(errors) <= {"", "cancelled", "not_sent"}
    assert sum(1 for r in rows if r["sent_s"]) == hits
    (summary,) = read_csv(tmp_path / "summary.csv")
    assert summary["interrupted"] == "True" and summary["schedule_kept"] == "False"
    assert int(summary["failed_not_sent"]) == errors.count("not_sent")
