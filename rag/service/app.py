"""The RAG HTTP app: `/rag`, health, metrics and stats over one batcher and pipeline.

Both variants share one code path: requests go through a Batcher, with batches of one for
`base`.  Models load in the background after the port opens, so `/ping` answers at once and
`/ready` tells a launcher when the server is worth sending load to.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag.config import Config
from rag.service.batching import Batcher, BatchRecord, Completed, Draining, Overloaded
from rag.service.metrics import ServerMetrics
from rag.service.validation import QueryRejected, find_problems

if TYPE_CHECKING:
    from rag.service.pipeline import Answer, RAGPipeline

log = logging.getLogger("rag.service")

CLIENT_GONE = 499  # nginx's code for "client closed request": counted, never sent


class RAGRequest(BaseModel):
    query: StrictStr = Field(description="The question to answer.")
    k: StrictInt | None = Field(default=None, description="Documents to retrieve (default 2).")


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


class RAGResponse(BaseModel):
    query: str
    result: str
    docs: list[RetrievedDoc]
    timings: Timings
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    variant: str
    model: str = Field(description="The model preset; `simulated` answers come from no model.")
    replica: str | None = Field(default=None, description="The replica that answered.")


@dataclass
class ServerState:
    """What the handlers share: the pipeline once loaded, the batcher, the lifecycle."""

    cfg: Config
    load_pipeline: Callable[[], RAGPipeline]
    pipeline: RAGPipeline | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False
    failure: str = ""
    on_fatal: Callable[[], None] = lambda: None
    metrics: ServerMetrics = field(init=False)
    tasks: set[asyncio.Task] = field(default_factory=set)
    # All model work (loading, warm-up, batches) runs on this one thread: torch's OpenMP
    # pool belongs to the thread that first used it, and from any other thread the same
    # batch ran 1.6x slower here (0.81 s vs 1.28 s for one SmolLM2 request in bf16).
    compute: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
    )

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.batcher.depth if self.batcher else 0,
            dropped=lambda: self.batcher.dropped if self.batcher else 0,
        )

    async def load(self) -> None:
        """Load models and run one warm-up batch, then open for traffic."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            pipeline = await loop.run_in_executor(self.compute, self.load_pipeline)
            loaded = time.perf_counter()
            await loop.run_in_executor(self.compute, pipeline.warm_up)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.failure)
            print(f"ragbench serve: model loading failed: {self.failure}", file=sys.stderr)
            self.on_fatal()
            return
        variant = self.cfg.variant
        self.pipeline = pipeline
        self.batcher = Batcher(
            lambda items: pipeline.answer_batch([q for q, _ in items], [k for _, k in items]),
            max_batch_size=variant.max_batch_size if variant.batched else 1,
            max_wait_s=variant.max_wait_ms / 1e3 if variant.batched else 0.0,
            max_queue=variant.max_queue,
            on_batch=self._record_batch,
            executor=self.compute,
        )
        self.batcher.start()
        self.ready = True
        print(
            f"ragbench serve: ready (models {loaded - started:.1f} s, "
            f"warm-up {time.perf_counter() - loaded:.1f} s)",
            flush=True,
        )

    def _record_batch(self, record: BatchRecord) -> None:
        self.metrics.batch_size.observe(record.size)

    async def drain(self, then: Callable[[], None]) -> None:
        """Turn /ready to 503, let queued and running requests finish, then call `then`."""
        self.draining = True
        if self.batcher is not None:
            self.batcher.begin_drain()
            finished = await self.batcher.wait_idle(self.cfg.server.drain_timeout_s)
            if not finished:
                log.warning("drain timed out with %d requests in flight", self.batcher.in_flight)
            await asyncio.sleep(0.05)  # let the last handlers write their responses
        then()

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so the next ASGI
    message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _response(answer: Answer, completed: Completed, arrived: float, cfg: Config) -> dict:
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
        "batch_size": completed.batch_size,
        "prompt_tokens": answer.prompt_tokens,
        "new_tokens": answer.new_tokens,
        "variant": cfg.variant.name,
        **labels,
    }


class BodyLimit:
    """Refuse a request body larger than any valid one could be, from its Content-Length,
    before it is read: parsing megabytes of JSON would stall every other request."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_bytes:
                detail = f"request body is {int(length)} bytes; the limit is {self.max_bytes}"
                await _error(413, detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CountResponses:
    """Count every /rag response by status, including the ones FastAPI or BodyLimit send
    before the handler runs (422 for unparsable bodies, 413)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/rag":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _runtime(pipeline: RAGPipeline) -> dict[str, Any]:
    """What the models run on; a simulated generator describes its cost model instead."""
    if hasattr(pipeline.generator, "describe"):
        return pipeline.generator.describe()
    from rag.service.models import describe_runtime

    return describe_runtime(pipeline.generator)


