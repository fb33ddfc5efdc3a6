"""Starting a guarded server: how many connections the process can hold, the listening
socket, and the uvicorn settings every server here runs with."""

from __future__ import annotations

import resource
import socket
from typing import Any

import uvicorn

from rag.web.guard import ConnectionGuard

# Files kept for everything but client connections (logs, replicas' pipes, the runtime),
# or a tenth of the limit when that is more.
RESERVED_FILES = 256
UNLIMITED_FILES = 1 << 20  # taken as the limit when the hard limit is "unlimited"


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (an unprivileged
    process may); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # the kernel's own ceiling is lower: keep what there is
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int, files_per_connection: int) -> int:
    """`configured` when > 0; else as many connections as the open-files limit holds (each
    taking `files_per_connection`: a proxy also opens one to its upstream), with headroom."""
    files = raise_open_files_limit()
    if configured > 0:
        return configured
    spare = files - max(RESERVED_FILES, files // 10)
    return max(1, spare // files_per_connection)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so that port 0 yields a known free port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def guarded_config(app: Any, guard: ConnectionGuard, **settings: Any) -> uvicorn.Config:
    """uvicorn with the guarded protocol, no access log, logging left as configured, and
    the client's address as the socket says (X-Forwarded-For is not trusted)."""
    return uvicorn.Config(
        app,
        http=guard.protocol(),
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,
        **settings,
    )
