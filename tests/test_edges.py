"""The HTTP edges at both doors, the RAG server and the balancer, started for real on
loopback: malformed requests refused alike in the one JSON error format, refusals that read
no more of a body and close at once, the content type, and idle connections that cannot
lock out real clients."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from cluster_helpers import wait_for
from raw_http import HEAD, exchange, keep_sending
from server_metrics import metric

from rag.cluster.process import ServerProcess

QUERY = {"query": "Which animals can hover in the air?", "k": 1}
LIMITS = ["server.body_timeout_s=2", "server.head_timeout_s=30"]


@pytest.fixture(scope="module")
def rag_server(cache_overrides, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("edges") / "server.log"
    with ServerProcess(["model=tiny", *cache_overrides, *LIMITS], log_path=log) as running:
        yield running


@pytest.fixture(scope="module")
def balancer(cache_overrides, tmp_path_factory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("edges-balancer")
    overrides = ["variant=scaling", "model=simulated", *cache_overrides, *LIMITS,
                 f"run_dir={folder / 'run'}"]  # fmt: skip
    with ServerProcess(overrides, log_path=folder / "balancer.log") as running:
        yield running


@pytest.fixture(params=["server", "balancer"])
def door(request) -> ServerProcess:
    return request.getfixturevalue("rag_server" if request.param == "server" else "balancer")


def request_with(*headers: bytes, body: bytes = b"", target: bytes = b"/rag") -> bytes:
    lines = b"".join(h + b"\r\n" for h in headers)
    return b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n" + body


MARK = b"INJECTED"  # in every malformed request: an answer must never repeat it
MALFORMED = {
    "bad method token": (b"G\x01T /ping HTTP/1.1\r\nHost: x\r\nX-A: " + MARK + b"\r\n\r\n", 400),
    "bad Content-Length": (request_with(b"Content-Length: " + MARK), 400),
    "negative Content-Length": (request_with(b"Content-Length: -1", b"X: " + MARK), 400),
    "conflicting Content-Length": (
        request_with(b"Content-Length: 2", b"Content-Length: 3", b"X: " + MARK, body=b"{}"),
        400,
    ),
    "duplicated Content-Length": (
        request_with(b"Content-Length: 2", b"Content-Length: 2", b"X: " + MARK, body=b"{}"),
        400,
    ),
    "Transfer-Encoding gzip": (request_with(b"Transfer-Encoding: gzip", b"X: " + MARK), 400),
    "Content-Length with Transfer-Encoding": (
        request_with(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        400,
    ),
    "NUL in a header": (request_with(b"X-A: a\x00" + MARK, b"Content-Length: 0"), 400),
    "space in a header name": (request_with(b"X " + MARK + b": a", b"Content-Length: 0"), 400),
    "bad chunk size": (request_with(b"Transfer-Encoding: chunked", body=MARK + b"\r\n"), 400),
    "TLS on the plain port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARK * 40, 400),
    "header too large": (request_with(b"X-Big: " + MARK * 131072, b"Content-Length: 0"), 431),
    "URL too large": (request_with(b"Content-Length: 0", target=b"/rag?" + MARK * 131072), 431),
    "too many headers": (request_with(*[b"X-%d: " % i + MARK for i in range(150)]), 431),
    "10,000 headers": (request_with(*[b"X-%d: a" % i for i in range(10_000)]), 431),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests_get_one_json_error_and_a_closed_connection(door, case):
    request, status = MALFORMED[case]
    reply, closed = exchange(door.port, request)
    assert reply.status == status
    assert reply.headers[b"content-type"] == b"application/json"
    assert reply.json()["detail"]
    assert MARK not in reply.body and b"\x00" not in reply.body
    assert closed


def test_both_doors_answer_malformed_requests_alike(rag_server, balancer):
    for request, _ in MALFORMED.values():
        at_server, _ = exchange(rag_server.port, request)
        at_balancer, _ = exchange(balancer.port, request)
        assert (at_server.status, at_server.json()) == (at_balancer.status, at_balancer.json())


GIGABYTES_50 = HEAD + b"Content-Length: 50000000000\r\n\r\n"


def test_a_declared_body_over_the_limit_is_refused_unread(door):
    """413 from the declared length: nothing more of it is read, and the connection is
    gone within a second of the answer."""
    refused = keep_sending(door.port, GIGABYTES_50, b'{"query": "')
    assert refused.reply.status == 413
    assert "limit" in refused.reply.json()["detail"]
    assert refused.open_after_reply_s < 1.5
    # What the kernel's buffers took while the socket lingered, never a stream of it.
    assert refused.sent_after_reply < 32 * 2**20


def test_a_chunked_body_over_the_limit_is_refused_unread(door):
    head = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    refused = keep_sending(door.port, head, b"%x\r\n" % (64 * 2**20))
    assert refused.reply.status == 413
    assert refused.open_after_reply_s < 1.5
    assert refused.sent_after_reply < 32 * 2**20


def test_a_late_body_gets_408_and_the_connection_goes_at_once(door):
    """The body never arrives in full (one byte, then silence): 408 at the deadline, then
    nothing sent after it is read, and the connection is gone within a second."""
    refused = keep_sending(door.port, HEAD + b"Content-Length: 100\r\n\r\n", b"{",
                           before_reply=False)  # fmt: skip
    assert refused.reply.status == 408
    assert refused.reply.json() == {"detail": "the request body did not arrive within 2 s"}
    assert refused.open_after_reply_s < 1.5
    assert refused.sent_after_reply < 32 * 2**20


def test_a_body_not_declared_as_json_gets_415_at_both_doors(door):
    response = httpx.post(f"{door.url}/rag", content=b'{"query": "hi"}',
                          headers={"Content-Type": "text/plain"})  # fmt: skip
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_the_balancer_counts_its_415s(balancer):
    counted = 'balancer_requests_total{status="415"}'
    before = metric(balancer.url, counted)
    assert httpx.post(f"{balancer.url}/rag", content=b"{}").status_code == 415
    assert metric(balancer.url, counted) == before + 1


def test_the_two_step_path_posts_to_exactly_what_assign_returned(balancer):
    backend = httpx.get(f"{balancer.url}/assign").json()["backend"]
    assert backend.startswith("http://127.0.0.1:") and backend.endswith("/rag")
    answer = httpx.post(backend, json=QUERY, timeout=30)
    assert answer.status_code == 200 and answer.json()["result"]


@pytest.mark.parametrize("who", ["server", "balancer"])
def test_idle_connections_cannot_lock_out_real_clients(start_server, tmp_path, who):
    """Four times the cap of idle connections, opened in a loop and reopened when closed,
    while normal requests are sent: the oldest idle connections make room, and every
    request is answered 200."""
    cap = 16
    if who == "server":
        running = start_server(f"server.max_connections={cap}", "server.head_timeout_s=60")
        evicted = "rag_connections_evicted_total"
    else:
        running = start_server("variant=scaling", f"variant.scaling.max_connections={cap}",
                               "server.head_timeout_s=60", f"run_dir={tmp_path / 'run'}",
                               model="simulated")  # fmt: skip
        evicted = 'balancer_connections{outcome="evicted"}'
    stop = threading.Event()
    opened = 0

    def hold_idle() -> None:
        """One new connection every 10 ms at most, while fewer than 4 x cap are open."""
        nonlocal opened
        idle: list[socket.socket] = []
        while not stop.is_set():
            for sock in [s for s in idle if _closed(s)]:
                idle.remove(sock)
                sock.close()
            if len(idle) < 4 * cap:
                idle.append(socket.create_connection(("127.0.0.1", running.port)))
                opened += 1
            stop.wait(0.01)
        for sock in idle:
            sock.close()

    holder = threading.Thread(target=hold_idle)
    holder.start()
    try:
        wait_for(lambda: opened >= 8 * cap, 30, "the cap overrun by idle connections")
        statuses = [httpx.post(f"{running.url}/rag", json=QUERY, timeout=30).status_code
                    for _ in range(20)]  # fmt: skip
    finally:
        stop.set()
        holder.join(30)
    assert statuses == [200] * 20
    assert metric(running.url, evicted) >= 3 * cap


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed it (it never sends an idle connection anything else)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_a_client_leaving_mid_body_is_counted_and_not_logged_as_an_error(door):
    """Counted as 499 (nginx's "client closed request"), never forwarded, no traceback."""
    prefix = "balancer" if "variant=scaling" in door.overrides else "rag"
    counted = f'{prefix}_requests_total{{status="499"}}'
    before = metric(door.url, counted)
    with socket.create_connection(("127.0.0.1", door.port), timeout=30) as sock:
        sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"query": "hov')
    wait_for(lambda: metric(door.url, counted) == before + 1, 30, "the 499 counted")
    assert door.log_path is not None
    assert "Traceback" not in door.log_path.read_text()
