"""The load generator: schedules, the open-loop and closed-loop senders, statistics, run
files, the CLI.

Torch-free by design (a test checks it): the client process must stay light.  The names
below load on first use: `rag.config` reads `rag.loadgen.config` in every server, CLI and
subprocess, which must not pay for the senders' HTTP client (aiohttp) they never use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag.loadgen.config import LoadConfig
    from rag.loadgen.run import (
        Plan,
        plan,
        run_load,
        run_load_async,
        send,
        summarise_run,
        write_run,
    )
    from rag.loadgen.sender import ROW_COLUMNS, csv_table

# Each public name and the module that defines it.
_HOMES = {
    "LoadConfig": "rag.loadgen.config",
    **dict.fromkeys(
        ["Plan", "plan", "run_load", "run_load_async", "send", "summarise_run", "write_run"],
        "rag.loadgen.run",
    ),
    **dict.fromkeys(["ROW_COLUMNS", "csv_table"], "rag.loadgen.sender"),
}

__all__ = [
    "ROW_COLUMNS",
    "LoadConfig",
    "Plan",
    "csv_table",
    "plan",
    "run_load",
    "run_load_async",
    "send",
    "summarise_run",
    "write_run",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first asked for (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
