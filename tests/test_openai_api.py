"""The OpenAI-compatible routes, measured with the official `openai` client against real
servers on loopback (tiny random models): chat and text completions, streamed and not, on
every one-server variant; usage counted right; per-request settings; and malformed
requests refused with a 4xx in OpenAI's error format, never a 5xx."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_metrics import metric

HOVER = "Which animals can hover in the air?"
# The tests below ask for the base and batched servers again: those come last, so they
# are still running (`shared_server` keeps the latest few).
VARIANTS = [
    pytest.param("base", ("model.engine=false",), id="base-transformers"),
    pytest.param("continuous", (), id="continuous"),
    pytest.param("batched", (), id="batched"),
    pytest.param("base", (), id="base"),
]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def check_completions(api: openai.OpenAI, model: str) -> None:
    """Chat and text completions, whole and streamed, with usage; a streamed answer's
    pieces add up to the same text as the whole one (greedy decoding)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HOVER}]
    extra = {"ignore_eos": True}
    chat = api.chat.completions.create(
        model=model, messages=messages, max_tokens=6, extra_body=extra
    )
    assert chat.object == "chat.completion" and chat.model == model
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 6

    chunks = list(api.chat.completions.create(
        model=model, messages=messages, max_tokens=6, extra_body=extra, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    whole = api.completions.create(model=model, prompt=HOVER, max_tokens=5, extra_body=extra)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 5
    pieces = list(api.completions.create(model=model, prompt=HOVER, max_tokens=5,
                                         extra_body=extra, stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    assert all(p.usage is None for p in pieces)  # no usage chunk unless asked


@pytest.mark.parametrize(("variant", "overrides"), VARIANTS)
def test_the_openai_client_gets_completions_from_every_variant(shared_server, variant, overrides):
    server = shared_server(*overrides, variant=variant)
    chats = 'rag_v1_requests_total{endpoint="/v1/chat/completions",status="200"}'
    ttfts = "rag_ttft_seconds_count"
    before = {sample: metric(server.url, sample) for sample in (chats, ttfts)}
    api = client(server.url)
    models = api.models.list().data
    assert [m.id for m in models] == ["tiny"]
    check_completions(api, "tiny")
    assert metric(server.url, chats) == before[chats] + 2
    assert metric(server.url, ttfts) == before[ttfts] + 4


def test_a_request_may_sample_with_its_own_seed(shared_server):
    """temperature and seed per request: the same seed the same text, alone or beside
    another request; a greedy request beside it unchanged."""
    server = shared_server(variant="base")
    api = client(server.url)

    def ask(**settings) -> str:
        answer = api.completions.create(model="tiny", prompt=HOVER, max_tokens=8,
                                        extra_body={"ignore_eos": True}, **settings)  # fmt: skip
        return answer.choices[0].text

    greedy = ask()
    assert ask(temperature=0) == greedy
    seeded = ask(temperature=1.5, seed=7)
    assert ask(temperature=1.5, seed=7) == seeded
    assert {ask(temperature=1.5, seed=s) for s in range(4)} != {seeded}


CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    pytest.param(CHAT, b"{not json", 400, None, id="malformed-json"),
    pytest.param(CHAT, [1, 2], 400, "body", id="body-a-list"),
    pytest.param(CHAT, {}, 400, "messages", id="no-messages"),
    pytest.param(CHAT, {"messages": []}, 400, "messages", id="empty-messages"),
    pytest.param(CHAT, {"messages": "hi"}, 400, "messages", id="messages-a-string"),
    pytest.param(
        CHAT,
        {"messages": [{"role": "system", "content": "x"}]},
        400,
        "messages",
        id="no-user-message",
    ),
    pytest.param(
        CHAT,
        {"messages": [{"role": "king", "content": "x"}]},
        400,
        "messages[0].role",
        id="unknown-role",
    ),
    pytest.param(
        CHAT,
        {"messages": [{"role": "user", "content": ""}]},
        400,
        "messages[0].content",
        id="blank-content",
    ),
    pytest.param(
        CHAT,
        {"messages": [{"role": "user", "content": 7}]},
        400,
        "messages[0].content",
        id="content-a-number",
    ),
    pytest.param(
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0].type",
        id="image-part",
    ),
    pytest.param(CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", id="max-tokens-0"),
    pytest.param(
        CHAT, {"messages": USER, "max_tokens": 9}, 400, "max_tokens", id="max-tokens-over-limit"
    ),
    pytest.param(
        CHAT, {"messages": USER, "max_tokens": "5"}, 400, "max_tokens", id="max-tokens-a-string"
    ),
    pytest.param(
        CHAT, {"messages": USER, "temperature": 3}, 400, "temperature", id="temperature-too-high"
    ),
    pytest.param(CHAT, {"messages": USER, "top_p": 0}, 400, "top_p", id="top-p-zero"),
    pytest.param(CHAT, {"messages": USER, "seed": 2**64}, 400, "seed", id="seed-too-large"),
    pytest.param(CHAT, {"messages": USER, "n": 2}, 400, "n", id="n-2"),
    pytest.param(CHAT, {"messages": USER, "stop": ["x"]}, 400, "stop", id="stop"),
    pytest.param(CHAT, {"messages": USER, "stream": 1}, 400, "stream", id="stream-a-number"),
    pytest.param(
        CHAT,
        {"messages": USER, "stream_options": []},
        400,
        "stream_options",
        id="stream-options-a-list",
    ),
    pytest.param(CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model", id="unknown-model"),
    pytest.param(TEXT, {}, 400, "prompt", id="no-prompt"),
    pytest.param(TEXT, {"prompt": ["a", "b"]}, 400, "prompt", id="prompt-a-list"),
    pytest.param(TEXT, {"prompt": "x" * 2001}, 400, "prompt", id="prompt-too-long"),
    pytest.param(TEXT, {"prompt": "bell \x07"}, 400, "prompt", id="prompt-control-char"),
    pytest.param(TEXT, {"prompt": "hi", "k": 0}, 400, "k", id="k-zero"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_malformed_requests_get_a_4xx_in_openais_format(default_server, path, body, status, param):
    url = f"{default_server.url}{path}"
    if isinstance(body, bytes):
        answer = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        answer = httpx.post(url, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    fine = httpx.post(f"{default_server.url}{TEXT}", json={"prompt": "hi", "max_tokens": 2})
    assert fine.status_code == 200  # and the server goes on answering


def test_errors_outside_the_routes_are_in_openais_format_too(default_server):
    url = default_server.url
    not_json = httpx.post(f"{url}{CHAT}", content=b"{}", headers={"Content-Type": "text/plain"})
    assert not_json.status_code == 415 and not_json.json()["error"]["code"]
    unknown = httpx.get(f"{url}/v1/embeddings")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"]
    wrong_method = httpx.get(f"{url}{CHAT}")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    huge = httpx.post(f"{url}{CHAT}", json={"messages": [{"role": "user", "content": "x" * 30000}]})
    assert huge.status_code == 413 and "error" in huge.json()


def test_the_openai_client_reads_errors_as_its_own_exceptions(default_server):
    api = client(default_server.url)
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model="tiny", messages=USER, max_tokens=100)
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-4", messages=USER)
