"""What does the balancer add to a request?  Side by side with calling the replica directly,
with nginx as a reference reverse proxy, and with the balancer of another commit, in one run.

    ragbench-bench .venv/bin/python bench/bench_balancer.py [--against main] [--check]

A trivial backend (fixed tiny JSON answer) runs in its own process; the balancer (the real
one, with its pool and health checks, over that one backend) in another; nginx (Debian's
`nginx-light` or `nginx`, started here as a reverse proxy with keep-alive upstreams) in a
third; with `--against REV`, the balancer as it was at git revision REV (its `rag` package
taken with `git archive`) in a fourth.  The load generator sends an ideal 1,000 requests/s
schedule to each in turn, for several rounds (the proxies' order rotating), and the added
latency is each proxy's percentile minus the direct one's in the same round (median over
rounds).  Targets: the
balancer adds <= 0.5 ms at p50 and <= 1.5 ms at p99, and with `--against`, no more at p50
than REV's balancer.  nginx's and REV's own figures are reported, not judged.

Then streamed answers (the backend's /rag with `"stream": true` answers Server-Sent
Events: docs, tokens, done), a poisson schedule at `--stream-rate` to the backend and
through the balancer in turn, timed to the first token event: the balancer adds <= 2 ms to
the time to first token at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from record import BenchRecord, add_check_option

from rag.loadgen import LoadConfig, run_load

ROOT = Path(__file__).resolve().parent.parent
ANSWER = b'{"query": "q", "result": "r", "timings": {"total_ms": 0.1}, "batch_size": 1}'
STREAMED = (
    b'event: docs\ndata: {"query": "q", "docs": []}\n\n'
    + b'event: token\ndata: {"text": "r", "tokens": 1}\n\n' * 4
    + b'event: done\ndata: {"query": "q", "result": "rrrr", "usage": {"completion_tokens": 4}}\n\n'
)
NGINX_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{ server {backend}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def serve_backend() -> None:
    """The trivial replica: answers /rag with a fixed tiny JSON (or its events, streamed),
    /ready with 200."""
    import uvloop
    from aiohttp import web

    async def rag(request: web.Request) -> web.StreamResponse:
        if b'"stream": true' not in await request.read():
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in STREAMED.split(b"\n\n")[:-1]:
            await response.write(event + b"\n\n")
        await response.write_eof()
        return response

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/rag", rag)
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


class FixedBackend:
    """A launcher whose one replica already runs at `url` (the trivial backend)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def launch(self, replica: Any) -> None:
        replica.url = self.url

    def address(self, replica: Any) -> str | None:
        return self.url

    def expected_host(self, replica: Any) -> str | None:
        return None

    def exited(self, replica: Any) -> str | None:
        return None

    async def stop(self, replica: Any) -> None:
        return None


def serve_balancer(backend: str) -> None:
    """The real balancer and pool in front of the trivial backend, as the scaling variant
    runs them (uvloop, health checks every 0.5 s, least outstanding requests).  Imported
    here: with `--against`, from another commit's `rag` (its settings take what they know)."""
    import dataclasses

    import aiohttp
    import uvloop

    from rag.cluster.balancer import Balancer, BalancerSettings
    from rag.cluster.policies import make_policy
    from rag.cluster.pool import ReplicaPool

    async def main() -> None:
        pool = ReplicaPool(FixedBackend(backend), health_interval_s=0.5, start_timeout_s=30)
        known = {f.name for f in dataclasses.fields(BalancerSettings)}
        settings = BalancerSettings(
            **{
                key: value
                for key, value in {
                    "policy": make_policy("least_outstanding"),
                    "max_body_bytes": 25_000,
                    "body_timeout_s": 10,
                    "head_timeout_s": 10,
                    "hop_timeout_s": 10,
                    "max_connections": 4096,
                    "token": "",
                    "labels": {},
                }.items()
                if key in known
            }
        )
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            pool.session = session
            balancer = Balancer(pool, settings)
            port = await balancer.start("127.0.0.1", 0)
            pool.launch()
            health = asyncio.get_running_loop().create_task(pool.health_loop())
            while not pool.ready:
                await asyncio.sleep(0.05)
            gc.freeze()  # as the scaling variant does once started
            print(port, flush=True)
            await asyncio.Event().wait()
            health.cancel()

    uvloop.run(main())


def start(*args: str, root: Path | None = None) -> tuple[subprocess.Popen, str]:
    """This script in a child process (with `rag` from `root` when given); its URL."""
    env = {**os.environ, "PYTHONPATH": str(root)} if root else None
    process = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    port = process.stdout.readline().strip()
    if not port:
        raise RuntimeError(f"{' '.join(args)} did not start (exit code {process.wait()})")
    return process, f"http://127.0.0.1:{port}"


