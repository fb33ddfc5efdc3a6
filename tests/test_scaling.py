"""The scaling variant started for real: balancer, autoscaler and replica processes on
loopback, with the simulated model (replicas sleep instead of computing, so several fit
on two cores)."""

from __future__ import annotations

import csv
import itertools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from cluster_helpers import alive, decided, decisions, load_until, ready, replicas, wait_for
from raw_http import post_in_parts

from rag.cluster.local import core_share, machine_cores, replica_env, visible_gpus
from rag.cluster.pool import Replica
from rag.cluster.process import ServerFailed, ServerProcess, read_port, spawn, stop_group
from rag.cluster.scaling import replica_overrides
from rag.config import compose
from rag.loadgen import LoadConfig, run_load

QUERY = {"query": "Which animals can hover in the air?", "k": 1}
JSON = {"Content-Type": "application/json"}
# Fast autoscaler settings for tests: decisions every 0.5 s, short windows.
FAST = [
    "variant.scaling.check_interval_s=0.5",
    "variant.scaling.health_interval_s=0.2",
    "variant.scaling.stable_window_s=4",
    "variant.scaling.panic_window_s=1",
    "variant.scaling.upscale_delay_s=1",
    "variant.scaling.downscale_delay_s=3",
]


def serving(url: str) -> int:
    """Replicas that count as capacity: ready or on their way."""
    return sum(r["state"] in ("starting", "ready") for r in replicas(url))


@pytest.fixture
def start_scaling(start_server, tmp_path) -> Callable[..., ServerProcess]:
    def start(*overrides: str) -> ServerProcess:
        return start_server(
            "variant=scaling", f"run_dir={tmp_path / 'run'}", *overrides, model="simulated"
        )

    return start


def test_replicas_that_cannot_start_fail_the_variant_fast(start_server, tmp_path):
    """A replica that cannot start is not replaced forever: after a few deaths with none
    ever ready the variant exits with the replicas' error, long before the readiness
    timeout of whoever started it."""
    started = time.monotonic()
    with pytest.raises(ServerFailed) as failed:
        start_server(
            "variant=scaling", f"run_dir={tmp_path / 'run'}", *FAST,
            "model.generator=tiny:nothing", ready_timeout_s=300,
        )  # fmt: skip
    assert time.monotonic() - started < 200
    message = str(failed.value)
    assert "exited with code 1" in message
    assert "3 replicas died before any became ready" in message
    assert "unknown tiny model 'tiny:nothing'" in message
    assert len(list((tmp_path / "run" / "replicas").glob("*.log"))) == 3


def test_forwards_requests_to_replicas_and_stops_them_all(start_scaling, tmp_path):
    server = start_scaling("variant.scaling.min_replicas=2", "variant.scaling.max_replicas=2")
    wait_for(lambda: len([r for r in replicas(server.url) if r["state"] == "ready"]) == 2, 60,
             "both replicas ready")  # fmt: skip
    answers = [httpx.post(f"{server.url}/rag", json=QUERY, timeout=30) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.json()["model"] for a in answers} == {"simulated"}
    assert {a.json()["replica"] for a in answers} == {"r0", "r1"}  # spread while idle
    assert httpx.get(f"{server.url}/assign").json()["backend"].startswith("http://127.0.0.1:")
    stats = httpx.get(f"{server.url}/stats").json()
    assert stats["variant"] == "scaling" and stats["simulated"] is True
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'balancer_requests_total{status="200"} 6.0' in metrics
    pids = [r["pid"] for r in replicas(server.url)]
    assert (tmp_path / "run" / "replicas" / "r0.log").exists()
    assert server.stop() == 0
    wait_for(lambda: not any(alive(pid) for pid in pids), 30, "replicas stopped")
    rows = list(csv.DictReader((tmp_path / "run" / "autoscaler.csv").open()))
    assert rows and rows[0]["replicas_before"] == "2"


