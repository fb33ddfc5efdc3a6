"""Streamed answers and the OpenAI-compatible routes through the balancer, started for real
(balancer, autoscaler and simulated replicas on loopback): the stream passes through as it
is made, a client that leaves cancels the generation at the replica, and a replica killed
mid-answer ends the stream with an error event instead of a hang."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from cluster_helpers import replicas, wait_for
from server_metrics import metric
from sse_helpers import events, stream_rag

from rag.cluster.process import ServerProcess

QUERY = {"query": "Which animals can hover in the air?", "k": 1}


@pytest.fixture
def start_scaling(start_server, tmp_path) -> Callable[..., ServerProcess]:
    def start(*overrides: str) -> ServerProcess:
        server = start_server(
            "variant=scaling", f"run_dir={tmp_path / 'run'}", "variant.scaling.max_replicas=1",
            *overrides, model="simulated",
        )  # fmt: skip
        wait_for(lambda: [r["state"] for r in replicas(server.url)] == ["ready"], 60, "ready")
        return server

    return start


def test_streams_and_the_openai_client_pass_through_the_balancer(start_scaling):
    server = start_scaling()
    streamed = stream_rag(server.url, QUERY)
    names = [name for name, _ in streamed]
    assert names[0] == "docs" and names[-1] == "done" and "token" in names
    done = streamed[-1][1]
    assert "".join(d["text"] for n, d in streamed if n == "token") == done["result"]
    assert done["replica"] and done["ttft_ms"] > 0

    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list().data] == ["simulated"]
    user = [{"role": "user", "content": QUERY["query"]}]
    whole = api.chat.completions.create(model="simulated", messages=user, max_tokens=4)
    assert whole.usage.completion_tokens == 4
    usage = {"include_usage": True}
    chunks = list(api.chat.completions.create(model="simulated", messages=user, max_tokens=4,
                                              stream=True, stream_options=usage))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 4
    text = api.completions.create(model="simulated", prompt=QUERY["query"], max_tokens=3)
    assert text.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="simulated", prompt="", max_tokens=3)
    chats = 'balancer_v1_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert metric(server.url, chats) == 2


def test_tokens_reach_the_client_while_the_replica_still_generates(start_scaling):
    """The first token arrives through the balancer long before the answer ends: the
    replica generates for seconds, and the client has its first token while the replica
    still reports the request running."""
    server = start_scaling("model.simulated.generate_fixed_ms=6000")
    replica = replicas(server.url)[0]["url"]
    with httpx.stream("POST", f"{server.url}/rag", json={**QUERY, "stream": True},
                      timeout=60) as response:  # fmt: skip
        names = []
        for name, _ in events(response):
            names.append(name)
            if names == ["docs", "token"]:  # the first token: seconds of generating remain
                assert httpx.get(f"{replica}/stats").json()["running"] == 1
    assert names[:2] == ["docs", "token"] and names[-1] == "done"


def test_a_client_that_leaves_mid_stream_cancels_the_generation_at_the_replica(start_scaling):
    server = start_scaling("model.simulated.generate_fixed_ms=6000")
    replica = replicas(server.url)[0]["url"]
    with httpx.stream("POST", f"{server.url}/rag", json={**QUERY, "stream": True},
                      timeout=60) as response:  # fmt: skip
        for name, _ in events(response):
            if name == "token":
                break
    wait_for(lambda: metric(replica, "rag_cancelled_total") == 1, 30, "cancelled at the replica")
    wait_for(lambda: httpx.get(f"{replica}/stats").json()["running"] == 0, 30, "nothing runs")


@pytest.mark.parametrize("path", ["/rag", "/v1/completions"])
def test_a_replica_killed_mid_answer_ends_the_stream_with_an_error_event(start_scaling, path):
    server = start_scaling("model.simulated.generate_fixed_ms=6000")
    pid = replicas(server.url)[0]["pid"]
    body = (
        {**QUERY, "stream": True} if path == "/rag" else {"prompt": QUERY["query"], "stream": True}
    )
    started = time.monotonic()
    received = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200
        for name, data in events(response):
            received.append((name, data))
            if len(received) == 2:  # the stream is under way: kill its replica
                os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - started < 30  # ended, not hung
    if path == "/rag":
        name, data = received[-1]
        assert name == "error" and "failed mid-answer" in data["detail"]
    else:
        assert received[-1][1] == "[DONE]"
        error = received[-2][1]["error"]
        assert error["type"] == "server_error" and "failed mid-answer" in error["message"]
    assert metric(server.url, "balancer_broken_streams_total") == 1
