"""The HTTP contract as the OpenAPI document states it: what `/rag` accepts (with the real
limits of this server's config and corpus), what it answers, and every error status.

The request body is parsed and checked by hand (strict JSON, then `read_request`), so its
schema here is written from the same limits rather than derived from a model; a
schemathesis run in the tests holds the two to each other.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from rag.service.params import Param
from rag.service.validation import QUERY_PATTERN, QueryLimits
from rag.web import Error


class Timings(BaseModel):
    queue_ms: float
    embed_ms: float
    retrieve_ms: float
    generate_ms: float
    total_ms: float


class RetrievedDoc(BaseModel):
    id: str
    text: str
    score: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RAGResponse(BaseModel):
    query: str
    result: str
    docs: list[RetrievedDoc]
    timings: Timings
    batch_size: int = Field(
        description="Requests the server computed in one batch with this one (itself included)."
    )
    prompt_tokens: int
    new_tokens: int
    usage: Usage
    finish_reason: str = Field(description="stop (EOS), length (the token limit).")
    ttft_ms: float | None = Field(
        default=None, description="From the request's arrival to its first token."
    )
    tpot_ms: float | None = Field(
        default=None, description="Time per output token after the first (two tokens or more)."
    )
    variant: str
    model: str = Field(description="The model preset; `simulated` answers come from no model.")
    replica: str | None = Field(default=None, description="The replica that answered.")


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": Error, "description": description, **extra}


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds after which the request would likely be admitted (>= 1).",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}

RAG_ERRORS: dict[int | str, dict[str, Any]] = {
    408: _error("The body did not all arrive within `server.body_timeout_s` of the request."),
    413: _error("The body is larger than any valid request (counted as it arrives)."),
    415: _error("The body is not declared as JSON (Content-Type: application/json)."),
    422: _error(
        "The body is not valid: not UTF-8 JSON with finite numbers, not an object, or "
        "`query`/`k` out of their limits."
    ),
    429: _error(
        "Refused at the door: the queue is full, or the requests ahead cannot be served "
        "within this one's deadline at the measured service rate.",
        headers=RETRY_AFTER,
    ),
    503: _error("Loading models, draining, or too many open connections."),
    504: _error("Not answered within the request deadline; it was not computed."),
}

RAG_STREAM = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "description": "With `stream`: events docs, token (one per step), then done or error.",
    }
}

RAG_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RAGRequest"}}},
}


def request_schema(limits: QueryLimits, k_default: int, params: dict[str, Param]) -> dict[str, Any]:
    return {
        "title": "RAGRequest",
        "type": "object",
        "required": ["query"],
        "properties": {
            "query": {
                "type": "string",
                "description": "The question: not blank, no control characters.",
                "minLength": 1,
                "maxLength": limits.max_chars,
                "pattern": QUERY_PATTERN,
            },
            "k": {
                "type": "integer",
                "description": "How many documents to retrieve.",
                "minimum": 1,
                "maximum": limits.k_upper,
                "default": k_default,
            },
            **{name: param.schema() for name, param in params.items()},
        },
    }


def openapi_document(app: FastAPI, request_schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's document for the routes, with the request schemas of this server's
    limits, and `/rag`'s streamed answer."""
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(request_schemas)
    answered = document["paths"]["/rag"]["post"]["responses"]["200"]["content"]
    answered.update(RAG_STREAM)
    return document
