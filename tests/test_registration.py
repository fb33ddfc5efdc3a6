"""Who may register or unregister a replica with the balancer, and what /replicas tells a
stranger: the token always (loopback is no trust boundary on a shared machine), 401 without
it and 403 with a wrong one, counted; a URL of scheme, host and port only, on the host the
launcher expects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster_helpers import replicas
from server_metrics import metric

from rag.cluster.balancer import Balancer, BalancerSettings, replica_address
from rag.cluster.local import LocalLauncher
from rag.cluster.policies import make_policy
from rag.cluster.pool import Replica, ReplicaPool, State
from rag.cluster.process import ServerProcess

TOKEN = "s3cret"
GOOD = {"X-Ragbench-Token": TOKEN}


@pytest.fixture(scope="module")
def balancer(cache_overrides, tmp_path_factory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("registration")
    with ServerProcess(
        ["variant=scaling", "model=simulated", *cache_overrides, f"run_dir={folder / 'run'}"],
        env={"RAGBENCH_BALANCER_TOKEN": TOKEN},
        log_path=folder / "balancer.log",
    ) as running:
        yield running


def refused(url: str, status: int) -> float:
    return metric(url, f'balancer_registrations_refused_total{{status="{status}"}}')


@pytest.mark.parametrize("path", ["/register", "/unregister"])
def test_without_the_token_even_on_loopback_gets_401_counted(balancer, path):
    before = refused(balancer.url, 401)
    response = httpx.post(
        f"{balancer.url}{path}", json={"replica": "r0", "url": "http://127.0.0.1:1"}
    )
    assert response.status_code == 401
    assert "token" in response.json()["detail"]
    assert refused(balancer.url, 401) == before + 1
    assert replicas(balancer.url)[0]["state"] == "ready"  # untouched


@pytest.mark.parametrize("path", ["/register", "/unregister"])
def test_a_wrong_token_gets_403_counted(balancer, path):
    before = refused(balancer.url, 403)
    response = httpx.post(f"{balancer.url}{path}", json={"replica": "r0", "url": "http://127.0.0.1:1"},
                          headers={"X-Ragbench-Token": "guess"})  # fmt: skip
    assert response.status_code == 403 and response.json()["detail"]
    assert refused(balancer.url, 403) == before + 1
    assert replicas(balancer.url)[0]["state"] == "ready"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/ssrf-path?x=",
        "http://127.0.0.1:9?x=1",
        "http://user:pw@127.0.0.1:9",
        "http://127.0.0.1:9#f",
        "https://127.0.0.1:9",
        "http://127.0.0.1",
        "http://127.0.0.2:9",  # not the host the local launcher runs replicas on
        "http://127.0.0.1:99999",
        42,
    ],
)
def test_a_url_that_is_not_the_replicas_host_and_port_is_refused(balancer, url):
    before = replicas(balancer.url)[0]
    response = httpx.post(f"{balancer.url}/register", json={"replica": "r0", "url": url},
                          headers=GOOD)  # fmt: skip
    assert response.status_code == 422 and response.json()["detail"]
    assert replicas(balancer.url)[0]["url"] == before["url"]


def test_a_replica_the_balancer_did_not_launch_cannot_register(balancer):
    unknown = {"replica": "r9", "url": "http://127.0.0.1:9"}
    for path in ("/register", "/unregister"):
        response = httpx.post(f"{balancer.url}{path}", json=unknown, headers=GOOD)
        assert response.status_code == 422 and response.json()["detail"]
    assert [r["id"] for r in replicas(balancer.url)] == ["r0"]


def test_a_ready_replica_cannot_be_registered_again(balancer):
    again = {"replica": "r0", "url": "http://127.0.0.1:9"}
    response = httpx.post(f"{balancer.url}/register", json=again, headers=GOOD)
    assert response.status_code == 409


def test_registered_urls_are_reduced_to_scheme_host_and_port():
    assert replica_address("http://127.0.0.1:8000", "127.0.0.1") == "http://127.0.0.1:8000"
    assert replica_address("http://node7:8000/", None) == "http://node7:8000"
    assert replica_address("http://[::1]:8000", "::1") == "http://[::1]:8000"
    with pytest.raises(ValueError, match=r"must register from 127\.0\.0\.1"):
        replica_address("http://node7:8000", "127.0.0.1")


def test_replicas_shows_a_stranger_no_log_pid_or_path(tmp_path: Path):
    """The real app in process, asked from an address off loopback."""
    pool = ReplicaPool(LocalLauncher(lambda r: [], tmp_path, None, []), 1.0, 10.0)
    log_tail = f"process exited with code 1: {tmp_path}/replicas/r0.log says ..."
    pool.replicas["r0"] = Replica("r0", "http://127.0.0.1:9", State.DEAD, 4242, reason=log_tail)
    settings = BalancerSettings(make_policy("round_robin"), 1000, 1.0, 1.0, 1.0, 10, TOKEN, {})
    app = Balancer(pool, settings).app()

    async def ask(client_host: str, headers: dict[str, str]) -> dict:
        transport = httpx.ASGITransport(app, client=(client_host, 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            return (await client.get("/replicas", headers=headers)).json()[0]

    public = asyncio.run(ask("192.0.2.7", {}))
    with_token = asyncio.run(ask("192.0.2.7", GOOD))
    private = asyncio.run(ask("127.0.0.1", {}))
    assert public["state"] == "dead" and public["id"] == "r0"
    assert not {"pid", "reason", "job_id"} & set(public)
    assert str(tmp_path) not in str(public) and "4242" not in str(public)
    assert with_token["pid"] == private["pid"] == 4242
    assert str(tmp_path) in private["reason"]
