"""The RAG HTTP app: `/rag`, health, metrics and stats over one batcher and pipeline.

The handlers are plain functions that find the server's ServerState in `app.state.rag`.
Every variant one server runs shares one code path: a request becomes a Question submitted
to the server's answering, whose events (rag.service.responding) make the answer, whole or
streamed; answering goes through the variant's batcher (batches of one for `base`, the
engine's running batch for `continuous`).  The OpenAI-compatible routes
(rag.service.openai_api) take the same path.  Models load in the core process
(rag.service.core) after the port opens, so `/ping` answers at once and `/ready` tells a
launcher when the server is worth sending load to.  Every way a request is refused maps to
its status in one table, REFUSALS, and every error is `{"detail": str}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from rag.config import Config, token_limit
from rag.service import admin, openai_api
from rag.service.api import (
    RAG_ERRORS,
    RAG_REQUEST_BODY,
    RAGResponse,
    openapi_document,
    request_schema,
)
from rag.service.door import RefuseAtShutDoor
from rag.service.params import decoding_of, read_params
from rag.service.questions import Question
from rag.service.responding import RAGFace, respond
from rag.service.state import CoreGone, ServerState
from rag.service.validation import QueryRejected, read_request
from rag.web import (
    CLIENT_GONE,
    ERROR_HANDLERS,
    V1_PATHS,
    BadJSON,
    BodyLimit,
    CountResponses,
    Error,
    NotJSON,
    OpenAIErrors,
    json_error,
    parse_json,
    require_json,
)

log = logging.getLogger("rag.service")


# Every way a /rag request is refused before it is submitted, and the status that tells
# the client; the exception's message is the `detail`.  (What the compute side refuses is
# in rag.service.answering.STATUSES.)
REFUSALS: dict[type[Exception], int] = {
    ClientDisconnect: CLIENT_GONE,
    NotJSON: 415,
    BadJSON: 422,
    QueryRejected: 422,
}


def refusal(exc: Exception) -> JSONResponse:
    status = next(s for kind, s in REFUSALS.items() if isinstance(exc, kind))
    return json_error(status, str(exc))


def state_of(request: Request) -> ServerState:
    return request.app.state.rag


router = APIRouter()


@router.post(
    "/rag",
    response_model=RAGResponse,
    response_model_exclude_none=True,
    responses=RAG_ERRORS,
    openapi_extra={"requestBody": RAG_REQUEST_BODY},
)
async def rag(request: Request) -> Any:
    """Answer one question from the retrieved documents; with `"stream": true`, as
    Server-Sent Events while it is generated."""
    arrived = time.perf_counter()
    state = state_of(request)
    cfg = state.cfg
    try:
        require_json(request.headers.get("content-type"))
        body = parse_json(await request.body())
        query, k = read_request(body, cfg.server.k_default, state.limits)
        values = read_params(body, state.generation_params)
    except tuple(REFUSALS) as exc:
        return refusal(exc)
    decoding = decoding_of(values, cfg.model, token_limit(cfg))
    question = Question(query, k, decoding, bool(values["stream"]), arrived)
    return await respond(request, state, question, RAGFace())


@router.get("/ping")
async def ping() -> dict[str, str]:
    """Liveness: answers as soon as the port is open."""
    return {"status": "alive"}


@router.get("/ready", responses={503: {"model": Error, "description": "Loading or draining."}})
async def ready(request: Request) -> JSONResponse:
    """200 once the models are loaded and warmed; 503 before, after a failure, and while
    draining."""
    state = state_of(request)
    if state.failure:
        return json_error(503, state.failure)
    if state.draining:
        return json_error(503, "draining")
    if not state.ready:
        return json_error(503, "loading models")
    return JSONResponse({"status": "ready"})


router.add_api_route("/ping", ping, methods=["HEAD"], name="ping_head")
router.add_api_route(
    "/ready", ready, methods=["HEAD"], name="ready_head", responses={503: {"model": Error}}
)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition format."""
    state = state_of(request)
    with suppress(CoreGone):
        await state.stats()  # the core's counters as of now
    rendered = state.metrics.render()
    return PlainTextResponse(rendered, media_type="text/plain; version=0.0.4")


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The batching knobs, the batch-size histogram (continuous: steps by the running
    batch's size) and what the models run on."""
    return await state_of(request).stats()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.rag
    state.open()
    yield
    await state.close()


def openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with this server's limits; cached once the corpus (which caps
    `k`) is loaded."""
    if app.openapi_schema:
        return app.openapi_schema
    state: ServerState = app.state.rag
    schemas = {
        "RAGRequest": request_schema(
            state.limits, state.cfg.server.k_default, state.generation_params
        ),
        **openai_api.openai_schemas(state),
    }
    document = openapi_document(app, schemas)
    if state.ready:
        app.openapi_schema = document
    return document


def create_app(cfg: Config) -> FastAPI:
    """Build the app; the core process starts (and loads the models) once it starts."""
    app = FastAPI(title="ragbench RAG service", lifespan=lifespan)
    state = app.state.rag = ServerState(cfg)
    app.include_router(router)
    app.include_router(openai_api.router)
    app.include_router(admin.router)
    for exception, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exception, handler)
    generation_paths = ("/rag", *(p for p in V1_PATHS if p != "/v1/models"))
    app.add_middleware(RefuseAtShutDoor, state=state, paths=generation_paths)
    # A query's characters may each take up to 12 bytes as JSON escapes (surrogate pairs).
    app.add_middleware(
        BodyLimit,
        max_bytes=12 * cfg.server.max_query_chars + 1024,
        timeout_s=cfg.server.body_timeout_s,
    )
    app.add_middleware(OpenAIErrors)  # every error under /v1/ in OpenAI's format
    count = state.metrics.count_response
    paths = ("/rag", *V1_PATHS)
    app.add_middleware(CountResponses, paths=paths, count=count)  # outermost: every status
    app.openapi = partial(openapi, app)  # type: ignore[method-assign]
    return app
