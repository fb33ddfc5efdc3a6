"""The RAG HTTP app: `/rag`, health, metrics and stats over one batcher and pipeline.

The handlers are plain functions that find the server's ServerState in `app.state.rag`.
Every variant one server runs shares one code path: requests go through its batcher (batches
of one for `base`, the engine's running batch for `continuous`).  Models load in the
background after the port opens, so `/ping` answers at once and `/ready` tells a launcher
when the server is worth sending load to.  Every way a request is refused maps to its status
in one table, REFUSALS, and every error is `{"detail": str}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from rag.config import Config
from rag.service import admin
from rag.service.api import RAG_ERRORS, RAG_REQUEST_BODY, RAGResponse, openapi_document
from rag.service.batching import Completed, DeadlineExceeded, Draining, Overloaded
from rag.service.state import NotReady, ServerState
from rag.service.validation import QueryRejected, read_request
from rag.web import (
    CLIENT_GONE,
    ERROR_HANDLERS,
    BadJSON,
    BodyLimit,
    CountResponses,
    Error,
    NotJSON,
    json_error,
    parse_json,
    require_json,
    unless_client_leaves,
)

if TYPE_CHECKING:
    from rag.service.pipeline import Answer, RAGPipeline

log = logging.getLogger("rag.service")


# Every way a /rag request ends without an answer, and the status that tells the client;
# the exception's message is the `detail`.
REFUSALS: dict[type[Exception], int] = {
    ClientDisconnect: CLIENT_GONE,
    NotJSON: 415,
    BadJSON: 422,
    QueryRejected: 422,
    Overloaded: 429,
    NotReady: 503,
    Draining: 503,
    DeadlineExceeded: 504,
}


def refusal(exc: Exception) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return json_error(REFUSALS[type(exc)], str(exc), headers)


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
    """Answer one question from the retrieved documents."""
    arrived = time.perf_counter()
    state = state_of(request)
    try:
        require_json(request.headers.get("content-type"))
        body = parse_json(await request.body())
        batcher, pipeline = state.serving()
        query, k = read_request(body, state.cfg.server.k_default, pipeline.limits)
        submitted = batcher.submit((query, k), state.cfg.variant.request_timeout_s)
        completed = await unless_client_leaves(submitted, request.receive)
    except tuple(REFUSALS) as exc:
        return refusal(exc)
    if completed is None:
        return Response(status_code=CLIENT_GONE)
    answer = _answer_body(completed, arrived, state.cfg)
    state.metrics.observe_stages(answer["timings"])
    return answer


def _answer_body(completed: Completed[Answer], arrived: float, cfg: Config) -> dict:
    answer = completed.value
    total_ms = (time.perf_counter() - arrived) * 1e3
    timings = {"queue_ms": completed.queue_s * 1e3, **answer.timings_ms, "total_ms": total_ms}
    labels = {"model": cfg.model.name}
    if cfg.server.replica_id:
        labels["replica"] = cfg.server.replica_id
    return {
        "query": answer.query,
        "result": answer.result,
        "docs": [{"id": h.doc.id, "text": h.doc.text, "score": h.score} for h in answer.docs],
        "timings": timings,
        "batch_size": completed.requests_in_batch,
        "prompt_tokens": answer.prompt_tokens,
        "new_tokens": answer.new_tokens,
        "variant": cfg.variant.name,
        **labels,
    }


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
        return json_error(503, f"model loading failed: {state.failure}")
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
    rendered = state_of(request).metrics.render()
    return PlainTextResponse(rendered, media_type="text/plain; version=0.0.4")


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The batching knobs, the batch-size histogram (continuous: steps by the running
    batch's size) and what the models run on."""
    from rag.service.simulated import is_simulated

    state = state_of(request)
    cfg, batcher, pipeline = state.cfg, state.batcher, state.pipeline
    return {
        "variant": cfg.variant.name,
        "model": cfg.model.name,
        "simulated": is_simulated(cfg.model.generator) or is_simulated(cfg.model.embedder),
        "replica": cfg.server.replica_id or None,
        "max_batch_size": batcher.max_batch_size if batcher else None,
        "max_wait_ms": batcher.max_wait_s * 1e3 if batcher else None,
        "max_queue": cfg.variant.max_queue,
        "queue_depth": batcher.depth if batcher else 0,
        "running": batcher.running if batcher else 0,
        "service_rate": batcher.service_rate if batcher else None,
        "dropped": batcher.dropped if batcher else 0,
        "expired": batcher.expired if batcher else 0,
        "batch_size_counts": dict(sorted(batcher.batch_size_counts.items())) if batcher else {},
        "corpus_size": pipeline.index.size if pipeline else None,
        "runtime": _runtime(state, pipeline) if pipeline else None,
    }


def _runtime(state: ServerState, pipeline: RAGPipeline) -> dict[str, Any]:
    """What the models run on; a simulated generator describes its cost model instead."""
    if hasattr(pipeline.generator, "describe"):
        return pipeline.generator.describe()
    from rag.service.models import describe_runtime

    # torch's thread count is per thread: the compute thread's, not this one's
    return {**describe_runtime(pipeline.generator), "torch_threads": state.torch_threads}


def load_default_pipeline(cfg: Config) -> RAGPipeline:
    """Imported here, on the compute thread, because torch and transformers take seconds
    to import: the port opens (and /ping answers) before that."""
    from rag.service.pipeline import RAGPipeline

    return RAGPipeline.from_config(cfg)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.rag
    state.spawn(state.load())
    yield
    await state.close()


def openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document with this server's limits; cached once the corpus (which caps
    `k`) is loaded."""
    if app.openapi_schema:
        return app.openapi_schema
    state: ServerState = app.state.rag
    document = openapi_document(app, state.limits, state.cfg.server.k_default)
    if state.ready:
        app.openapi_schema = document
    return document


def create_app(cfg: Config) -> FastAPI:
    """Build the app; models load in the background once it starts."""
    app = FastAPI(title="ragbench RAG service", lifespan=lifespan)
    state = app.state.rag = ServerState(cfg, partial(load_default_pipeline, cfg))
    app.include_router(router)
    app.include_router(admin.router)
    for exception, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exception, handler)
    # A query's characters may each take up to 12 bytes as JSON escapes (surrogate pairs).
    app.add_middleware(
        BodyLimit,
        max_bytes=12 * cfg.server.max_query_chars + 1024,
        timeout_s=cfg.server.body_timeout_s,
    )
    count = state.metrics.count_response
    app.add_middleware(CountResponses, path="/rag", count=count)  # outermost: every status
    app.openapi = partial(openapi, app)  # type: ignore[method-assign]
    return app
