"""The service's admin call, on a real server: only the balancer's token may set torch's
threads, bad bodies get a clear 4xx, and the count is set where the batches run."""

from __future__ import annotations

import httpx
import pytest

from rag.cluster.admin import THREADS_PATH, TOKEN_ENV, TOKEN_HEADER
from rag.cluster.local import machine_cores
from rag.cluster.process import ServerProcess

TOKEN = "s3cret"
QUERY = {"query": "Which animals can hover in the air?", "k": 1}


@pytest.fixture(scope="module")
def server(cache_overrides, tmp_path_factory):
    log = tmp_path_factory.mktemp("admin") / "server.log"
    with ServerProcess(["model=tiny", *cache_overrides], env={TOKEN_ENV: TOKEN},
                       log_path=log) as running:  # fmt: skip
        yield running


def threads(url: str) -> int:
    return httpx.get(f"{url}/stats").json()["runtime"]["torch_threads"]


def set_threads(url: str, body: object, token: str | None = TOKEN) -> httpx.Response:
    headers = {TOKEN_HEADER: token} if token is not None else {}
    return httpx.post(f"{url}{THREADS_PATH}", json=body, headers=headers)


def test_the_balancers_token_sets_the_threads_the_batches_run_with(server):
    for wanted in (machine_cores(), 1):  # model=tiny starts with one
        answer = set_threads(server.url, {"threads": wanted})
        assert answer.status_code == 200 and answer.json() == {"threads": wanted}
        assert threads(server.url) == wanted  # read on the compute thread
        assert httpx.post(f"{server.url}/rag", json=QUERY, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("token", "body", "status"),
    [
        (None, {"threads": 1}, 401),
        ("wrong", {"threads": 1}, 403),
        (TOKEN, {"threads": 0}, 422),
        (TOKEN, {"threads": machine_cores() + 1}, 422),
        (TOKEN, {"threads": True}, 422),
        (TOKEN, {"threads": "2"}, 422),
        (TOKEN, [1], 422),
    ],
)
def test_anything_else_is_refused_with_a_clear_4xx(server, token, body, status):
    before = threads(server.url)
    answer = set_threads(server.url, body, token)
    assert answer.status_code == status and answer.json()["detail"]
    assert threads(server.url) == before


def test_a_body_not_sent_as_json_is_refused(server):
    answer = httpx.post(f"{server.url}{THREADS_PATH}", content=b"threads=2",
                        headers={TOKEN_HEADER: TOKEN})  # fmt: skip
    assert answer.status_code == 415 and "application/json" in answer.json()["detail"]


def test_a_server_started_without_a_token_takes_no_admin_call(start_server):
    url = start_server().url
    assert set_threads(url, {"threads": 1}, token="").status_code == 401
    assert set_threads(url, {"threads": 1}, token="anything").status_code == 403


def test_the_simulated_model_has_no_threads_to_set(cache_overrides, tmp_path):
    with ServerProcess(["model=simulated", *cache_overrides], env={TOKEN_ENV: TOKEN}) as sim:
        answer = set_threads(sim.url, {"threads": 1})
        assert answer.status_code == 200 and answer.json() == {"threads": None}
