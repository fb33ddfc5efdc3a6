"""The load balancer: a reverse proxy in front of the replicas, an ASGI app served by uvicorn
with the same guards as the RAG server (rag.web).

`POST /rag` and the OpenAI-compatible routes (`/v1/...`) are forwarded to one ready
replica, chosen by the configured policy from the balancer's own in-flight counters, and its
answer returned as it came; a streamed answer (Server-Sent Events) is passed on unbuffered,
event by event, and one whose replica fails mid-answer ends with an error event in its API's
format (the client sees the failure, not a hang).  A request that
never reached a replica (connection refused: the replica is gone) is retried once on
another; one that a replica accepted is never sent twice.  A client that disconnects
cancels its forwarded request (the replica then drops it, or stops generating it).

What it accepts is bounded as the server bounds it, by the same code: the JSON content
type (415), the body counted as it arrives (413) and due within a deadline (408), the
connection cap, the head timeout and head limits, protocol errors as JSON; each hop has a
timeout (the longest a replica may stay silent, so a long stream is not cut).  Errors are
JSON with a `detail`, like the server's, and OpenAI's error object under `/v1/`.

Registration (`/register`, `/unregister`) lets a replica started elsewhere (a SLURM job)
report where it listens; it always needs the balancer's token (loopback is no trust
boundary on a shared machine), and the URL must be the scheme, host and port of a replica
this balancer launched, on the host its launcher expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from yarl import URL

from rag.cluster.admin import TOKEN_HEADER, token_refusal
from rag.cluster.pool import Replica, ReplicaPool, State
from rag.web import (
    CLIENT_GONE,
    V1_PATHS,
    ASGIApp,
    BadJSON,
    BodyLimit,
    BodyRefused,
    ConnectionGuard,
    CountResponses,
    NotJSON,
    OpenAIErrors,
    bind_socket,
    error_frame,
    guarded_config,
    json_error,
    parse_json,
    read_body,
    require_json,
    unless_client_leaves,
)
from rag.web.asgi import Receive, Scope, Send
from rag.web.sse import HEADERS as EVENT_STREAM_HEADERS

log = logging.getLogger("rag.cluster")

SHUTDOWN_TIMEOUT_S = 15.0  # on stop, forwarded requests get this long to finish
FORWARDED_HEADERS = ("Content-Type", "Retry-After")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@functools.lru_cache(maxsize=1024)
def replica_url(base: str, path: str = "/rag") -> URL:
    """A replica's URL for `path`, parsed once (parsing on every request costs the hot
    path)."""
    return URL(base + path)


def replica_address(url: object, expected_host: str | None) -> str:
    """`http://host:port` from what a replica registered: a scheme, host and port only (no
    user, path, query or fragment), on `expected_host` when the launcher knows it."""
    if not isinstance(url, str):
        raise ValueError("url must be a string, http://host:port")
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme != "http"
        or not parts.hostname
        or port is None
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError("url must be http://host:port, with no path, query or user")
    if expected_host is not None and parts.hostname != expected_host:
        raise ValueError(f"this replica must register from {expected_host}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{port}"


@dataclass
class BalancerSettings:
    policy: Any  # a rag.cluster.policies choice: .choose(ready replicas) -> replica
    max_body_bytes: int
    body_timeout_s: float  # the whole body must arrive within this (408 if not)
    head_timeout_s: float  # a connection must send a request head within this
    hop_timeout_s: float
    max_connections: int
    token: str  # what /register and /unregister need ("" = registration closed)
    labels: dict[str, Any]  # variant, model, simulated: what /stats reports


class BalancerMetrics:
    def __init__(self, pool: ReplicaPool, guard: ConnectionGuard) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "balancer_requests", "Requests to /rag by status", ["status"], registry=self.registry
        )
        self.v1_requests = Counter(
            "balancer_v1_requests",
            "Requests to the OpenAI-compatible routes by route and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.broken_streams = Counter(
            "balancer_broken_streams",
            "Streamed answers ended with an error event: the replica failed mid-answer",
            registry=self.registry,
        )
        self.retries = Counter(
            "balancer_retries",
            "Requests re-sent because the first replica refused the connection",
            registry=self.registry,
        )
        self.registrations_refused = Counter(
            "balancer_registrations_refused",
            "Calls to /register or /unregister refused for a missing (401) or wrong (403) token",
            ["status"],
            registry=self.registry,
        )
        replicas = Gauge(
            "balancer_replicas", "Replicas by state", ["state"], registry=self.registry
        )
        for state in State:
            replicas.labels(state.value).set_function(lambda s=state: pool.count(s))
        in_flight = Gauge(
            "balancer_in_flight", "Requests forwarded and not yet answered", registry=self.registry
        )
        in_flight.set_function(lambda: sum(r.in_flight for r in pool.replicas.values()))
        connections = Gauge(
            "balancer_connections", "Client connections by what happened to them",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        for outcome in ("open", "refused", "timed_out", "evicted", "malformed"):
            connections.labels(outcome).set_function(lambda o=outcome: getattr(guard, o))

    def count_response(self, path: str, status: int) -> None:
        if path == "/rag":
            self.requests.labels(str(status)).inc()
        else:
            self.v1_requests.labels(path, str(status)).inc()


class Route(NamedTuple):
    methods: frozenset[str]
    handler: Callable[[Request], Awaitable[Response]]


class QuietServer(uvicorn.Server):
    """uvicorn, leaving signals to the process that runs it (the scaling service drains its
    replicas on SIGTERM, after the balancer has stopped)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Balancer:
    def __init__(self, pool: ReplicaPool, settings: BalancerSettings) -> None:
        self.pool = pool
        self.settings = settings
        self.guard = ConnectionGuard(settings.max_connections, settings.head_timeout_s)
        self.metrics = BalancerMetrics(pool, self.guard)
        # No byte from the replica for this long fails the hop (a long stream is not cut).
        self.hop_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.hop_timeout_s, sock_read=settings.hop_timeout_s
        )
        self.server: uvicorn.Server | None = None
        get, post = frozenset({"GET", "HEAD"}), frozenset({"POST"})
        self.routes = {
            "/rag": Route(post, self.rag),
            "/v1/chat/completions": Route(post, self.rag),
            "/v1/completions": Route(post, self.rag),
            "/v1/models": Route(get, self.models),
            "/assign": Route(get, self.assign),
            "/ping": Route(get, self.ping),
            "/ready": Route(get, self.ready),
            "/metrics": Route(get, self.prometheus),
            "/replicas": Route(get, self.replicas),
            "/stats": Route(get, self.stats),
            "/register": Route(post, self.register),
            "/unregister": Route(post, self.unregister),
        }
        self._serving: asyncio.Task[None] | None = None

    def app(self) -> ASGIApp:
        """The balancer as uvicorn runs it: every forwarded answer counted, every body
        bounded, errors under /v1/ in OpenAI's format."""
        settings = self.settings
        bounded = BodyLimit(self._dispatch, settings.max_body_bytes, settings.body_timeout_s)
        paths = ("/rag", *V1_PATHS)
        return CountResponses(OpenAIErrors(bounded), paths, self.metrics.count_response)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A route by path and method (a dict look-up: the proxy's hot path stays short);
        every answer, an unexpected error's too, in the one error format."""
        route = self.routes.get(scope["path"])
        if route is None:
            response: Response = json_error(404, "Not Found")
        elif scope["method"] not in route.methods:
            allow = ", ".join(sorted(route.methods))
            response = json_error(405, "Method Not Allowed", {"Allow": allow})
        else:
            try:
                response = await route.handler(Request(scope, receive))
            except BodyRefused:
                raise  # BodyLimit answers it
            except Exception as exc:
                log.exception("unhandled error on %s", scope["path"])
                response = json_error(500, f"internal error: {type(exc).__name__}")
        await response(scope, receive, send)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = a free port); returns the port once it serves."""
        sock = bind_socket(host, port)
        config = guarded_config(
            self.app(),
            self.guard,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        )
        self.server = server = QuietServer(config)
        self._serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
                raise RuntimeError("the balancer's server stopped while starting")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close idle connections, let forwarded requests finish (bounded)."""
        if self.server is not None:
            self.server.should_exit = True
            assert self._serving is not None
            await self._serving

    # --- routes -------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(self, request: Request) -> Response:
        if not self.pool.ready:
            return json_error(503, "no replica is ready yet")
        return JSONResponse({"status": "ready", "replicas": len(self.pool.ready)})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain")

    async def replicas(self, request: Request) -> Response:
        """Every replica; log tails, file paths and process ids only to a local caller or
        one with the token."""
        client = request.client.host if request.client else ""
        private = is_loopback(client) or self._token_problem(request) is None
        return JSONResponse([r.describe(private) for r in self.pool.replicas.values()])

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                **self.settings.labels,
                "replicas_ready": len(self.pool.ready),
                "replicas_starting": self.pool.count(State.STARTING),
            }
        )

    async def assign(self, request: Request) -> Response:
        """The older two-step design: the endpoint the client should post its query to."""
        if not self.pool.ready:
            return json_error(503, "no replica is ready", {"Retry-After": "1"})
        replica = self.settings.policy.choose(self.pool.ready)
        return JSONResponse({"backend": str(replica_url(replica.url))})

    async def models(self, request: Request) -> Response:
        """The replicas' model list (every replica serves the same model)."""
        route = self._route(request.url.path, "GET", b"", {})
        response = await unless_client_leaves(route, request.receive)
        return response if response is not None else Response(status_code=CLIENT_GONE)

    async def rag(self, request: Request) -> Response:
        """`/rag` and the OpenAI-compatible POST routes, forwarded."""
        try:
            require_json(request.headers.get("content-type"))
        except NotJSON as exc:
            return json_error(415, str(exc))
        try:
            body = await read_body(request.receive)
        except ClientDisconnect:
            return Response(status_code=CLIENT_GONE)
        headers = {"Content-Type": request.headers["content-type"]}
        route = self._route(request.url.path, "POST", body, headers)
        response = await unless_client_leaves(route, request.receive)
        return response if response is not None else Response(status_code=CLIENT_GONE)

    async def _route(
        self, path: str, method: str, body: bytes, headers: dict[str, str]
    ) -> Response:
        tried: set[Replica] = set()
        for attempt in range(2):
            candidates = [r for r in self.pool.ready if r not in tried]
            if not candidates:
                break
            replica = self.settings.policy.choose(candidates)
            tried.add(replica)
            if attempt:
                self.metrics.retries.inc()
            response = await self._forward(replica, path, method, body, headers)
            if response is not None:
                return response
        return json_error(503, "no replica is ready; retry shortly", {"Retry-After": "1"})

    async def _forward(
        self, replica: Replica, path: str, method: str, body: bytes, headers: dict[str, str]
    ) -> Response | None:
        """One hop.  None when the replica refused the connection (the request never
        reached it, so it may go to another).  A streamed answer is handed on to a Relay,
        which then holds the replica's count of requests in flight."""
        session = self.pool.session
        assert session is not None
        self.pool.begin(replica)
        relayed = served = False
        try:
            upstream = await session.request(
                method,
                replica_url(replica.url, path),
                data=body,
                headers=headers,
                timeout=self.hop_timeout,
            )
            if upstream.content_type == "text/event-stream":
                relayed = True
                return Relay(self, replica, upstream, path)
            async with upstream:
                payload = await upstream.read()
            if upstream.status >= 500:
                replica.errors += 1
            served = upstream.status < 400
            kept = {h: upstream.headers[h] for h in FORWARDED_HEADERS if h in upstream.headers}
            return Response(payload, status_code=upstream.status, headers=kept)
        except aiohttp.ClientConnectorError as exc:
            replica.errors += 1
            replica.refused += 1
            self.pool.mark_dead(replica, f"refused a connection: {exc.os_error}")
            return None
        except TimeoutError:
            replica.errors += 1
            seconds = self.settings.hop_timeout_s
            return json_error(504, f"replica {replica.id} was silent for {seconds:g} s")
        except aiohttp.ClientError as exc:
            self.replica_failed(replica)
            return json_error(
                502, f"replica {replica.id} failed mid-request ({type(exc).__name__})"
            )
        finally:
            if not relayed:
                self.pool.end(replica, served)

    def replica_failed(self, replica: Replica) -> None:
        """A replica broke a hop: counted, and its health checked now."""
        replica.errors += 1
        asyncio.get_running_loop().create_task(self.pool.check(replica))

    # --- registration ---------------------------------------------------------------

    def _token_problem(self, request: Request) -> JSONResponse | None:
        """None when the request carries the balancer's token; else the 401 or 403."""
        refusal = token_refusal(request.headers.get(TOKEN_HEADER), self.settings.token)
        return None if refusal is None else json_error(*refusal)

    async def _registration(self, request: Request) -> tuple[Replica, dict] | Response:
        """The replica and the request's JSON, or the refusal."""
        if (refusal := self._token_problem(request)) is not None:
            self.metrics.registrations_refused.labels(str(refusal.status_code)).inc()
            return refusal
        try:
            require_json(request.headers.get("content-type"))
            data = parse_json(await request.body())
            replica = self.pool.replicas[str(data["replica"])]
        except NotJSON as exc:
            return json_error(415, str(exc))
        except (BadJSON, TypeError, KeyError):
            return json_error(422, 'expected {"replica": <id it was launched as>, "url": ...}')
        return replica, data

    async def register(self, request: Request) -> Response:
        """A replica this balancer launched reports where it listens."""
        found = await self._registration(request)
        if isinstance(found, Response):
            return found
        replica, data = found
        try:
            url = replica_address(data.get("url"), self.pool.launcher.expected_host(replica))
        except ValueError as exc:
            return json_error(422, str(exc))
        if replica.state is not State.STARTING:
            return json_error(409, f"replica {replica.id} is {replica.state.value}")
        replica.url = url  # the health loop takes it from here
        return JSONResponse({"replica": replica.id, "state": replica.state.value})

    async def unregister(self, request: Request) -> Response:
        """A replica leaving of its own accord: drained, then stopped."""
        found = await self._registration(request)
        if isinstance(found, Response):
            return found
        replica, _ = found
        self.pool.drain(replica)
        return JSONResponse({"replica": replica.id, "state": replica.state.value})


