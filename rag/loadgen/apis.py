"""The APIs the load generator speaks: for each, the request it sends and how it reads the
answer, streamed (Server-Sent Events) or whole.

One class per API, as vLLM's benchmark has one request function per backend: ragbench's
`POST /rag`, and OpenAI's chat and text completions, which vLLM, llama.cpp's server, SGLang,
TGI and ragbench's `/v1` all answer.  The sender around them sends, times and classifies
every request the same way; an API only says what a body looks like and what each event
means, into a `Reply`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rag.loadgen.sse import Event

# Fields of a /rag answer (or of its stream's `done` event) kept as `server_*` columns,
# besides each of its `timings`.
RAG_SERVER_FIELDS = ("batch_size", "replica", "ttft_ms", "tpot_ms")


class Failed(Exception):
    """An answer that arrived but is not a success, already classified: `error` is its
    class (a column of requests.csv, counted in the summary)."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail[:200]


@dataclass
class Reply:
    """What one answer said, filled in as it arrives."""

    token_times: list[float] = field(default_factory=list)  # arrival of each text event
    counted_tokens: int | None = None  # the server's own running count, when it streams one
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from `usage`
    server: dict[str, Any] = field(default_factory=dict)  # server_* columns
    ended: bool = False  # the stream's last event arrived

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.completion_tokens = usage.get("completion_tokens", self.completion_tokens)

    @property
    def output_tokens(self) -> int | None:
        """From `usage`, else the server's running count, else the text events counted
        (one token each, as a server that streams token by token sends them)."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        if self.counted_tokens is not None:
            return self.counted_tokens
        return len(self.token_times) if self.token_times else None


def _json(data: str | bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise Failed("bad_body", f"{what} is not JSON: {data[:100]!r}") from None


def error_detail(data: Any) -> str | None:
    """The message of an error body: ragbench's `{"detail": ...}` or OpenAI's
    `{"error": {"message": ...}}` (or a bare string there)."""
    if not isinstance(data, dict):
        return None
    if "detail" in data:
        return str(data["detail"])
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return None if error is None else str(error)


@dataclass(frozen=True)
class Options:
    """What every request of a run asks besides its prompt and output length."""

    stream: bool = True
    k: int = 2  # /rag: documents to retrieve
    model: str = ""  # OpenAI: the served model's name
    ignore_eos: bool = False


class Api:
    """One API: its path, its request body, and how to read its answer."""

    name: ClassVar[str]
    path: ClassVar[str]
    needs_model: ClassVar[bool] = False

    def __init__(self, options: Options) -> None:
        self.options = options

    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, payload: bytes, reply: Reply) -> None:
        """Read a 2xx answer that is not a stream."""
        raise NotImplementedError

    def event(self, event: Event, now: float, reply: Reply) -> None:
        """Read one event of a streamed answer that arrived at `now`."""
        raise NotImplementedError

    def _common(self, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if max_tokens > 0:
            body["max_tokens"] = max_tokens
        if self.options.ignore_eos:
            body["ignore_eos"] = True
        return body


class RagApi(Api):
    """`POST /rag`.  Streamed, it answers `docs`, then a `token` event per step with new
    text (`text`, and `tokens` so far), then `done` with what the whole answer carries;
    `error` ends a stream that failed after its first byte."""

    name = "rag"
    path = "/rag"

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        body = {"query": prompt, "k": self.options.k, **self._common(max_tokens)}
        if self.options.stream:
            body["stream"] = True
        return body

    def _answer(self, data: Any, reply: Reply) -> None:
        if not isinstance(data, dict) or "result" not in data:
            raise Failed("bad_body", f"no JSON object with 'result': {str(data)[:100]!r}")
        timings = data.get("timings")
        if isinstance(timings, dict):
            reply.server.update({f"server_{k}": v for k, v in timings.items()})
        reply.server.update({f"server_{k}": data[k] for k in RAG_SERVER_FIELDS if k in data})
        if "usage" in data:
            reply.usage(data["usage"])
        else:  # the answer's own counts, before `usage`
            reply.usage({"prompt_tokens": data.get("prompt_tokens"),
                         "completion_tokens": data.get("new_tokens")})  # fmt: skip

    def whole(self, payload: bytes, reply: Reply) -> None:
        self._answer(_json(payload, "the answer"), reply)

    def event(self, event: Event, now: float, reply: Reply) -> None:
        if event.name == "token":
            data = _json(event.data, "a token event")
            if isinstance(data, dict) and data.get("text"):
                reply.token_times.append(now)
                reply.counted_tokens = data.get("tokens", reply.counted_tokens)
        elif event.name == "done":
            self._answer(_json(event.data, "the done event"), reply)
            reply.ended = True
        elif event.name == "error":
            detail = error_detail(_json(event.data, "the error event"))
            raise Failed("stream_error", detail or event.data)


class OpenAIApi(Api):
    """OpenAI's completions: a stream of `data:` chunks, usage in the last one when asked
    for (`stream_options.include_usage`), then `data: [DONE]`."""

    needs_model = True

    def headers(self) -> dict[str, str]:
        """With `OPENAI_API_KEY` set, as a server started with an API key wants it."""
        key = os.environ.get("OPENAI_API_KEY")
        return {**super().headers(), **({"Authorization": f"Bearer {key}"} if key else {})}

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        raise NotImplementedError

    def text(self, choice: dict[str, Any]) -> Any:
        """The new text of a streamed chunk's choice."""
        raise NotImplementedError

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        body = {"model": self.options.model, **self.prompt_fields(prompt)}
        body.update(self._common(max_tokens))
        if self.options.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def whole(self, payload: bytes, reply: Reply) -> None:
        data = _json(payload, "the answer")
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise Failed("bad_body", f"no JSON object with 'choices': {payload[:100]!r}")
        reply.usage(data.get("usage"))

    def event(self, event: Event, now: float, reply: Reply) -> None:
        if event.data == "[DONE]":
            reply.ended = True
            return
        data = _json(event.data, "a chunk")
        if not isinstance(data, dict):
            raise Failed("bad_body", f"a chunk is not a JSON object: {event.data[:100]!r}")
        if event.name == "error" or "error" in data:
            raise Failed("stream_error", error_detail(data) or event.data)
        choices = data.get("choices") or []
        if choices and isinstance(choices[0], dict) and self.text(choices[0]):
            reply.token_times.append(now)
        reply.usage(data.get("usage"))


class ChatApi(OpenAIApi):
    """`POST /v1/chat/completions`: the prompt is the one user message."""

    name = "openai-chat"
    path = "/v1/chat/completions"

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": prompt}]}

    def text(self, choice: dict[str, Any]) -> Any:
        delta = choice.get("delta")
        return delta.get("content") if isinstance(delta, dict) else None


class CompletionsApi(OpenAIApi):
    """`POST /v1/completions`: the prompt as it is."""

    name = "openai-completions"
    path = "/v1/completions"

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        return {"prompt": prompt}

    def text(self, choice: dict[str, Any]) -> Any:
        return choice.get("text")


APIS: dict[str, type[Api]] = {api.name: api for api in (RagApi, ChatApi, CompletionsApi)}
MODELS_PATH = "/v1/models"


def served_model(payload: bytes) -> str:
    """The first model a `GET /v1/models` answer lists (ValueError when it lists none)."""
    try:
        models = json.loads(payload)["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"no model listed: {payload[:200]!r}") from None
