"""One server process: `python -m rag.serve variant=base|batched|continuous port=...`, as
started by hand, by the sweep for a point, or by the scaling variant for a replica.

The port is bound before uvicorn starts (so port 0 yields a known free port, written to
`port_file` for a launching parent), and SIGTERM drains before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from contextlib import suppress
from typing import Any

import uvicorn

from rag.cluster.process import write_port_file
from rag.config import Config, compose_from_argv
from rag.service.app import ServerState, create_app
from rag.web import bind_socket, guarded_config


class DrainingServer(uvicorn.Server):
    """Uvicorn, except that SIGTERM drains first: /ready turns 503, queued and running
    requests finish, then the process exits.  A second signal, or SIGINT, exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig != signal.SIGTERM or self.state.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(
            self.state.spawn, self.state.drain(lambda: setattr(self, "should_exit", True))
        )


def main(argv: list[str] | None = None) -> int:
    cfg: Config = compose_from_argv(argv)  # type: ignore[assignment]
    logging.basicConfig(level=cfg.server.log_level.upper())
    app = create_app(cfg)
    state: ServerState = app.state.rag
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except OSError as exc:
        print(f"ragbench serve: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    server = DrainingServer(
        guarded_config(app, state.connections, log_level=cfg.server.log_level, lifespan="on"),
        state,
    )
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    print(f"ragbench serve: {cfg.variant.name} listening on http://{cfg.host}:{port}", flush=True)
    if cfg.port_file:
        write_port_file(cfg.port_file, port)
    with suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 1 if state.failure else 0
