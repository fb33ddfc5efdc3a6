"""The RAG pipeline: embed -> retrieve -> prompt -> generate, a whole batch at a time.

It knows nothing of HTTP or queues; servers and benchmarks call `answer_batch`.  For a
streamed question it publishes the retrieved documents as a `docs` event (and the generator
its tokens), so the HTTP side can start answering before the batch ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rag.config import Config, token_limit
from rag.service.events import Event, Kind, Publish, docs_payload
from rag.service.index import DocumentIndex, Hit
from rag.service.questions import Decoding, Question
from rag.service.validation import QueryLimits, QueryRejected, find_problems

if TYPE_CHECKING:  # the model modules import torch; model=simulated never loads them
    from rag.service.embedder import Embedder
    from rag.service.generator import Generation, Generator
    from rag.service.simulated import SimulatedEmbedder, SimulatedGeneration, SimulatedGenerator

# Tokens kept for the system prompt, the question and the chat template's markup.
PROMPT_OVERHEAD_TOKENS = 192


@dataclass
class Answer:
    query: str
    result: str
    docs: list[Hit]
    prompt_tokens: int
    new_tokens: int
    answers_in_batch: int  # valid queries generated together with this one (itself included)
    # Each stage's time for the whole batch this query ran in (the time it waited on).
    timings_ms: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "length"  # stop (EOS) | length | cancelled
    first_token_at: float = 0.0  # time.perf_counter() of its first and last tokens
    last_token_at: float = 0.0


@dataclass
class Prepared:
    """A valid query retrieved and turned into a prompt, waiting for its generation."""

    query: str
    docs: list[Hit]
    prompt: str
    timings_ms: dict[str, float]


class RAGPipeline:
    def __init__(
        self,
        embedder: Embedder | SimulatedEmbedder,
        index: DocumentIndex,
        generator: Generator | SimulatedGenerator,
        limits: QueryLimits,
        system_prompt: str,
    ) -> None:
        self.embedder = embedder
        self.index = index
        self.generator = generator
        self.limits = limits
        self.system_prompt = system_prompt

    @classmethod
    def from_config(cls, cfg: Config) -> RAGPipeline:
        """Load both models, the corpus and its index (from the embedding cache if warm)."""
        from rag.service import simulated
        from rag.service.corpus import load_corpus

        if simulated.is_simulated(cfg.model.embedder):
            embedder = simulated.SimulatedEmbedder(cfg.model)
        else:
            from rag.service.models import load_embedder

            embedder = load_embedder(cfg.model, batch_size=cfg.corpus.embed_batch_size)
        index = DocumentIndex(load_corpus(cfg.corpus), embedder, cfg.corpus)
        if simulated.is_simulated(cfg.model.generator):
            generator = simulated.SimulatedGenerator(cfg.model)
        else:
            from rag.service.models import load_generator

            generator = load_generator(cfg.model, token_limit(cfg))
        limits = QueryLimits(cfg.server.max_query_chars, cfg.server.k_max, index.size)
        return cls(embedder, index, generator, limits, cfg.model.system_prompt)

    def build_prompt(self, query: str, hits: list[Hit]) -> str:
        # Approximate indexes may find fewer than k documents, even none.
        budget = (self.generator.cfg.max_prompt_tokens - PROMPT_OVERHEAD_TOKENS) // max(
            len(hits), 1
        )
        context = "\n".join(
            f"[{n}] {self.generator.truncate(hit.doc.text, budget)}"
            for n, hit in enumerate(hits, start=1)
        )
        return self.generator.render(
            self.system_prompt, f"Context:\n{context}\n\nQuestion: {query}"
        )

    def warm_up(self, query: str = "What is a warm-up request?") -> None:
        """Run every stage once on a batch of two (prefill and a few decode steps), so the
        first real request does not pay for kernel selection and allocator growth."""
        hits, _, _ = self.index.retrieve([query, query], [1, 2])
        questions = [Question(query, k, Decoding(max_tokens=4)) for k in (1, 2)]
        self.generator.generate([self.build_prompt(query, h) for h in hits], questions)

    def ask(self, queries: list[str], ks: list[int]) -> list[Question]:
        """Questions with the configured generation settings."""
        decoding = Decoding.configured(self.generator.cfg)
        return [Question(query, k, decoding) for query, k in zip(queries, ks, strict=True)]

    def answer_batch(self, queries: list[str], ks: list[int]) -> list[Answer | QueryRejected]:
        """`answer` for queries with the configured generation settings."""
        return self.answer(self.ask(queries, ks))

    def answer(
        self, questions: list[Question], publish: Publish | None = None
    ) -> list[Answer | QueryRejected]:
        """Answer every valid question with one embedding call, one index search and one
        generate call; an invalid one gets a QueryRejected in its place."""
        prepared = self.prepare(questions, publish)
        valid = [
            (q, p) for q, p in zip(questions, prepared, strict=True) if isinstance(p, Prepared)
        ]
        started = time.perf_counter()
        generations = iter(
            self.generator.generate([p.prompt for _, p in valid], [q for q, _ in valid], publish)
            if valid
            else []
        )
        generate_ms = (time.perf_counter() - started) * 1e3
        return [
            self.complete(p, next(generations), generate_ms, len(valid))
            if isinstance(p, Prepared)
            else p
            for p in prepared
        ]

    def prepare(
        self, questions: list[Question], publish: Publish | None = None
    ) -> list[Prepared | QueryRejected]:
        """Everything before generation, for a batch: the valid queries embedded and
        searched together, each one's prompt built (and its documents published when it
        is streamed); an invalid one gets a QueryRejected."""
        outcomes: list[Prepared | QueryRejected | None] = [None] * len(questions)
        valid = []
        for position, question in enumerate(questions):
            problems = find_problems(question.query, question.k, self.limits)
            if problems:
                outcomes[position] = QueryRejected("; ".join(p.message for p in problems))
            else:
                valid.append(position)
        if not valid:
            return outcomes  # type: ignore[return-value]
        hits, embed_s, search_s = self.index.retrieve(
            [questions[i].query for i in valid], [questions[i].k for i in valid]
        )
        timings = {"embed_ms": embed_s * 1e3, "retrieve_ms": search_s * 1e3}
        events = []
        for position, found in zip(valid, hits, strict=True):
            question = questions[position]
            prompt = self.build_prompt(question.query, found)
            outcomes[position] = Prepared(question.query, found, prompt, dict(timings))
            question.generating = True
            if question.stream:
                payload = {"query": question.query, "docs": docs_payload(found)}
                events.append(Event(question.id, Kind.DOCS, payload))
        if events and publish is not None:
            publish(events)
        return outcomes  # type: ignore[return-value]

    def complete(
        self,
        prepared: Prepared,
        generation: Generation | SimulatedGeneration,
        generate_ms: float,
        in_batch: int,
    ) -> Answer:
        """The answer to a prepared query, once its text is generated."""
        return Answer(
            prepared.query,
            generation.text,
            prepared.docs,
            generation.prompt_tokens,
            generation.new_tokens,
            in_batch,
            {**prepared.timings_ms, "generate_ms": generate_ms},
            generation.finish_reason,
            generation.first_token_at,
            generation.last_token_at,
        )