def test_bad_requests_get_json_errors_without_reaching_a_replica(start_scaling):
    server = start_scaling("server.body_timeout_s=2")
    stalled = post_in_parts(server.port, 100, [b'{"query": '], gap_s=0)
    assert stalled.startswith(b"HTTP/1.1 408")
    assert stalled.endswith(b'{"detail":"the request body did not arrive within 2 s"}')
    too_big = (b"x" * 1024 for _ in range(100))  # chunked: no Content-Length to trust
    response = httpx.post(f"{server.url}/rag", content=too_big, headers=JSON, timeout=30)
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    assert httpx.get(f"{server.url}/nowhere").json()["detail"]
    bad = httpx.post(f"{server.url}/rag", content=b"{not json", headers=JSON, timeout=30)
    assert bad.status_code == 422 and bad.json()["detail"]  # the replica's own answer
    assert replicas(server.url)[0]["requests"] == 1


def test_a_replica_gets_traffic_only_once_ready(cache_overrides, tmp_path):
    """Replicas whose warm-up takes 3 s listen before they are ready; the balancer must
    not route to them until their /ready says so."""
    port_file = tmp_path / "port"
    command = [
        sys.executable, "-m", "rag.serve", "variant=scaling", "model=simulated", *cache_overrides,
        "model.simulated.generate_fixed_ms=3000", "port=0", f"port_file={port_file}",
        f"run_dir={tmp_path / 'run'}", "variant.scaling.health_interval_s=0.2",
    ]  # fmt: skip
    process = spawn(command, tmp_path / "balancer.log", {})
    try:
        wait_for(lambda: read_port(port_file) is not None, 60, "balancer listening")
        url = f"http://127.0.0.1:{read_port(port_file)}"
        wait_for(lambda: bool(replicas(url)[0]["url"]), 60, "replica listening")
        replica_url = replicas(url)[0]["url"]
        assert httpx.get(f"{replica_url}/ping").status_code == 200  # up, but warming
        early = httpx.post(f"{url}/rag", json=QUERY, timeout=30)
        assert httpx.get(f"{url}/ready").status_code == 503
        assert early.status_code == 503 and early.json()["detail"]
        assert early.headers["Retry-After"] == "1"
        assert replicas(url)[0]["requests"] == 0
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, 60, "ready")
        assert httpx.post(f"{url}/rag", json=QUERY, timeout=30).status_code == 200
    finally:
        stop_group(process, 30)


def test_a_killed_replica_costs_only_its_in_flight_requests_and_is_replaced(start_scaling):
    server = start_scaling(
        "variant.scaling.min_replicas=2", "variant.scaling.max_replicas=2", *FAST,
        "model.simulated.generate_fixed_ms=300",
    )  # fmt: skip
    wait_for(lambda: sum(r["state"] == "ready" for r in replicas(server.url)) == 2, 60, "ready")
    victim = replicas(server.url)[0]
    result: dict = {}

    def load() -> None:
        config = LoadConfig(target=server.url, timing_mode="ideal", rps=20, num_requests=120,
                            timeout=30, progress=False)  # fmt: skip
        result["rows"], result["summary"] = run_load(config)

    def victim_busy() -> bool:
        now = {r["id"]: r for r in replicas(server.url)}[victim["id"]]
        return now["in_flight"] > 0 and now["requests"] >= 5

    sender = threading.Thread(target=load)
    sender.start()
    wait_for(victim_busy, 60, "the victim serving the load")
    os.kill(victim["pid"], signal.SIGKILL)
    sender.join(120)
    assert not sender.is_alive()
    rows = result["rows"]
    assert len(rows) == 120 and all(r["status"] is not None or r["error"] for r in rows)
    failed = [r for r in rows if r["error"]]
    # 502 from the balancer before an answer's first byte, its error event after it; no hang
    assert {r["error"] for r in failed} <= {"http_5xx", "stream_error"}
    after = {r["id"]: r for r in replicas(server.url)}
    served_by_victim = sum(1 for r in rows if r.get("server_replica") == victim["id"])
    # Every failure is a request the victim had accepted; none was sent twice (those it
    # refused to connect went to the other replica).
    victim_after = after[victim["id"]]
    accepted = victim_after["requests"] - victim_after["refused"]
    assert len(failed) == accepted - served_by_victim
    assert len(failed) <= 2 * 20  # at most what it held: two batches' worth at 20 req/s
    assert after[victim["id"]]["state"] == "dead"
    wait_for(lambda: sum(r["state"] == "ready" for r in replicas(server.url)) == 2, 60,
             "a replacement ready")  # fmt: skip


