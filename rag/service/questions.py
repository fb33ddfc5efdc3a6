"""What the compute side is asked: a question (query and k) and how to answer it (the
decoding settings of this one request), with the flags the two sides share about it.

Plain data, torch-free: built by the HTTP side from a request, read by the pipeline, the
generators and the batchers, and small enough to cross a pipe to a compute process."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from rag.config import ModelConfig

_ids = itertools.count(1)


@dataclass(frozen=True)
class Decoding:
    """One request's generation settings, resolved against the server's defaults and
    limits before it is queued."""

    max_tokens: int
    min_tokens: int = 0  # EOS is not chosen before this many tokens (ignore_eos: = max_tokens)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None: the server's own generator

    @classmethod
    def configured(cls, cfg: ModelConfig, max_tokens: int | None = None) -> Decoding:
        """The model configuration's settings (what a request that sets none gets)."""
        limit = max_tokens or cfg.max_new_tokens
        return cls(limit, limit if cfg.ignore_eos else 0, cfg.temperature, cfg.top_p)


@dataclass(eq=False)
class Question:
    query: str
    k: int
    decoding: Decoding
    stream: bool = False  # token events as the text is generated
    arrival: float = field(default_factory=time.perf_counter)  # when the HTTP side got it
    id: int = field(default_factory=lambda: next(_ids))
    # Set by the HTTP side when the answer is no longer wanted (the client left, or its
    # deadline passed); the compute side stops generating it at its next step.
    cancelled: bool = False
    # Set by the compute side once its generation has begun (its documents retrieved).
    generating: bool = False