def checkout(revision: str, folder: Path) -> Path:
    """The `rag` package as it was at `revision`, unpacked under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", revision, "rag"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def start_nginx(backend: str, folder: Path) -> tuple[subprocess.Popen, str] | None:
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if nginx is None:
        return None
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    conf = folder / "nginx.conf"
    upstream = backend.removeprefix("http://")
    conf.write_text(NGINX_CONF.format(dir=folder, backend=upstream, port=port))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(folder)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, url
        except OSError:
            time.sleep(0.05)
    process.terminate()
    return None


def measure(url: str, rate: float, seconds: float) -> dict[str, float]:
    config = LoadConfig(
        target=url, timing_mode="ideal", rps=rate, num_requests=int(rate * seconds),
        timeout=10.0, progress=False,
    )  # fmt: skip
    _, summary = run_load(config)
    return {
        "p50_ms": summary["latency_p50_s"] * 1e3,
        "p99_ms": summary["latency_p99_s"] * 1e3,
        "failed": summary["failed"],
        "schedule_kept": summary["schedule_kept"],
    }


def first_token_p50_ms(url: str, rate: float, seconds: float, seed: int) -> tuple[float, int]:
    """TTFT p50 of streamed answers on a poisson schedule, and how many failed."""
    config = LoadConfig(target=url, timing_mode="poisson", rps=rate, duration=seconds,
                        num_requests=0, seed=seed, timeout=10.0, progress=False)  # fmt: skip
    _, summary = run_load(config)
    return summary["ttft_p50_s"] * 1e3, summary["failed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-balancer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of direct/balancer/nginx")
    parser.add_argument("--against", default="", help="also measure this git revision's balancer")
    parser.add_argument("--stream-rate", type=float, default=200.0, help="streamed requests/s")
    add_check_option(parser)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend()
        return 0
    if args.serve_balancer:
        serve_balancer(args.serve_balancer)
        return 0

    record = BenchRecord("balancer", {k: v for k, v in vars(args).items() if "serve" not in k})
    processes: list[subprocess.Popen] = []
    folder = Path(tempfile.mkdtemp(prefix="ragbench-bench-balancer-"))
    try:
        backend_process, backend = start("--serve-backend")
        processes.append(backend_process)
        balancer_process, balancer = start("--serve-balancer", backend)
        processes.append(balancer_process)
        targets = {"direct": backend, "balancer": balancer}
        if args.against:
            root = checkout(args.against, folder / "against")
            against_process, against = start("--serve-balancer", backend, root=root)
            processes.append(against_process)
            targets["against"] = against
            record.note(against=args.against)
        nginx = start_nginx(backend, folder)
        if nginx is None:
            print("# nginx is not installed (apt-get install nginx-light): no reference")
        else:
            processes.append(nginx[0])
            targets["nginx"] = nginx[1]
        for url in targets.values():
            measure(url, 200, 1.0)  # warm connections and caches, not judged
        rounds: list[dict[str, dict[str, float]]] = []
        proxies = [name for name in targets if name != "direct"]
        for n in range(args.rounds):
            # Direct first, then the proxies in a rotating order: none always runs second.
            order = ["direct", *proxies[n % len(proxies) :], *proxies[: n % len(proxies)]]
            figures = {name: measure(targets[name], args.rate, args.seconds) for name in order}
            rounds.append(figures)
            print(
                f"# round {n + 1}: "
                + "  ".join(
                    f"{name} p50 {f['p50_ms']:.3f} p99 {f['p99_ms']:.3f} ms"
                    f"{'' if f['schedule_kept'] else ' (schedule not kept)'}"
                    for name, f in figures.items()
                ),
                flush=True,
            )
        record.results["rounds"] = rounds
        added = {}
        for name in targets:
            if name == "direct":
                continue
            for q in ("p50_ms", "p99_ms"):
                added[f"{name}_{q}"] = statistics.median(
                    r[name][q] - r["direct"][q] for r in rounds
                )
        record.results["added_ms"] = added
        failures = sum(f["failed"] for r in rounds for f in r.values())
        nginx_note = (
            f"nginx adds {added['nginx_p50_ms']:.3f} / {added['nginx_p99_ms']:.3f} ms"
            if "nginx" in targets
            else "no nginx"
        )
        record.target("balancer added p50", added["balancer_p50_ms"], at_most=0.5,
                      unit=" ms", fmt=".3f", detail=f"{nginx_note} at p50 / p99")  # fmt: skip
        record.target("balancer added p99", added["balancer_p99_ms"], at_most=1.5,
                      unit=" ms", fmt=".3f", detail=f"median of {args.rounds} rounds")  # fmt: skip
        if args.against:
            record.target("balancer added p50, minus REV's", added["balancer_p50_ms"]
                          - added["against_p50_ms"], at_most=0.0, unit=" ms", fmt=".3f",
                          detail=f"{args.against} adds {added['against_p50_ms']:.3f} /"
                          f" {added['against_p99_ms']:.3f} ms at p50 / p99")  # fmt: skip
        streamed = []
        for n in range(args.rounds):
            order = ["direct", "balancer"] if n % 2 == 0 else ["balancer", "direct"]
            rate = args.stream_rate
            streamed.append(
                {name: first_token_p50_ms(targets[name], rate, args.seconds, n) for name in order}
            )
            print(f"# streamed round {n + 1}: " + "  ".join(
                f"{name} TTFT p50 {ms:.3f} ms" for name, (ms, _) in streamed[-1].items()),
                flush=True)  # fmt: skip
        record.results["streamed_rounds"] = streamed
        ttft_added = statistics.median(r["balancer"][0] - r["direct"][0] for r in streamed)
        detail = f"at {args.stream_rate:g}/s, median of {args.rounds} rounds"
        record.target("balancer added streamed TTFT p50", ttft_added, at_most=2.0, unit=" ms",
                      fmt=".3f", detail=detail)  # fmt: skip
        failures += sum(failed for r in streamed for _, failed in r.values())
        record.target("failed requests", failures, at_most=0, fmt=".0f")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return record.finish(args.check)


if __name__ == "__main__":
    sys.exit(main())