def test_scales_up_on_a_burst_and_back_down_without_flapping(start_scaling, tmp_path):
    """The load rules alone (the tests below judge what a scale-up bought)."""
    server = start_scaling(
        "variant.scaling.max_replicas=3", "variant.scaling.target_ongoing_requests=2", *FAST,
        "model.simulated.generate_fixed_ms=250", "model.simulated.generate_per_query_ms=0",
        "variant.max_batch_size=4", "variant.scaling.gain_share=0",
    )  # fmt: skip
    steady = LoadConfig(target=server.url, timing_mode="ideal", rps=2, num_requests=12,
                        timeout=60, progress=False)  # fmt: skip
    assert run_load(steady)[1]["ok_fraction"] == 1.0  # ~0.5 in flight: one replica holds
    burst = LoadConfig(target=server.url, timing_mode="poisson", rps=60, num_requests=240,
                       timeout=60, progress=False)  # fmt: skip
    assert run_load(burst)[1]["ok_fraction"] == 1.0
    wait_for(lambda: serving(server.url) == 1, 60, "back to one replica")
    rows = list(csv.DictReader((tmp_path / "run" / "autoscaler.csv").open()))
    counts = [int(r["replicas_after"]) for r in rows]
    assert max(counts) == 3
    changes = [b - a for a, b in itertools.pairwise(counts) if a != b]
    ups, downs = [c for c in changes if c > 0], [c for c in changes if c < 0]
    # Up (in one or two steps) and then down: never down and up again.
    first_down = changes.index(downs[0])
    assert ups and all(c < 0 for c in changes[first_down:])
    steady_rows = rows[: rows.index(next(r for r in rows if int(r["replicas_after"]) > 1))]
    assert len(steady_rows) >= 8  # the steady phase held one replica for >= 4 s


def test_a_killed_balancer_takes_its_replicas_with_it(start_scaling):
    server = start_scaling("variant.scaling.min_replicas=2")
    pids = [r["pid"] for r in replicas(server.url)]
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pids), 30, "replicas gone with it")


