"""The OpenAI-compatible face: `POST /v1/chat/completions` (the last user message is the
query), `POST /v1/completions` (the prompt is the query), `GET /v1/models`.  Retrieval and
generation are `/rag`'s, through the same answering (admission, deadlines, cancellation,
drain, metrics); what differs is the shape of requests, answers, chunks and errors, which
are OpenAI's, so that an OpenAI client or an LLM benchmark can measure this server.

Every message's content (and a completion's prompt) follows the query's rules; a request
may give `max_tokens` (`max_completion_tokens`), `temperature`, `top_p`, `seed`, `stream`,
`stream_options.include_usage`, and two extensions: `ignore_eos` (vLLM's) and `k` (documents
to retrieve).  Settings this server cannot honour (`n` > 1, `stop`, `logprobs`, ...) are
refused with 400 rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from rag.config import token_limit
from rag.service.events import Event, Kind
from rag.service.params import Integer, Invalid, Only, Param, decoding_of, read_params
from rag.service.questions import Question
from rag.service.responding import respond
from rag.service.state import ServerState
from rag.service.validation import QUERY_PATTERN, QueryLimits, QueryRejected, find_problems
from rag.web import BadJSON, NotJSON, error_object, frame, openai_error, parse_json, require_json

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 64
# Settings a request may give only at the value this server honours.
UNSUPPORTED: dict[str, Param] = {
    "n": Integer(1, 1, "One choice per request."),
    "best_of": Integer(1, 1, "One candidate per request."),
    "stop": Only((None,), "Stop sequences are not supported."),
    "logprobs": Only((None, False), "Log-probabilities are not returned."),
    "top_logprobs": Only((None, 0), "Log-probabilities are not returned."),
    "echo": Only((None, False), "The prompt is not echoed."),
    "tools": Only((None,), "Tool calls are not supported."),
}


def model_id(state: ServerState) -> str:
    return state.cfg.model.name


def text_schema(limits: QueryLimits) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": limits.max_chars,
            "pattern": QUERY_PATTERN}  # fmt: skip


def openai_schemas(state: ServerState) -> dict[str, dict[str, Any]]:
    """The request bodies' schemas for the OpenAPI document, from the params they read."""
    limits = state.limits
    text = text_schema(limits)
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": text}}  # fmt: skip
    content = {"anyOf": [text, {"type": "array", "minItems": 1, "maxItems": 1, "items": part}]}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": list(ROLES)}, "content": content}}  # fmt: skip
    messages = {
        "type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": message,
        "contains": {"type": "object", "properties": {"role": {"const": "user"}}},
        "description": "Every content follows the query's rules; the last user message is "
        "the query.",
    }  # fmt: skip
    common = {
        name: param.schema() for name, param in {**shared_params(state), **UNSUPPORTED}.items()
    }
    common["stream_options"] = {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}},
    }
    common["model"] = {"enum": [model_id(state)], "description": "GET /v1/models lists it."}
    return {
        "ChatCompletionRequest": {
            "type": "object", "required": ["messages"],
            "properties": {"messages": messages, **common,
                           "max_completion_tokens": common["max_tokens"]},
        },
        "CompletionRequest": {
            "type": "object", "required": ["prompt"], "properties": {"prompt": text, **common},
        },
    }  # fmt: skip


def shared_params(state: ServerState) -> dict[str, Param]:
    limits = state.limits
    return {
        **state.generation_params,
        "k": Integer(1, limits.k_upper, "Documents to retrieve (an extension)."),
    }


def request_body(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}}}}}
    for status, description in {
        400: "Invalid request: the body, a message, the prompt or a setting.",
        404: "Unknown model.",
        408: "The body did not all arrive in time.",
        413: "The body is larger than any valid request.",
        415: "The body is not declared as JSON.",
        429: "Overloaded: retry after `Retry-After` seconds.",
        503: "Loading models, draining, or too many open connections.",
        504: "Not answered within the request deadline.",
    }.items()
}  # fmt: skip
STREAMED = {
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
    "description": "The completion, or with `stream` its chunks as Server-Sent Events.",
}


async def read_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or Invalid (or NotJSON / BadJSON / ClientDisconnect)."""
    require_json(request.headers.get("content-type"))
    body = parse_json(await request.body())
    if not isinstance(body, dict):
        raise Invalid("body", "must be a JSON object")
    return body


def read_text(name: str, value: Any, limits: QueryLimits) -> str:
    """A message content or prompt, held to the query's rules."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("type") != "text":
            raise Invalid(f"{name}[0].type", "must be 'text' (only text is read)")
        name, value = f"{name}[0].text", value[0].get("text")
    elif isinstance(value, list):
        raise Invalid(name, "must be a string or a list of one text part")
    problems = find_problems(value, 1, limits)
    if problems:
        raise Invalid(name, problems[0].message.removeprefix("query "))
    return value


