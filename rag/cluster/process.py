"""Start a server process, wait until it is ready, and tear it down cleanly.

Modelled on vLLM's benchmark sweep: the server runs in its own process group, readiness
is polled with a timeout, a crash during start-up is detected at once (with the tail of
its log in the error), stopping sends SIGTERM (drain) before SIGKILL, and a server whose
parent dies without stopping it (SIGKILL) is told by the kernel and stops itself.  The pieces
(`spawn`, `read_port`, `stop_group`, `log_tail`) are shared with the replica launchers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from rag.storage import scratch_folder, write_atomically

REPO_ROOT = Path(__file__).resolve().parents[2]
PR_SET_PDEATHSIG = 1


class ServerFailed(RuntimeError):
    """The server exited or did not become ready in time; the message has its log tail."""


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, dict]:
    """GET a JSON endpoint; (status, body), with status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


def server_command(module: str, overrides: list[str], host: str, port_file: Path) -> list[str]:
    """`python -m <module> <overrides> host=.. port=0 port_file=..`: a free port, reported."""
    return [
        sys.executable, "-m", module, *overrides,
        f"host={host}", "port=0", f"port_file={port_file}",
    ]  # fmt: skip


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM (and drain and stop) when the parent dies,
    however it dies, even by SIGKILL, so no server outlives whoever started it (Linux only;
    elsewhere a no-op).  The signal comes when the *thread* that started the child ends, so
    only children started from a long-lived thread may ask for it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    command: list[str],
    log_path: Path,
    env: dict[str, str],
    before_exec: Callable[[], None] | None = None,
) -> subprocess.Popen:
    """Start `command` in a process group of its own (stopping it reaches its children),
    with stdout and stderr appended to `log_path`; `before_exec` runs in the child."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=before_exec,
        )


def read_port(port_file: Path) -> int | None:
    """The port a server wrote once it listened (written atomically), or None yet."""
    try:
        return int(port_file.read_text())
    except (OSError, ValueError):
        return None


def write_port_file(path: str, port: int) -> None:
    """Tell a launching parent the port, atomically (it polls for the file)."""
    write_atomically(Path(path), f"{port}\n")


def stop_group(process: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM the process group (a server drains), then SIGKILL it if still there."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ServerProcess:
    """`python -m <module> <overrides> port=0` as a managed child process.

    Use as a context manager: entering starts it and waits for /ready; leaving stops it.
    """

    overrides: list[str]
    module: str = "rag.serve"
    ready_timeout_s: float = 300.0
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = field(default=None, init=False)
    port: int = field(default=0, init=False)
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        self._workdir = scratch_folder("server")  # the port file; the log unless one is given
        port_file = Path(self._workdir.name) / "port"
        if self.log_path is None:
            self.log_path = Path(self._workdir.name) / "server.log"
        command = server_command(self.module, self.overrides, self.host, port_file)
        on_main_thread = threading.current_thread() is threading.main_thread()
        before_exec = die_with_parent if on_main_thread else None
        self.process = spawn(command, self.log_path, self.env, before_exec)
        self.port = self._wait_for_port(port_file)
        self.wait_ready()
        return self

    def _wait_for_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if (port := read_port(port_file)) is not None:
                return port
            time.sleep(0.05)
        raise self._failure(f"did not open a port within {self.ready_timeout_s:g} s")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if http_get(f"{self.url}/ready")[0] == 200:
                return
            time.sleep(0.1)
        raise self._failure(f"not ready within {self.ready_timeout_s:g} s")

    def _check_alive(self) -> None:
        assert self.process is not None
        if (code := self.process.poll()) is not None:
            raise self._failure(f"exited with code {code} during start-up")

    def _failure(self, what: str) -> ServerFailed:
        tail = log_tail(self.log_path)
        self.stop()
        return ServerFailed(f"{self.module} {' '.join(self.overrides)}: {what}\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL the group if it is still there."""
        process, self.process = self.process, None
        code = stop_group(process, timeout_s) if process is not None else None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
