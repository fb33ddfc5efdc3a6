"""The load balancer: a reverse proxy in front of the replicas.

`POST /rag` is forwarded to one ready replica, chosen by the configured policy from the
balancer's own in-flight counters, and its answer returned as it came.  A request that
never reached a replica (connection refused: the replica is gone) is retried once on
another; one that a replica accepted is never sent twice.  A client that disconnects
cancels its forwarded request (the replica then drops it before computing it).

What it accepts is bounded as the server bounds it: the body is counted as it arrives
(any framing) and refused past the largest valid request, or with 408 if it has not all
arrived in time; connections beyond a cap get a 503; a connection that does not send a
full request head in time is closed; each hop has a timeout.  Errors are JSON with a
`detail`, like the server's.

Registration (`/register`, `/unregister`) lets a replica started elsewhere (a SLURM job)
report where it listens.  On loopback anyone local may call it; bound elsewhere, a shared
token is required.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from yarl import URL

from rag.cluster.admin import TOKEN_HEADER
from rag.cluster.pool import Replica, ReplicaPool, State

log = logging.getLogger("rag.cluster")

HEAD_TIMEOUT_S = 15.0  # a connection must send a request head within this (then idle limit)
SHUTDOWN_TIMEOUT_S = 15.0  # on stop, forwarded requests get this long to finish
FORWARDED_HEADERS = ("Content-Type", "Retry-After")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@functools.lru_cache(maxsize=1024)
def rag_url(base: str) -> URL:
    """A replica's /rag URL, parsed once (parsing on every request costs the hot path)."""
    return URL(base) / "rag"


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers)


@dataclass
class BalancerSettings:
    policy: Any  # a rag.cluster.policies choice: .choose(ready replicas) -> replica
    max_body_bytes: int
    body_timeout_s: float  # the whole body must arrive within this (408 if not)
    hop_timeout_s: float
    max_connections: int
    token: str  # "" = registration open (loopback only)
    labels: dict[str, Any]  # variant, model, simulated: what /stats reports