def read_query(body: dict[str, Any], limits: QueryLimits) -> str:
    """The last user message's content (every message checked)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise Invalid("messages", f"must be a list of 1 to {MAX_MESSAGES} messages")
    query = None
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Invalid(f"messages[{n}]", "must be an object with role and content")
        if message.get("role") not in ROLES:
            raise Invalid(f"messages[{n}].role", f"must be one of {', '.join(ROLES)}")
        text = read_text(f"messages[{n}].content", message.get("content"), limits)
        if message["role"] == "user":
            query = text
    if query is None:
        raise Invalid("messages", "must contain a user message (the last one is the query)")
    return query


def read_question(
    body: dict[str, Any], query: str, state: ServerState, arrived: float
) -> tuple[Question, bool]:
    """The question and whether its stream ends with a usage chunk."""
    if "model" in body and body["model"] != model_id(state):
        raise LookupError(f"the model {body['model']!r} does not exist; GET /v1/models")
    params = shared_params(state)
    values = read_params(body, {**params, **UNSUPPORTED})
    if body.get("max_completion_tokens") is not None:
        values["max_tokens"] = params["max_tokens"].read("max_completion_tokens",
                                                         body["max_completion_tokens"])  # fmt: skip
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise Invalid("stream_options", "must be an object")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise Invalid("stream_options.include_usage", "must be true or false")
    cfg = state.cfg
    decoding = decoding_of(values, cfg.model, token_limit(cfg))
    k = values["k"] if values["k"] is not None else cfg.server.k_default
    stream = bool(values["stream"])
    return Question(query, min(k, state.limits.k_upper), decoding, stream, arrived), bool(
        stream and include_usage
    )


class OpenAIFace:
    """An answer as OpenAI's chat completion or text completion, and its chunks."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def error(self, status: int, detail: str, retry_after: int | None = None) -> Response:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return openai_error(status, detail, headers=headers)

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, answer: dict[str, Any]) -> dict[str, Any]:
        finish = finish_reason(answer)
        if self.chat:
            message = {"role": "assistant", "content": answer["result"]}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": answer["result"], "logprobs": None,
                      "finish_reason": finish}  # fmt: skip
        return {**self._head(self.object), "choices": [choice], "usage": answer["usage"]}

    def _chunk(self, content: dict[str, Any] | None, finish: str | None = None) -> bytes:
        if content is None:
            choices = []
        elif self.chat:
            choices = [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": content.get("content", ""), "logprobs": None,
                        "finish_reason": finish}]  # fmt: skip
        chunk = {**self._head("chat.completion.chunk" if self.chat else self.object),
                 "choices": choices}  # fmt: skip
        if self.include_usage:
            chunk["usage"] = None
        return frame(chunk)

    def frames(self, events: list[Event]) -> bytes:
        out = []
        for event in events:
            if event.kind is Kind.DOCS and self.chat:
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif event.kind is Kind.TOKEN:
                out.append(self._chunk({"content": event.payload["text"]}))
            elif event.kind is Kind.DONE:
                out.append(self._chunk({} if self.chat else {"content": ""},
                                       finish_reason(event.payload)))  # fmt: skip
                if self.include_usage:
                    usage = {**self._head(self.object if not self.chat else
                                          "chat.completion.chunk"), "choices": [],
                             "usage": event.payload["usage"]}  # fmt: skip
                    out.append(frame(usage))
                out.append(frame("[DONE]"))
            elif event.kind is Kind.ERROR:
                error = error_object(event.payload["status"], event.payload["detail"])
                out.extend([frame(error), frame("[DONE]")])
        return b"".join(out)


def finish_reason(answer: dict[str, Any]) -> str:
    return "stop" if answer["finish_reason"] == "stop" else "length"


async def _complete(request: Request, chat: bool) -> Response:
    arrived = time.perf_counter()
    state: ServerState = request.app.state.rag
    try:
        body = await read_body(request)
        limits = state.limits
        query = (
            read_query(body, limits) if chat else read_text("prompt", body.get("prompt"), limits)
        )
        question, include_usage = read_question(body, query, state, arrived)
    except NotJSON as exc:
        return openai_error(415, str(exc))
    except (BadJSON, ClientDisconnect) as exc:
        return openai_error(400, str(exc) or "the client left")
    except Invalid as exc:
        return openai_error(400, str(exc), param=exc.param)
    except QueryRejected as exc:
        return openai_error(400, str(exc))
    except LookupError as exc:
        return openai_error(404, str(exc), param="model", code="model_not_found")
    face = OpenAIFace(chat, model_id(state), include_usage)
    return await respond(request, state, question, face)


@router.post("/chat/completions", responses={200: STREAMED, **ERRORS},
             openapi_extra={"requestBody": request_body("ChatCompletionRequest")})  # fmt: skip
async def chat_completions(request: Request) -> Response:
    """A chat completion: the last user message is the query, answered from the documents
    retrieved for it."""
    return await _complete(request, chat=True)


@router.post("/completions", responses={200: STREAMED, **ERRORS},
             openapi_extra={"requestBody": request_body("CompletionRequest")})  # fmt: skip
async def completions(request: Request) -> Response:
    """A text completion: the prompt is the query, answered from the documents retrieved
    for it."""
    return await _complete(request, chat=False)


@router.get("/models")
async def models(request: Request) -> JSONResponse:
    """The one model this server answers with."""
    state: ServerState = request.app.state.rag
    started = int(state.started_at)
    card = {"id": model_id(state), "object": "model", "created": started, "owned_by": "ragbench"}
    return JSONResponse({"object": "list", "data": [card]})