def load_default_pipeline(cfg: Config) -> RAGPipeline:
    """Imported here, on the compute thread, because torch and transformers take seconds
    to import: the port opens (and /ping answers) before that."""
    from rag.service.pipeline import RAGPipeline

    return RAGPipeline.from_config(cfg)


def create_app(cfg: Config) -> FastAPI:
    """Build the app; models load in the background once it starts."""
    state = ServerState(cfg, partial(load_default_pipeline, cfg))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.spawn(state.load())
        yield
        if state.batcher is not None:
            await state.batcher.stop()
        state.compute.shutdown(wait=True)

    app = FastAPI(title="ragbench RAG service", lifespan=lifespan)
    # A query's characters may each take up to 12 bytes as JSON escapes (surrogate pairs).
    app.add_middleware(BodyLimit, max_bytes=12 * cfg.server.max_query_chars + 1024)
    app.add_middleware(CountResponses, metrics=state.metrics)  # outermost: sees every status
    app.state.rag = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 when the body is not even text (invalid UTF-8); that is bad
        # input like malformed JSON, which gets 422.
        if exc.status_code == 400:
            return _error(422, "request body is not valid JSON text (UTF-8)")
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.failure:
            return _error(503, f"model loading failed: {state.failure}")
        if state.draining:
            return _error(503, "draining")
        if not state.ready:
            return _error(503, "loading models")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """The batching knobs, the batch-size histogram and what the models run on."""
        from rag.service.simulated import is_simulated

        batcher, pipeline = state.batcher, state.pipeline
        return {
            "variant": cfg.variant.name,
            "model": cfg.model.name,
            "simulated": is_simulated(cfg.model.generator) or is_simulated(cfg.model.embedder),
            "replica": cfg.server.replica_id or None,
            "max_batch_size": batcher.max_batch_size if batcher else None,
            "max_wait_ms": batcher.max_wait_s * 1e3 if batcher else None,
            "max_queue": cfg.variant.max_queue,
            "queue_depth": batcher.depth if batcher else 0,
            "service_rate": batcher.service_rate if batcher else None,
            "dropped": batcher.dropped if batcher else 0,
            "batch_size_counts": dict(sorted(batcher.batch_size_counts.items())) if batcher else {},
            "corpus_size": pipeline.index.size if pipeline else None,
            "runtime": _runtime(pipeline) if pipeline else None,
        }

    @app.post("/rag", response_model=RAGResponse, response_model_exclude_none=True)
    async def rag(body: RAGRequest, request: Request) -> Any:
        response = await _answer(body, request, time.perf_counter())
        if isinstance(response, dict):
            state.metrics.observe_stages(response["timings"])
        return response

    async def _answer(body: RAGRequest, request: Request, arrived: float) -> dict | Response:
        if state.draining:
            return _error(503, "server is draining")
        if not state.ready or state.batcher is None or state.pipeline is None:
            return _error(503, "models are still loading; poll /ready")
        k = cfg.server.k_default if body.k is None else body.k
        problems = find_problems(body.query, k, state.pipeline.limits)
        if problems:
            raise RequestValidationError(
                [
                    {"type": "value_error", "loc": ("body", p.field), "msg": p.message}
                    for p in problems
                ]
            )
        submitted = asyncio.ensure_future(
            state.batcher.submit((body.query, k), cfg.variant.request_timeout_s)
        )
        watcher = asyncio.ensure_future(_client_gone(request))
        await asyncio.wait({submitted, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if not submitted.done():
            submitted.cancel()  # the batcher will skip it
            return Response(status_code=CLIENT_GONE)
        try:
            completed = submitted.result()
        except Overloaded as exc:
            return _error(
                429,
                f"queue full ({cfg.variant.max_queue} waiting); retry after {exc.retry_after_s} s",
                {"Retry-After": str(exc.retry_after_s)},
            )
        except Draining:
            return _error(503, "server is draining")
        except TimeoutError:
            return _error(
                504, f"not served within the {cfg.variant.request_timeout_s:g} s request timeout"
            )
        except QueryRejected as exc:
            return _error(422, str(exc))
        return _response(completed.value, completed, arrived, cfg)

    return app
