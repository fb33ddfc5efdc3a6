"""Sentence embeddings from an already-loaded Hugging Face encoder.

Mean pooling over the attention mask followed by L2 normalisation is what
all-MiniLM-L6-v2 and the e5 family were trained with, so inner product between two
outputs is their cosine similarity.  Loading the model and choosing its device and dtype
happen elsewhere (`rag.service.models`); this module only turns texts into vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class Embedder:
    """Embeds queries and documents with the prefixes the model expects (e5: "query: ",
    "passage: "), in chunks of `batch_size` to bound memory."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        identity: str,
        max_tokens: int = 256,
        query_prefix: str = "",
        doc_prefix: str = "",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1 or max_tokens < 1:
            raise ValueError(
                f"batch_size and max_tokens must be >= 1, got {batch_size}, {max_tokens}"
            )
        self.model = model.eval()  # dropout off: embeddings must be deterministic
        self.tokenizer = tokenizer
        self.identity = identity  # names model and dtype; part of the embedding-cache key
        self.max_tokens = min(max_tokens, tokenizer.model_max_length)
        self.query_prefix = query_prefix
        self.doc_prefix = doc_prefix
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed([self.query_prefix + t for t in texts])

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed([self.doc_prefix + t for t in texts])

    def _embed(self, texts: list[str]) -> np.ndarray:
        """float32 (len(texts), dim), unit rows.  Texts are embedded in order of length so
        that each chunk pads little, then put back in the caller's order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._embed_chunk([texts[i] for i in chunk])
        return out

    @torch.inference_mode()
    def _embed_chunk(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        ).to(self.model.device)
        hidden = self.model(**batch).last_hidden_state.float()  # pool in fp32, not fp16
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1).cpu().numpy()
