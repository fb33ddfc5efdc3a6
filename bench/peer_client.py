"""The load generator's schedule, sender and statistics aimed at an OpenAI-compatible
server's /v1/completions: each scheduled query is sent as the prompt our pipeline builds
for it (token ids), for exactly `max_tokens` greedy tokens with EOS ignored, so the peer
does the work our server does for the same request at the same moment.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rag.loadgen import LoadConfig
from rag.loadgen.apis import CompletionsApi, Options
from rag.loadgen.run import plan, summarise_run
from rag.loadgen.sender import Sender


class PromptIdsApi(CompletionsApi):
    """/v1/completions with each query replaced by its RAG prompt's token ids, greedy."""

    def __init__(self, options: Options, prompts: dict[str, list[int]]) -> None:
        super().__init__(options)
        self.prompts = prompts

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        return {"prompt": self.prompts[prompt], "temperature": 0}


def run_completions(
    load: LoadConfig, prompts: dict[str, list[int]], model: str, max_tokens: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What `run_load` gives (a row per request, the summary) for this schedule sent to
    /v1/completions at `load.target`."""
    load.max_tokens = max_tokens
    run = plan(load)
    api = PromptIdsApi(Options(stream=load.stream, model=model, ignore_eos=True), prompts)
    assert run.schedule is not None  # an open loop
    sender = Sender(run.schedule, load.target, api, timeout=load.timeout)
    interrupted = asyncio.run(sender.run(asyncio.Event()))
    return sender.rows, summarise_run(run, sender.rows, interrupted)