def test_a_client_that_leaves_cancels_its_forwarded_request(start_scaling):
    server = start_scaling("model.simulated.generate_fixed_ms=4000")
    replica_url = replicas(server.url)[0]["url"]

    def replica_stats() -> dict:
        return httpx.get(f"{replica_url}/stats", timeout=10).json()

    first = threading.Thread(target=lambda: httpx.post(f"{server.url}/rag", json=QUERY, timeout=30))
    first.start()
    wait_for(lambda: replica_stats()["running"] == 1, 30, "the first one's batch computing")
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        body = b'{"query": "Which animals can hover in the air?", "k": 1}'
        client.sendall(
            b"POST /rag HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: replica_stats()["queue_depth"] == 1, 30, "the second one queued")
    first.join(30)
    wait_for(lambda: httpx.get(f"{replica_url}/stats").json()["dropped"] == 1, 30,
             "the replica dropped the abandoned request")  # fmt: skip


def test_replicas_get_the_users_model_settings_and_a_share_of_the_machine(monkeypatch):
    argv = ["variant=scaling", "model=tiny", "corpus.max_docs=5", "port=0", "run_dir=/x",
            "variant.max_batch_size=7", "variant.scaling.max_replicas=2", "host=::1"]  # fmt: skip
    cfg = compose(argv)
    overrides = replica_overrides(argv, cfg, Replica("r3"))
    assert overrides[:2] == ["model=tiny", "corpus.max_docs=5"]
    assert "variant=batched" in overrides and "variant.max_batch_size=7" in overrides
    assert "server.replica_id=r3" in overrides
    assert not [o for o in overrides if o.startswith(("port", "run_dir", "host", "variant.s"))]
    assert compose(overrides).variant.max_batch_size == 7  # what the replica will run
    assert core_share(replicas=4, cores=2) == 1
    assert core_share(replicas=2, cores=16) == 8
    assert core_share(replicas=1, cores=16) == 16
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gpus = visible_gpus("")
    assert [replica_env(i, gpus, 2, 0)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    assert replica_env(0, [], 2, 50, token="t") == {
        "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
        "RAGBENCH_BALANCER_TOKEN": "t",
    }  # fmt: skip


def threads_of(replica: dict) -> int | None:
    return httpx.get(f"{replica['url']}/stats", timeout=10).json()["runtime"]["torch_threads"]


def keep_busy(url: str, stop: threading.Event, clients: int = 8) -> list[threading.Thread]:
    """`clients` clients each sending one request after another until `stop` is set."""

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                http.post(f"{url}/rag", json=QUERY)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.skipif(machine_cores() < 2, reason="one core has nothing to share")
def test_replicas_share_the_cores_as_the_pool_grows_and_shrinks(start_server, tmp_path):
    """One replica computes with every core, as a server started alone does; while a
    second one runs (loading, serving or draining) each has half; once it stopped, the
    first has them all again."""
    cores = machine_cores()
    server = start_server(
        "variant=scaling", f"run_dir={tmp_path / 'run'}", *FAST, "model.torch_threads=0",
        "variant.scaling.max_replicas=2", "variant.scaling.target_ongoing_requests=1",
        "variant.scaling.gain_share=0",
    )  # fmt: skip
    (first,) = replicas(server.url)
    assert threads_of(first) == cores
    stop = threading.Event()
    clients = keep_busy(server.url, stop)
    try:
        wait_for(lambda: len(replicas(server.url)) == 2, 60, "a second replica launched")
        wait_for(lambda: threads_of(first) == cores // 2, 30, "the first told its half")
        wait_for(lambda: len(ready(server.url)) == 2, 120, "the second ready")
        assert threads_of(ready(server.url)[1]) == cores // 2
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    wait_for(lambda: len(ready(server.url)) == 1, 60, "scaled back down")
    wait_for(lambda: threads_of(first) == cores, 30, "the first given every core again")


def test_a_replica_that_only_divides_one_device_is_taken_back(start_scaling, tmp_path):
    """Replicas of a simulated model that share one device: the second adds nothing, so
    the autoscaler takes it back and holds, and autoscaler.csv says why."""
    server = start_scaling(
        "variant.scaling.max_replicas=3", "variant.scaling.target_ongoing_requests=2", *FAST,
        "variant.scaling.gain_settle_s=1", "variant.scaling.gain_window_s=3",
        f"model.simulated.device_lock={tmp_path / 'device'}", "variant.max_batch_size=4",
        "model.simulated.generate_fixed_ms=200", "model.simulated.generate_per_query_ms=0",
    )  # fmt: skip
    # Overloaded (the device serves 20/s) but not so far that the backlog outlives the
    # requests' timeout, until the trial is judged: a window without arrivals judges nothing,
    # and on a busy machine the replica's start, the probe's drain and the windows take
    # longer than any fixed load would allow for.  At 40/s a replica starved of processor
    # time on a busy machine served less than the device, and a second one added what it
    # lacked.
    overload = LoadConfig(target=server.url, timing_mode="poisson", rps=30, duration=120,
                          num_requests=0, timeout=60, stop_grace=60, progress=False)  # fmt: skip
    log = tmp_path / "run" / "autoscaler.csv"
    verdicts = ("gain", "no gain", "kept up")  # the trial's end (a probe only measures)
    answers, summary = load_until(
        overload, lambda: any(r["verdict"] in verdicts for r in decisions(log)), 120,
        decided(log, "the trial's verdict"),
    )  # fmt: skip
    # Every request sent answered (those the stop left unsent aside); on a busy machine a few
    # may be refused by admission (429) or miss their deadline (504), never lost.
    sent = [r for r in answers if r["sent_s"] is not None]
    assert all(r["status"] == 200 or r["status"] in (429, 504) for r in sent)
    assert summary["sent"] == len(sent)
    assert summary["ok"] >= 0.9 * len(sent)
    wait_for(lambda: serving(server.url) == 1, 30, "one replica left")
    rows = decisions(log)
    (no_gain,) = [r for r in rows if r["verdict"] in verdicts]
    assert no_gain["verdict"] == "no gain", no_gain["reason"]
    assert "2 replicas served" in no_gain["reason"] and "above 1 held 120 s" in no_gain["reason"]
    assert max(int(r["replicas_after"]) for r in rows) == 2  # one trial, never a third
    after = rows[rows.index(no_gain) :]
    assert {int(r["replicas_after"]) for r in after} == {1} and after[-1]["knee"] == "1"