class Relay(Response):
    """A replica's event stream passed on to the client as it comes, whole events at a time
    (so an error event never lands inside a half-sent one).  If the replica fails
    mid-answer, the stream ends with an error event in its API's format; if the client
    leaves, the connection to the replica is closed, which cancels the work there."""

    def __init__(
        self, balancer: Balancer, replica: Replica, upstream: aiohttp.ClientResponse, path: str
    ) -> None:
        self.balancer = balancer
        self.replica = replica
        self.upstream = upstream
        self.path = path
        self.status_code = upstream.status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code,
                 "headers": EVENT_STREAM_HEADERS}  # fmt: skip
        try:
            await send(start)
            if await unless_client_leaves(self._pass_on(send), receive) is None:
                self.upstream.close()  # the replica sees its client leave
        finally:
            self.upstream.release()
            self.balancer.pool.end(self.replica, self.status_code < 400)

    async def _pass_on(self, send: Send) -> bool:
        pending = b""
        try:
            async for chunk in self.upstream.content.iter_any():
                pending += chunk
                cut = pending.rfind(b"\n\n") + 2
                if cut > 1:
                    body, pending = pending[:cut], pending[cut:]
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.balancer.replica_failed(self.replica)
            self.balancer.metrics.broken_streams.inc()
            detail = f"replica {self.replica.id} failed mid-answer ({type(exc).__name__})"
            await send({"type": "http.response.body", "body": error_frame(self.path, detail),
                        "more_body": True})  # fmt: skip
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True
