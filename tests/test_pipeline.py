"""The pipeline alone: batches, per-query k, stage timings, isolation of bad queries."""

from __future__ import annotations

import pytest

from rag.config import compose
from rag.service.pipeline import Answer, RAGPipeline
from rag.service.validation import QueryRejected

HOVER = "Which animals can hover in the air?"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> RAGPipeline:
    cache = tmp_path_factory.mktemp("cache")
    return RAGPipeline.from_config(
        compose(["model=tiny", f"model.cache_dir={cache}", f"corpus.cache_dir={cache}"])
    )


def test_a_batch_answers_every_query_with_its_own_k(tiny_pipeline):
    answers = tiny_pipeline.answer_batch([HOVER, "What is DNA?", "How do bees talk?"], [1, 3, 2])
    assert [len(a.docs) for a in answers] == [1, 3, 2]
    for answer in answers:
        assert isinstance(answer, Answer)
        assert answer.answers_in_batch == 3
        assert set(answer.timings_ms) == {"embed_ms", "retrieve_ms", "generate_ms"}
        assert answer.timings_ms["generate_ms"] > 0
        assert 0 < answer.new_tokens <= 8 and answer.prompt_tokens > 0


def test_a_bad_query_fails_alone(tiny_pipeline):
    outcomes = tiny_pipeline.answer_batch(["", HOVER, "x" * 5000, HOVER], [2, 2, 2, 99])
    assert isinstance(outcomes[0], QueryRejected)
    assert isinstance(outcomes[1], Answer) and outcomes[1].answers_in_batch == 1
    assert isinstance(outcomes[2], QueryRejected) and "limit" in str(outcomes[2])
    assert isinstance(outcomes[3], QueryRejected) and "k must be" in str(outcomes[3])


def test_the_prompt_carries_the_retrieved_documents_and_the_question(tiny_pipeline):
    hits, _, _ = tiny_pipeline.index.retrieve([HOVER], [2])
    prompt = tiny_pipeline.build_prompt(HOVER, hits[0])
    assert HOVER in prompt
    assert all(hit.doc.text[:40] in prompt for hit in hits[0])


def test_long_documents_are_cut_to_the_prompt_budget(tiny_pipeline):
    generator = tiny_pipeline.generator
    long_text = "hummingbirds hover " * 2000
    cut = generator.truncate(long_text, 50)
    assert len(generator.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 50
    assert generator.truncate("short text", 50) == "short text"


@pytest.mark.packaged
def test_default_models_answer_the_hover_query(cache_dir):
    pipeline = RAGPipeline.from_config(
        compose([f"model.cache_dir={cache_dir}", f"corpus.cache_dir={cache_dir}"])
    )
    (answer,) = pipeline.answer_batch([HOVER], [2])
    assert "hummingbird" in answer.docs[0].doc.id
    assert answer.result.strip()


@pytest.mark.packaged
def test_batching_changes_no_greedy_token_on_the_default_model(cache_dir):
    """Prompts of different lengths in one left-padded batch get the tokens each gets
    alone.  In float32: bf16 rounds differently at each batch shape, which can flip a
    near-tie without anything being wrong."""
    pipeline = RAGPipeline.from_config(
        compose(
            ["model.dtype=float32", f"model.cache_dir={cache_dir}", f"corpus.cache_dir={cache_dir}"]
        )
    )
    queries = ["Why is the sky blue?", HOVER, "How do bees tell each other where flowers are?"]
    ks = [1, 3, 2]
    together = pipeline.answer_batch(queries, ks)
    alone = [pipeline.answer_batch([q], [k])[0] for q, k in zip(queries, ks, strict=True)]
    assert len({a.prompt_tokens for a in together}) == 3  # padding is exercised
    assert [(a.result, a.new_tokens, a.prompt_tokens) for a in together] == [
        (a.result, a.new_tokens, a.prompt_tokens) for a in alone
    ]