class BalancerMetrics:
    def __init__(self, pool: ReplicaPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "balancer_requests", "Requests to /rag by status", ["status"], registry=self.registry
        )
        self.retries = Counter(
            "balancer_retries",
            "Requests re-sent because the first replica refused the connection",
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


class Balancer:
    def __init__(self, pool: ReplicaPool, settings: BalancerSettings) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = BalancerMetrics(pool)
        self.hop_timeout = aiohttp.ClientTimeout(total=settings.hop_timeout_s)
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[self._guard],
        )
        app.router.add_post("/rag", self.rag)
        app.router.add_get("/assign", self.assign)
        app.router.add_get("/ping", self.ping)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/replicas", self.replicas)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/register", self.register)
        app.router.add_post("/unregister", self.unregister)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = a free port); returns the port."""
        self.runner = web.AppRunner(
            self.app(),
            access_log=None,
            handler_cancellation=True,  # a client that leaves cancels its forwarded request
            keepalive_timeout=HEAD_TIMEOUT_S,  # also closes connections that never send a head
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=2048)
        await site.start()
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # --- middlewares --------------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The connection cap, aiohttp's own refusals (404, 405, 413) in the server's JSON
        error format, and every /rag answer counted by status."""
        assert self.runner is not None and self.runner.server is not None
        cap = self.settings.max_connections
        if len(self.runner.server._connections) > cap:  # a dict; .connections copies it
            request.protocol.force_close()
            response: web.StreamResponse = error(503, f"over {cap} connections; retry later")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = error(exc.status, self._refusal(exc))
        if request.path == "/rag":
            self.metrics.requests.labels(str(response.status)).inc()
        return response

    def _refusal(self, exc: web.HTTPException) -> str:
        if exc.status == 413:
            return f"request body exceeds the limit of {self.settings.max_body_bytes} bytes"
        return exc.reason

    # --- routes -------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.pool.ready:
            return error(503, "no replica is ready yet")
        return web.json_response({"status": "ready", "replicas": len(self.pool.ready)})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            content_type="text/plain",
            charset="utf-8",
        )

    async def replicas(self, request: web.Request) -> web.Response:
        return web.json_response([r.describe() for r in self.pool.replicas.values()])

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.settings.labels,
                "replicas_ready": len(self.pool.ready),
                "replicas_starting": self.pool.count(State.STARTING),
            }
        )

    async def assign(self, request: web.Request) -> web.Response:
        """The older two-step design: which replica should the client call itself?"""
        if not self.pool.ready:
            return error(503, "no replica is ready", {"Retry-After": "1"})
        return web.json_response({"backend": self.settings.policy.choose(self.pool.ready).url})

    async def rag(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                body = await request.read()  # counted as it arrives: 413 past client_max_size
        except TimeoutError:
            seconds = self.settings.body_timeout_s
            refusal = error(408, f"the request body did not arrive within {seconds:g} s")
            refusal.force_close()  # the rest of the body is not waited for
            return refusal
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        tried: set[Replica] = set()
        for attempt in range(2):
            candidates = [r for r in self.pool.ready if r not in tried]
            if not candidates:
                break
            replica = self.settings.policy.choose(candidates)
            tried.add(replica)
            if attempt:
                self.metrics.retries.inc()
            response = await self._forward(replica, body, headers)
            if response is not None:
                return response
        return error(503, "no replica is ready; retry shortly", {"Retry-After": "1"})

    async def _forward(
        self, replica: Replica, body: bytes, headers: dict[str, str]
    ) -> web.Response | None:
        """One hop.  None when the replica refused the connection (the request never
        reached it, so it may go to another)."""
        session = self.pool.session
        assert session is not None
        self.pool.begin(replica)
        try:
            async with session.post(
                rag_url(replica.url), data=body, headers=headers, timeout=self.hop_timeout
            ) as upstream:
                payload = await upstream.read()
                if upstream.status >= 500:
                    replica.errors += 1
                kept = {h: upstream.headers[h] for h in FORWARDED_HEADERS if h in upstream.headers}
                return web.Response(body=payload, status=upstream.status, headers=kept)
        except aiohttp.ClientConnectorError as exc:
            replica.errors += 1
            replica.refused += 1
            self.pool.mark_dead(replica, f"refused a connection: {exc.os_error}")
            return None
        except TimeoutError:
            replica.errors += 1
            seconds = self.settings.hop_timeout_s
            return error(504, f"replica {replica.id} did not answer within {seconds:g} s")
        except aiohttp.ClientError as exc:
            replica.errors += 1
            asyncio.get_running_loop().create_task(self.pool.check(replica))
            return error(502, f"replica {replica.id} failed mid-request ({type(exc).__name__})")
        finally:
            self.pool.end(replica)

    # --- registration ---------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        token = self.settings.token
        return not token or hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), token)

    async def _registration(
        self, request: web.Request
    ) -> tuple[Replica | None, dict, web.Response | None]:
        if not self._authorised(request):
            return None, {}, error(403, f"registration needs the balancer's token ({TOKEN_HEADER})")
        try:
            data = json.loads(await request.read())
            replica = self.pool.replicas[str(data["replica"])]
        except (ValueError, TypeError, KeyError):
            return None, {}, error(422, 'expected {"replica": <id it was launched as>, "url": ...}')
        return replica, data, None

    async def register(self, request: web.Request) -> web.Response:
        """A replica this balancer launched reports where it listens."""
        replica, data, refusal = await self._registration(request)
        if refusal is not None:
            return refusal
        assert replica is not None
        url = data.get("url")
        if not isinstance(url, str) or not url.startswith("http://"):
            return error(422, "url must be http://host:port")
        if replica.state is not State.STARTING:
            return error(409, f"replica {replica.id} is {replica.state.value}")
        replica.url = url.rstrip("/")  # the health loop takes it from here
        return web.json_response({"replica": replica.id, "state": replica.state.value})

    async def unregister(self, request: web.Request) -> web.Response:
        """A replica leaving of its own accord: drained, then stopped."""
        replica, _, refusal = await self._registration(request)
        if refusal is not None:
            return refusal
        assert replica is not None
        self.pool.drain(replica)
        return web.json_response({"replica": replica.id, "state": replica.state.value})
