"""The load generator's schedule, sender and statistics aimed at an OpenAI-compatible
server's /v1/completions: each scheduled query is sent as the prompt our pipeline builds
for it (token ids), for exactly `max_tokens` greedy tokens with EOS ignored, so the peer
does the work our server does for the same request at the same moment.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from rag.loadgen import LoadConfig
from rag.loadgen.run import plan, summarise_run
from rag.loadgen.sender import Sender


class CompletionsSender(Sender):
    """A Sender whose bodies are completions requests and whose answers hold `choices`."""

    answer_field = "choices"

    def __init__(self, *args: Any, prompts: dict[str, list[int]], model: str, max_tokens: int,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, path="/v1/completions", **kwargs)
        bodies = {
            query: json.dumps(
                {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                 "ignore_eos": True}
            ).encode()
            for query, ids in prompts.items()
        }  # fmt: skip
        self.bodies = [bodies[row["query"]] for row in self.rows]


def run_completions(
    load: LoadConfig, prompts: dict[str, list[int]], model: str, max_tokens: int
) -> dict[str, Any]:
    """`run_load`'s summary for this schedule sent to /v1/completions at `load.target`."""
    run = plan(load)
    sender = CompletionsSender(
        run.schedule, load.target, timeout=load.timeout, prompts=prompts, model=model,
        max_tokens=max_tokens,
    )  # fmt: skip
    interrupted = asyncio.run(sender.run(asyncio.Event()))
    return summarise_run(run, sender.rows, interrupted)
