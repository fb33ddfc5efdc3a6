"""Documents out: a FAISS index over the corpus embeddings, searched a batch at a time.

Embedding a corpus is the slow part of start-up (a large corpus takes minutes on a CPU),
so the vectors are cached on disk, keyed by what determines them: the corpus
content, the embedder's identity, its document prefix and its token limit.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from rag.service.corpus import Document, corpus_fingerprint
from rag.storage import cache_dir, write_atomically

if TYPE_CHECKING:
    from rag.config import CorpusConfig
    from rag.service.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    doc: Document
    score: float  # inner product of unit vectors = cosine similarity


class DocumentIndex:
    """Embeds `docs` (or reads them from the cache) and indexes them for inner-product
    search: exact (`flat`) or approximate (`hnsw`, `ivf`) as `cfg.index` says."""

    def __init__(
        self,
        docs: Sequence[Document],
        embedder: Embedder,
        cfg: CorpusConfig,
        faiss_threads: int = 0,  # 0 = faiss's default (all cores)
    ) -> None:
        if not docs:
            raise ValueError("cannot index an empty corpus")
        if faiss_threads > 0:
            faiss.omp_set_num_threads(faiss_threads)
        self.docs = list(docs)
        self.embedder = embedder
        vectors = self._load_or_embed(cache_dir(cfg.cache_dir) / "embeddings")
        self._index = _build_index(vectors, cfg)

    @property
    def size(self) -> int:
        return len(self.docs)

    def search(self, query_vectors: np.ndarray, ks: Sequence[int]) -> list[list[Hit]]:
        """One faiss call for the whole batch with the largest k, then each query's hits cut
        to its own k.  Approximate indexes may return fewer than k hits."""
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.embedder.dim:
            raise ValueError(f"query vectors must have shape (n, {self.embedder.dim})")
        if len(ks) != len(queries):
            raise ValueError(f"got {len(queries)} queries but {len(ks)} values of k")
        self._check_ks(ks)
        if not ks:
            return []
        scores, ids = self._index.search(queries, max(ks))
        return [
            [
                Hit(self.docs[j], float(s))
                for s, j in zip(row_s[:k], row_i[:k], strict=True)
                if j >= 0
            ]
            for row_s, row_i, k in zip(scores, ids, ks, strict=True)
        ]

    def retrieve(
        self, queries: Sequence[str], ks: Sequence[int]
    ) -> tuple[list[list[Hit]], float, float]:
        """Hits for a batch of query strings, with the seconds spent embedding and searching."""
        if len(ks) != len(queries):
            raise ValueError(f"got {len(queries)} queries but {len(ks)} values of k")
        self._check_ks(ks)  # before embedding: a bad request should cost nothing
        start = time.perf_counter()
        vectors = self.embedder.embed_queries(queries)
        embedded = time.perf_counter()
        hits = self.search(vectors, ks)
        return hits, embedded - start, time.perf_counter() - embedded

    def _check_ks(self, ks: Sequence[int]) -> None:
        for k in ks:
            if not isinstance(k, int | np.integer) or not 1 <= k <= self.size:
                raise ValueError(f"k must be an integer from 1 to {self.size}, got {k!r}")

    def _load_or_embed(self, folder: Path) -> np.ndarray:
        embedder = self.embedder
        parts = [embedder.identity, embedder.doc_prefix, str(embedder.max_tokens)]
        key = "\0".join([corpus_fingerprint(self.docs), *parts])  # all that shapes a vector
        path = folder / f"{hashlib.sha256(key.encode()).hexdigest()}.npy"
        cached = _read_vectors(path, (self.size, embedder.dim))
        if cached is not None:
            log.info("loaded %d document embeddings from %s", self.size, path)
            return cached
        start = time.perf_counter()
        vectors = embedder.embed_documents([d.text for d in self.docs])
        log.info("embedded %d documents in %.1f s", self.size, time.perf_counter() - start)
        _write_vectors(path, vectors)
        return vectors


def _read_vectors(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached vectors, or None (and the file removed) if they are missing, unreadable or
    not `shape` unit float32 rows: a bad cache must cost a recompute, never wrong answers."""
    if not path.exists():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
        if vectors.dtype != np.float32 or vectors.shape != shape:
            raise ValueError(f"{vectors.dtype} {vectors.shape}, expected float32 {shape}")
        if not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
            raise ValueError("rows are not unit vectors")
        return vectors
    except (OSError, ValueError, EOFError) as exc:
        log.warning("discarding bad embedding cache %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return None


def _write_vectors(path: Path, vectors: np.ndarray) -> None:
    """Write atomically, so a crash or a concurrent reader never sees a half-written file; a
    cache that cannot be written is only a warning."""
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as exc:
        log.warning("could not write embedding cache %s: %s", path, exc)


def _build_index(vectors: np.ndarray, cfg: CorpusConfig) -> faiss.Index:
    n, dim = vectors.shape
    if cfg.index == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.hnsw_ef_search
    elif cfg.index == "ivf":
        nlist = min(cfg.ivf_nlist or round(4 * math.sqrt(n)), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
    else:
        raise ValueError(f"unknown index type {cfg.index!r}: expected flat, hnsw or ivf")
    index.add(vectors)
    return index
