"""The load generator: schedules, the open-loop and closed-loop senders, statistics, run
files, the CLI.

Torch-free by design (a test checks it): the client process must stay light.
"""

from rag.loadgen.config import LoadConfig
from rag.loadgen.run import Plan, plan, run_load, run_load_async, send, summarise_run, write_run
from rag.loadgen.sender import ROW_COLUMNS

__all__ = [
    "ROW_COLUMNS",
    "LoadConfig",
    "Plan",
    "plan",
    "run_load",
    "run_load_async",
    "send",
    "summarise_run",
    "write_run",
]
