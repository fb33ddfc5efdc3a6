"""The load generator's APIs against real HTTP servers on 127.0.0.1: what each API sends,
how a streamed answer is timed (TTFT from the scheduled send, inter-token latency, time per
output token), where token counts come from, and how a stream that fails is classified."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from loadgen_server import LocalServer, chat_chunks, event_stream, rag_events

from rag.loadgen import LoadConfig, plan, run_load
from rag.loadgen.sse import Event, EventReader

GAP_S = 0.05  # between a test server's events


def config(target: str, **overrides) -> LoadConfig:
    base = {"timing_mode": "ideal", "rps": 20.0, "num_requests": 6, "progress": False}
    return LoadConfig(target=target, **{**base, **overrides})


class Recording(LocalServer):
    """A server that keeps every request body it gets, and answers as `answer` says."""

    def __init__(self, answer, models: list[str] | None = None) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []

        async def behaviour(request: web.Request) -> web.StreamResponse:
            if request.path == "/v1/models":
                if models is None:
                    return web.json_response({"detail": "no such path"}, status=404)
                return web.json_response({"data": [{"id": m} for m in models]})
            self.bodies.append(await request.json())
            self.headers.append(dict(request.headers))
            return await answer(request)

        super().__init__(behaviour)


def rag_stream(tokens: int = 5, usage: bool = True):
    async def answer(request: web.Request) -> web.StreamResponse:
        return await event_stream(request, rag_events(tokens, usage), GAP_S)

    return answer


def test_a_streamed_rag_answer_is_timed_token_by_token():
    with Recording(rag_stream(tokens=5)) as server:
        rows, summary = run_load(config(server.url))
    assert server.hits["/rag"] == 6
    assert all(body == {"query": body["query"], "k": 2, "stream": True} for body in server.bodies)
    for r in rows:
        assert r["error"] is None and r["status"] == 200, r
        # The first token came one gap after the documents, the end five gaps after it.
        assert r["sent_s"] + GAP_S * 0.9 < r["first_token_s"] < r["done_s"] - 4 * GAP_S * 0.9
        assert r["ttft_s"] == pytest.approx(r["first_token_s"] - r["scheduled_s"])
        assert GAP_S * 0.9 < r["itl_mean_s"] <= r["itl_max_s"]
        assert r["tpot_s"] == pytest.approx(r["itl_mean_s"])  # five tokens, five text events
        assert (r["prompt_tokens"], r["output_tokens"]) == (40, 5)
        assert (r["server_ttft_ms"], r["server_batch_size"], r["server_generate_ms"]) == (3, 2, 5)
        assert r["response_bytes"] > 0 and r["loop"] == "open"
    assert summary["ttft_p50_s"] == pytest.approx(np.percentile([r["ttft_s"] for r in rows], 50))
    assert GAP_S * 0.9 < summary["itl_p50_s"] <= summary["itl_max_s"]
    assert summary["output_tokens_total"] == 30 and summary["prompt_tokens_total"] == 240
    assert summary["output_tokens_per_s"] == pytest.approx(30 / summary["duration_s"])
    assert math.isnan(summary["goodput_rps"])  # no objective given


def test_a_streamed_chat_completion_names_its_model_and_counts_usage():
    async def answer(request: web.Request) -> web.StreamResponse:
        return await event_stream(request, chat_chunks(4), GAP_S)

    with Recording(answer, models=["tiny-model", "other"]) as server:
        rows, summary = run_load(
            config(server.url, api="openai-chat", max_tokens=4, ignore_eos=True)
        )
    assert server.hits == {"/v1/models": 1, "/v1/chat/completions": 6}  # asked once, first
    for body, r in zip(server.bodies, rows, strict=True):
        assert body == {
            "model": "tiny-model",
            "messages": [{"role": "user", "content": r["query"]}],
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    for r in rows:
        assert r["error"] is None, r
        # The role chunk carries no text: the first token is the chunk a gap after it.
        assert r["first_token_s"] > r["sent_s"] + GAP_S * 0.9
        assert (r["prompt_tokens"], r["output_tokens"]) == (9, 4) and r["max_tokens"] == 4
    assert summary["api"] == "openai-chat" and summary["output_tokens_total"] == 24


def test_completions_without_usage_count_the_streamed_tokens():
    async def answer(request: web.Request) -> web.StreamResponse:
        chunks = [("", {"choices": [{"text": f"t{i}"}]}) for i in range(3)]
        return await event_stream(request, [*chunks, ("", "[DONE]")])

    with Recording(answer) as server:
        rows, _ = run_load(config(server.url, api="openai-completions", model_name="m"))
    assert server.hits == {"/v1/completions": 6}  # a model named: nothing to ask
    assert server.bodies[0]["prompt"] == rows[0]["query"] and server.bodies[0]["model"] == "m"
    assert "max_tokens" not in server.bodies[0]  # the server's default
    assert all(r["output_tokens"] == 3 and r["prompt_tokens"] is None for r in rows)


def test_without_streaming_only_the_end_is_measured():
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {"choices": [{"message": {"content": "hi"}}],
             "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
        )  # fmt: skip

    with Recording(answer) as server:
        rows, summary = run_load(config(server.url, api="openai-chat", model_name="m",
                                        stream=False))  # fmt: skip
    assert all("stream" not in body and "stream_options" not in body for body in server.bodies)
    for r in rows:
        assert r["error"] is None and r["ttft_s"] is None and r["tpot_s"] is None
        assert (r["prompt_tokens"], r["output_tokens"]) == (7, 2)
    assert math.isnan(summary["ttft_p50_s"]) and summary["output_tokens_total"] == 12
    with pytest.raises(ValueError, match="need streamed answers"):
        plan(config(server.url, stream=False, slo_ttft_s=1.0))


def test_a_server_that_answers_a_stream_request_whole_is_measured_at_the_end():
    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"query": body["query"], "result": "r", "prompt_tokens": 30,
                                  "new_tokens": 8, "batch_size": 1})  # fmt: skip

    with Recording(answer) as server:
        rows, _ = run_load(config(server.url))
    assert server.bodies[0]["stream"] is True
    for r in rows:
        assert r["error"] is None and r["ttft_s"] is None
        assert (r["prompt_tokens"], r["output_tokens"]) == (30, 8)


async def misbehave(request: web.Request) -> web.StreamResponse:
    """Fail in the way the query names, after a first token where it streams."""
    query = (await request.json())["query"]
    token = ("token", {"text": "a", "tokens": 1})
    if query == "error event":
        return await event_stream(request, [token, ("error", {"detail": "replica died"})])
    if query == "no done":
        return await event_stream(request, [token, token])
    if query == "reset":
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'event: token\ndata: {"text": "a"}\n\n')
        await response.write(b'event: token\ndata: {"te')
        assert request.transport is not None
        request.transport.abort()
        return response
    if query == "bad event":
        return await event_stream(request, [("token", "not json")])
    if query == "openai error":
        error = {"message": "max_tokens is too large", "type": "invalid_request_error"}
        return web.json_response({"error": error}, status=400)
    return await event_stream(request, rag_events(2))


OUTCOMES = {
    "fine": (None, None),
    "error event": ("stream_error", "replica died"),
    "no done": ("stream_cut", "the stream ended before its last event"),
    "reset": ("stream_cut", None),
    "bad event": ("bad_body", None),
    "openai error": ("http_4xx", "max_tokens is too large"),
}


def test_a_failed_stream_is_one_classified_failure(tmp_path: Path):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(OUTCOMES))
    with LocalServer(misbehave) as server:
        rows, summary = run_load(config(server.url, num_requests=60, rps=100.0,
                                        queries=str(queries)))  # fmt: skip
    assert server.hits["/rag"] == 60 and [r["request_id"] for r in rows] == list(range(60))
    for r in rows:
        error, detail = OUTCOMES[r["query"]]
        assert r["error"] == error, r
        if detail:
            assert r["error_detail"] == detail
        if r["query"] in ("error event", "no done", "reset"):  # the token before the failure
            assert r["first_token_s"] is not None and r["done_s"] >= r["first_token_s"]
    for error in ("stream_error", "stream_cut", "bad_body", "http_4xx"):
        assert summary[f"failed_{error}"] == sum(r["error"] == error for r in rows)
    assert summary["ok"] == sum(r["query"] == "fine" for r in rows)


def test_the_model_must_be_known():
    with Recording(rag_stream(), models=None) as server, pytest.raises(ValueError) as refused:
        run_load(config(server.url, api="openai-chat"))
    assert "give model_name" in str(refused.value) and server.hits["/v1/models"] == 1
    assert server.hits["/v1/chat/completions"] == 0


def test_an_api_key_in_the_environment_goes_with_openai_requests(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    async def answer(request: web.Request) -> web.StreamResponse:
        return await event_stream(request, chat_chunks(1))

    with Recording(answer, models=["m"]) as server:
        rows, _ = run_load(config(server.url, api="openai-chat", num_requests=2))
    assert all(h["Authorization"] == "Bearer sk-test" for h in server.headers)
    assert all(r["error"] is None for r in rows)


def lengths_asked(server: Recording) -> list[int | None]:
    return [body.get("max_tokens") for body in server.bodies]


def test_output_lengths_fixed_drawn_or_from_a_prompts_file(tmp_path: Path):
    with Recording(rag_stream(tokens=1)) as server:
        fixed, _ = run_load(config(server.url, max_tokens=16))
        assert lengths_asked(server) == [16] * 6 == [r["max_tokens"] for r in fixed]
        server.bodies.clear()
        drawn, _ = run_load(config(server.url, num_requests=40, rps=200.0, max_tokens=8,
                                   max_tokens_high=12, seed=3))  # fmt: skip
        asked = lengths_asked(server)
        assert sorted(asked) == sorted(r["max_tokens"] for r in drawn)
        assert set(asked) == {8, 9, 10, 11, 12}  # uniform over the range, ends included
        server.bodies.clear()
        again, _ = run_load(config(server.url, num_requests=40, rps=200.0, max_tokens=8,
                                   max_tokens_high=12, seed=3))  # fmt: skip
        assert [r["max_tokens"] for r in again] == [r["max_tokens"] for r in drawn]

        prompts = tmp_path / "prompts.jsonl"
        lines = [{"prompt": "long one", "max_tokens": 64}, {"prompt": "default one"}]
        prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
        out = tmp_path / "run" / "requests.csv"
        server.bodies.clear()
        mixed, _ = run_load(config(server.url, num_requests=20, rps=200.0, max_tokens=4,
                                   queries=str(prompts), out=str(out)))  # fmt: skip
        assert {(b["query"], b.get("max_tokens")) for b in server.bodies} == {
            ("long one", 64),
            ("default one", 4),
        }
        server.bodies.clear()
        replay, _ = run_load(config(server.url, timing_mode="trace", num_requests=0,
                                    trace=str(out.parent / "schedule.csv")))  # fmt: skip
    assert [(r["query"], r["max_tokens"]) for r in replay] == [
        (r["query"], r["max_tokens"]) for r in mixed
    ]


@pytest.mark.parametrize(
    ("line", "complaint"),
    [("not json", "not JSON"), ('{"text": "x"}', 'string "prompt"'),
     ('{"prompt": "x", "max_tokens": -1}', "max_tokens must be")],
)  # fmt: skip
def test_a_bad_prompts_file_is_refused_before_anything_is_sent(tmp_path, line, complaint):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(f'{{"prompt": "fine"}}\n{line}\n')
    with pytest.raises(ValueError, match=f"prompts.jsonl:2: .*{complaint}"):
        plan(config("http://127.0.0.1:9", queries=str(prompts)))


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [({"api": "grpc"}, "api must be one of"), ({"ignore_eos": True}, "give max_tokens"),
     ({"max_tokens": 8, "max_tokens_high": 4}, "max_tokens_high"),
     ({"slo_ttft_s": -1.0}, "objective")],
)  # fmt: skip
def test_bad_api_settings_are_refused(overrides, complaint):
    with pytest.raises(ValueError, match=complaint):
        plan(config("http://127.0.0.1:9", **overrides))


def test_the_closed_loop_times_tokens_from_each_send(tmp_path: Path):
    async def answer(request: web.Request) -> web.StreamResponse:
        return await event_stream(request, chat_chunks(3), GAP_S)

    out = tmp_path / "requests.csv"
    with Recording(answer, models=["m"]) as server:
        rows, summary = run_load(
            config(server.url, api="openai-chat", timing_mode="concurrency", concurrency=2,
                   num_requests=6, out=str(out))
        )  # fmt: skip
    assert summary["loop"] == "closed" and summary["sent"] == summary["ok"] == 6
    for r in rows:
        assert r["ttft_s"] == pytest.approx(r["first_token_s"] - r["scheduled_s"])
        assert r["ttft_s"] < r["latency_s"] and r["output_tokens"] == 3
    with open(out) as f:
        written = list(csv.DictReader(f))
    assert {w["loop"] for w in written} == {"closed"}
    assert "token_times" not in written[0] and written[0]["ttft_s"]


def events(reader: EventReader, stream: bytes, cut: int) -> list[Event]:
    return reader.feed(stream[:cut]) + reader.feed(stream[cut:])


def test_the_event_reader_is_whole_wherever_the_chunks_split():
    stream = (
        b': a comment\r\nevent: token\r\ndata: {"text": "\xc3\xa9"}\r\n\r\n'
        b"data: line one\ndata: line two\nid: 7\n\n"
        b"event: nothing\n\n"
        b"data: [DONE]\n\n"
        b"data: cut off"
    )
    expected = [
        Event("token", '{"text": "é"}'),
        Event("message", "line one\nline two"),
        Event("message", "[DONE]"),
    ]
    for cut in range(len(stream) + 1):
        assert events(EventReader(), stream, cut) == expected, cut
    one_at_a_time = EventReader()
    assert [e for i in range(len(stream)) for e in one_at_a_time.feed(stream[i : i + 1])] == (
        expected
    )


def test_a_slow_stream_is_a_timeout_with_its_first_tokens_kept():
    async def answer(request: web.Request) -> web.StreamResponse:
        return await event_stream(request, rag_events(3), gap_s=1.0)

    with Recording(answer) as server:
        rows, _ = run_load(config(server.url, num_requests=2, timeout=1.5))
    for r in rows:
        assert r["error"] == "timeout" and r["first_token_s"] is not None
