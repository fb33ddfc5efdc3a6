"""Streamed `/rag` answers on every one-server variant, started for real on loopback (tiny
random models): the documents first, the text step by step, then the whole answer; each
request's own token limit inside a shared batch; a client that leaves mid-stream frees its
engine slot."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cluster_helpers import wait_for
from server_metrics import metric
from sse_helpers import events, stream_rag

HOVER = "Which animals can hover in the air?"
VARIANTS = [
    pytest.param(("variant=base",), id="base"),
    pytest.param(("variant=batched",), id="batched"),
    pytest.param(("variant=continuous",), id="continuous"),
    pytest.param(("variant=batched", "model.engine=false"), id="batched-transformers"),
]


def check_stream(streamed: list[tuple[str, dict]], query: str, k: int) -> dict:
    """The stream's order and content are the contract's; its `done` answer."""
    names = [name for name, _ in streamed]
    assert names[0] == "docs" and names[-1] == "done"
    assert set(names[1:-1]) == {"token"}
    docs, done = streamed[0][1], streamed[-1][1]
    assert docs["query"] == query and len(docs["docs"]) == k
    assert docs["docs"] == done["docs"]
    tokens = [data for name, data in streamed if name == "token"]
    assert "".join(t["text"] for t in tokens) == done["result"]
    counts = [t["tokens"] for t in tokens]
    assert counts == sorted(set(counts)) and counts[-1] <= done["usage"]["completion_tokens"]
    return done


@pytest.mark.parametrize("overrides", VARIANTS)
def test_a_streamed_answer_is_its_documents_then_its_tokens_then_the_whole(start_server, overrides):
    server = start_server(*overrides, "server.max_tokens_limit=24")
    body = {"query": HOVER, "k": 2, "max_tokens": 16, "ignore_eos": True}
    done = check_stream(stream_rag(server.url, body), HOVER, 2)
    assert done["usage"]["completion_tokens"] == 16
    assert done["finish_reason"] == "length"
    assert done["ttft_ms"] > 0 and done["tpot_ms"] > 0
    assert done["ttft_ms"] <= done["timings"]["total_ms"]
    whole = httpx.post(f"{server.url}/rag", json=body, timeout=60).json()
    assert whole["result"] == done["result"]  # greedy: the same text streamed or not
    assert whole["usage"] == done["usage"]
    assert set(whole) == set(done)
    assert metric(server.url, "rag_ttft_seconds_count") == 2
    assert metric(server.url, "rag_tpot_seconds_count") == 2


def test_streams_of_one_batch_each_get_their_own_tokens(start_server):
    """A batch of streamed requests with different limits: each stream carries its own
    answer, to its own limit, and its tokens leave step by step (one event per step)."""
    server = start_server("variant=batched", "variant.max_wait_ms=2000",
                          "variant.max_batch_size=3", "server.max_tokens_limit=24")  # fmt: skip
    limits = [3, 9, 20]
    bodies = [{"query": f"{HOVER} ({n})", "k": 1, "max_tokens": n, "ignore_eos": True}
              for n in limits]  # fmt: skip
    with ThreadPoolExecutor(len(bodies)) as pool:
        streams = list(pool.map(lambda b: stream_rag(server.url, b), bodies))
    for body, streamed, limit in zip(bodies, streams, limits, strict=True):
        done = check_stream(streamed, body["query"], 1)
        assert done["batch_size"] == 3
        assert done["usage"]["completion_tokens"] == limit
        assert len(streamed) - 2 >= limit // 2  # text left in many steps, not at the end


@pytest.mark.parametrize("overrides", VARIANTS[1:])
def test_one_requests_max_tokens_never_changes_anothers(start_server, overrides):
    """Two requests answered together, one short and one long: each gets its own limit,
    and the short one's text is the start of the long one's."""
    server = start_server(*overrides, "variant.max_wait_ms=2000", "variant.max_batch_size=2",
                          "server.max_tokens_limit=24")  # fmt: skip
    short = {"query": HOVER, "k": 1, "max_tokens": 2, "ignore_eos": True}
    long = {"query": HOVER, "k": 1, "max_tokens": 20, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(
            lambda b: httpx.post(f"{server.url}/rag", json=b, timeout=60).json(), [short, long]
        ))  # fmt: skip
    assert [a["usage"]["completion_tokens"] for a in answers] == [2, 20]
    assert [a["finish_reason"] for a in answers] == ["length", "length"]
    if "variant=continuous" not in overrides:  # one batch, the same prompt in both rows
        assert [a["batch_size"] for a in answers] == [2, 2]
        assert answers[1]["result"].startswith(answers[0]["result"])


def test_without_stream_every_answer_carries_usage_ttft_and_tpot(shared_server):
    server = shared_server(variant="base")
    answer = httpx.post(f"{server.url}/rag", json={"query": HOVER}, timeout=60).json()
    usage = answer["usage"]
    assert usage["completion_tokens"] == answer["new_tokens"] > 1
    assert usage["prompt_tokens"] == answer["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < answer["ttft_ms"] <= answer["timings"]["total_ms"]
    assert answer["tpot_ms"] > 0


@pytest.mark.parametrize("variant", ["batched", "continuous"])
def test_a_client_that_leaves_mid_stream_frees_its_engine_slot(start_server, variant):
    """The client reads the documents and a first token, then closes the connection; the
    generation stops (its engine slot freed, long before its token limit) and /metrics
    counts it cancelled."""
    server = start_server(f"variant={variant}", "server.max_tokens_limit=4000")
    body = {"query": HOVER, "k": 1, "stream": True, "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/rag", json=body, timeout=60) as response:
        names = []
        for name, _ in events(response):
            names.append(name)
            if name == "token":
                break
    assert names == ["docs", "token"]
    wait_for(lambda: metric(server.url, "rag_cancelled_total") == 1, 30, "counted cancelled")
    engine = lambda: httpx.get(f"{server.url}/stats").json()["engine"]  # noqa: E731
    wait_for(lambda: engine()["active"] == 0 and engine()["waiting"] == 0, 30, "slot freed")
    # The server goes on answering.
    answer = httpx.post(f"{server.url}/rag", json={"query": HOVER, "max_tokens": 3}, timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 3


def test_a_refusal_before_the_first_byte_keeps_its_status(default_server):
    """A streamed request refused at the door gets the status and JSON a non-streamed one
    gets, not a stream."""
    server = default_server
    bad = httpx.post(f"{server.url}/rag", json={"query": HOVER, "stream": True, "k": 0})
    assert bad.status_code == 422 and "k" in bad.json()["detail"]
    too_many = {"query": HOVER, "stream": True, "max_tokens": 9}
    refused = httpx.post(f"{server.url}/rag", json=too_many)
    assert refused.status_code == 422 and "max_tokens" in refused.json()["detail"]
    streamed_flag = httpx.post(f"{server.url}/rag", json={"query": HOVER, "stream": "yes"})
    assert streamed_flag.status_code == 422


def test_an_error_after_the_first_byte_ends_the_stream_with_an_error_event(start_server):
    """A streamed answer whose deadline passes mid-generation: the client has its documents
    already, and the stream ends with `event: error` and the reason."""
    server = start_server("variant=base", "variant.request_timeout_s=1",
                          "model.simulated.generate_fixed_ms=3000", model="simulated")  # fmt: skip
    streamed = stream_rag(server.url, {"query": HOVER, "k": 1})
    names = [name for name, _ in streamed]
    assert names[0] == "docs" and names[-1] == "error"
    assert "deadline" in streamed[-1][1]["detail"]
